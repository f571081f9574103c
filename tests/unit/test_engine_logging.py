"""vLLM applies its logging config with `logging.config.dictConfig`, which closes every handler
of the process; the engine start must leave the host's buffering log handlers working."""

from __future__ import annotations

import io
import logging
import logging.config
import logging.handlers
from collections.abc import Iterator

import pytest

from app.engine.vllm_adapter import keep_log_buffers

VLLM_LIKE_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"vllm": {"class": "logging.StreamHandler"}},
    "loggers": {"vllm.test": {"handlers": ["vllm"], "level": "INFO", "propagate": False}},
}


@pytest.fixture
def buffered() -> Iterator[tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO]]:
    sink = io.StringIO()
    target = logging.StreamHandler(sink)
    buffer = logging.handlers.MemoryHandler(capacity=1, target=target)
    log = logging.getLogger("host.request_path")
    log.addHandler(buffer)
    log.propagate = False
    yield log, buffer, sink
    log.removeHandler(buffer)
    logging.getLogger("vllm.test").handlers.clear()


def test_dict_config_alone_cuts_a_memory_handler_off_its_target(
    buffered: tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO],
) -> None:
    """The failure being guarded against: every later record stays in the buffer."""
    log, buffer, sink = buffered
    logging.config.dictConfig(VLLM_LIKE_CONFIG)
    for n in range(5):
        log.error("refused %d", n)
    assert buffer.target is None
    assert len(buffer.buffer) == 5
    assert sink.getvalue() == ""


def test_keep_log_buffers_gives_the_target_back_and_flushes(
    buffered: tuple[logging.Logger, logging.handlers.MemoryHandler, io.StringIO],
) -> None:
    log, buffer, sink = buffered
    target = buffer.target
    with keep_log_buffers():
        logging.config.dictConfig(VLLM_LIKE_CONFIG)
        log.error("during the engine start")
    for n in range(5):
        log.error("refused %d", n)
    assert buffer.target is target
    assert buffer.buffer == []
    assert sink.getvalue().splitlines() == ["during the engine start"] + [
        f"refused {n}" for n in range(5)
    ]


def test_vllm_serving_logs_no_traceback_for_our_refusals() -> None:
    """vLLM's serving layers log what the engine's generator raises, with its traceback; a
    refusal of ours (QUEUE_FULL under a flood) is answered with its code, not logged."""
    from app.engine.openai_frontend import quiet_refusals
    from app.errors import QueueFull

    sink = io.StringIO()
    log = logging.getLogger("vllm.entrypoints.openai.test_serving")
    log.addHandler(logging.StreamHandler(sink))
    log.propagate = False
    try:
        quiet_refusals()
        quiet_refusals()  # idempotent
        assert len(log.filters) == 1
        for error in (QueueFull("full"), ValueError("a real failure")):
            try:
                raise error
            except Exception:
                log.exception("Error in chat completion stream generator.")
        assert sink.getvalue().count("Error in chat completion") == 1
        assert (
            "ValueError: a real failure" in sink.getvalue() and "QueueFull" not in sink.getvalue()
        )
    finally:
        log.handlers.clear()
        log.filters.clear()
