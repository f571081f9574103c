"""schemathesis against the service's own OpenAPI document, over real HTTP on 127.0.0.1: every
operation gets schema-valid and schema-violating requests (bounded examples per operation), and
every response must be no 5xx, a documented status with the documented content type and
headers, and a body that matches the document. Runs on the session stack's `fake` app (same
FastAPI app as the real one; the fake engine keeps generation cheap). The number of cases is
printed (run with -s)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies
from schemathesis.checks import positive_data_acceptance

from tests.conftest import FAKE_MODEL, Stack, fake_app_args

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25
"""Per operation and generation phase: 13 operations, ~1,700 cases, well under 2 minutes."""
CASES: Counter[str] = Counter()


def service_document() -> dict[str, Any]:
    """The `fake` app's OpenAPI document, built by the same factory the Ingress serves (the
    test checks below that it equals what /fake/openapi.json returns)."""
    from app.config import AppConfig
    from app.server import create_app

    return create_app(AppConfig.model_validate(fake_app_args()), None).openapi()  # type: ignore[arg-type]


DOCUMENT = service_document()
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path_regex="^/dashboard")
"""The dashboard's HTML pages are not an API (their sign-in flow is tests/e2e/test_security*)."""
KNOWN = {"model": FAKE_MODEL.replace("/", "__"), "model_id": FAKE_MODEL, "name": "default"}
"""Path parameters that name something that exists, so half the cases get past the 404."""


def _known_path(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    if not parameters:
        return parameters
    return {name: KNOWN.get(name, value) for name, value in parameters.items()}


def _known_model(body: Any) -> Any:
    if isinstance(body, dict) and "model" in body:
        return {**body, "model": FAKE_MODEL}
    return body


@schema.hook
def before_generate_path_parameters(context: Any, strategy: Any) -> Any:
    return strategies.one_of(strategy, strategy.map(_known_path))


@schema.hook
def before_generate_body(context: Any, strategy: Any) -> Any:
    return strategies.one_of(strategy, strategy.map(_known_model))


@pytest.fixture(scope="module")
def fake_url(stack: Stack) -> str:
    url = f"{stack.base_url}/fake"
    served = httpx.get(f"{url}/openapi.json", timeout=30).json()
    served.pop("servers", None)  # the route prefix Serve adds
    assert served == DOCUMENT, "the served document differs from the one under test"
    return url


@pytest.fixture(scope="module", autouse=True)
def report_cases() -> Iterator[None]:
    yield
    documented = {
        f"{method.upper()} {path}"
        for path, methods in DOCUMENT["paths"].items()
        for method in methods
        if not path.startswith("/dashboard")
    }
    tried = {key: count for key, count in CASES.items() if key in documented}
    probes = sum(CASES.values()) - sum(tried.values())
    print(
        f"\n[schemathesis] {sum(CASES.values())} cases: {tried}, "
        f"and {probes} undeclared-method probes"
    )


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_api_contract(case: Any, fake_url: str) -> None:
    CASES[f"{case.method} {case.path}"] += 1
    case.call_and_validate(
        base_url=fake_url,
        timeout=30,
        # A schema-valid body can still break a cross-field rule no JSON schema expresses
        # (n vs stream, best_of >= n, prompt + max_tokens within the context, an unknown
        # model): those get 4xx with the contract's codes, which the other checks hold.
        excluded_checks=[positive_data_acceptance],
    )
