"""The one SSE reader of tests and benchmarks (tests/support/sse.py): the WHATWG framing rules the
real clients follow, not a `data: ` prefix match."""

from __future__ import annotations

import httpx
import pytest
from httpx_sse import SSEError

from tests.support.sse import DONE, data, parse, payloads


def test_parse_follows_the_event_stream_rules() -> None:
    body = (
        ": keep-alive\n\n"  # a comment is no event
        'data: {"a": 1}\n\n'
        'data:{"b": 2}\r\n\r\n'  # no space after the colon, CRLF line ends
        "event: response.created\n"
        'data: {"c":\n'  # one event's data over two lines
        "data: 3}\n\n"
        "data: [DONE]\n\n"
    )
    assert parse(body) == ['{"a": 1}', '{"b": 2}', '{"c":\n3}', DONE]
    assert payloads(parse(body)) == ([{"a": 1}, {"b": 2}, {"c": 3}], True)


def test_payloads_says_when_the_stream_did_not_end() -> None:
    assert payloads(['{"a": 1}']) == ([{"a": 1}], False)


def test_data_refuses_a_body_that_is_not_an_event_stream() -> None:
    response = httpx.Response(200, headers={"content-type": "application/json"}, text="{}")
    with pytest.raises(SSEError, match="text/event-stream"):
        list(data(response))
