"""API keys, the dashboard's sign-in cookie, CORS and prompt-free logs, in process over the fake
engine (no Ray): every route needs its tier's key once keys are configured, and none otherwise."""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from app.config import AppConfig, SecurityConfig
from app.server import create_app
from app.web.auth import SESSION_COOKIE, Authenticator, SignInThrottle, route_path, route_tier
from tests.fakes.local_backend import LocalBackend

MODEL = "org/fake-model"
CHAT = "/v1/chat/completions"
GENERATE = "/v1/generate/org__fake-model"
API_KEY = "sk-api-0f1e2d3c4b5a"
ADMIN_KEY = "sk-admin-9a8b7c6d5e4f"
METRICS_KEY = "sk-metrics-1234abcd"
WRONG_KEY = "sk-wrong-key-zz99yy88"
SECRET_PROMPT = "zebra-quartz-nebula-4711"
POOL = {"name": "eval", "gpus": {"cpu": 1}}

MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeClient]:
    """A TestClient over create_app + LocalBackend, with `env` set before the app reads keys."""
    clients: list[TestClient] = []

    def make(env: dict[str, str] | None = None, **security: Any) -> TestClient:
        for name in ("POOLSERVE_API_KEYS", "POOLSERVE_ADMIN_KEYS", "POOLSERVE_METRICS_KEYS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        config = AppConfig.model_validate(
            {
                "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
                "models": [{"id": MODEL}],
                "security": security,
            }
        )
        backend = LocalBackend(config)
        client = TestClient(create_app(config, backend))
        client.__enter__()
        client.portal.call(backend.start)  # type: ignore[union-attr]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **fields}


KEYS = {"POOLSERVE_API_KEYS": API_KEY, "POOLSERVE_ADMIN_KEYS": ADMIN_KEY}


def every_route(client: TestClient) -> list[tuple[str, str]]:
    """(method, concrete path) for every route the app serves, path parameters filled in."""
    routes: list[tuple[str, str]] = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, APIRoute):
            continue
        path = re.sub(r"\{name\}", "dashboard.js", route.path)
        path = re.sub(r"\{model_id:path\}", MODEL, path)
        path = re.sub(r"\{[^}]+\}", "x", path)
        routes.extend((method, path) for method in sorted(route.methods))
    return routes


# --- no keys: everything open, as before -------------------------------------------------------


def test_without_keys_every_route_is_open(make_client: MakeClient) -> None:
    client = make_client()
    assert client.post(CHAT, json=chat(max_tokens=2)).status_code == 200
    assert client.post("/v1/pools", json=POOL).status_code == 200
    assert client.delete("/v1/pools/eval").status_code == 200
    for path in ("/v1/models", "/health", "/metrics", "/dashboard", "/dashboard/api/state"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert "www-authenticate" not in response.headers
    # the sign-in page has nothing to do: it sends the browser to the dashboard
    assert client.get("/dashboard/login", follow_redirects=False).headers["location"] == (
        "/dashboard"
    )


# --- API keys ----------------------------------------------------------------------------------


def test_every_route_needs_a_key(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    routes = every_route(client)
    assert len(routes) >= 15  # chat, completions, responses, generate, models, pools, ...
    # the sign-in form's own answers: the form, "no key in the form", and back to the dashboard
    public = {
        ("GET", "/dashboard/login"): 200,
        ("POST", "/dashboard/login"): 401,
        ("POST", "/dashboard/logout"): 303,
    }
    for method, path in routes:
        response = client.request(method, path, json={}, follow_redirects=False)
        if (method, path) in public:
            assert response.status_code == public[method, path], (method, path)
            assert "json" not in response.headers.get("content-type", ""), (method, path)
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["x-sie-error-code"] == "invalid_api_key", (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
    # unknown routes too: no route discovery without a key
    assert client.get("/v1/nope").status_code == 401
    assert client.get("/openapi.json").status_code == 401


def test_missing_key_gets_a_clear_401_in_the_contract_shapes(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    openai = client.post(CHAT, json=chat())
    assert openai.status_code == 401
    assert openai.headers["x-sie-error-code"] == "invalid_api_key"
    assert openai.headers["www-authenticate"] == 'Bearer realm="poolserve"'
    error = openai.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert error["type"] == "invalid_request_error"
    assert "Authorization: Bearer" in error["message"]
    native = client.post(GENERATE, json={"prompt": "hi", "max_new_tokens": 2})
    assert native.status_code == 401
    assert native.json()["detail"]["code"] == "invalid_api_key"
    assert client.get("/v1/pools").json()["detail"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {WRONG_KEY}", f"Basic {WRONG_KEY}", WRONG_KEY, f"Bearer {API_KEY}x", "Bearer "],
)
def test_wrong_key_is_401_and_never_echoed(make_client: MakeClient, authorization: str) -> None:
    client = make_client(KEYS)
    for response in (
        client.post(CHAT, json=chat(), headers={"Authorization": authorization}),
        client.get("/v1/pools", headers={"Authorization": authorization}),
    ):
        assert response.status_code == 401
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert response.headers["x-sie-error-code"] == "invalid_api_key"
        assert WRONG_KEY not in response.text and API_KEY not in response.text
        assert WRONG_KEY not in str(response.headers) and API_KEY not in str(response.headers)


def test_right_key_works_buffered_and_streaming(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    buffered = client.post(CHAT, json=chat(max_tokens=3), headers=bearer(API_KEY))
    assert buffered.status_code == 200
    assert buffered.json()["choices"][0]["message"]["content"] == "alpha beta gamma "
    with client.stream(
        "POST", CHAT, json=chat(max_tokens=3, stream=True), headers=bearer(API_KEY)
    ) as stream:
        assert stream.status_code == 200
        assert "data: [DONE]" in stream.read().decode()
    # the scheme is case-insensitive; surrounding spaces do not matter
    assert client.get("/v1/models", headers={"authorization": f"bearer  {API_KEY} "}).is_success
    assert client.get("/health", headers=bearer(API_KEY)).status_code == 200


def test_several_keys_from_the_env_and_a_file(make_client: MakeClient, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# mounted secret\nfile-key-1\n\nfile-key-2  # rotated in\n")
    client = make_client(
        {"MY_KEYS": " env-key-1 ,env-key-2,, "},
        api_keys_env="MY_KEYS",
        api_keys_file=str(keys_file),
    )
    for key in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"):
        assert client.get("/v1/models", headers=bearer(key)).status_code == 200, key
    for key in ("# mounted secret", "rotated in", "env-key-1,env-key-2", ""):
        assert client.get("/v1/models", headers=bearer(key)).status_code == 401, key


def test_key_loading_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SecurityConfig(api_keys_file=str(tmp_path / "missing")).load_keys({})
    with pytest.raises(ValueError, match="require_keys"):
        SecurityConfig(require_keys=True).load_keys({"POOLSERVE_METRICS_KEYS": "m"})
    keys = SecurityConfig(require_keys=True).load_keys({"POOLSERVE_ADMIN_KEYS": "a"})
    assert keys.admin == {"a"} and not keys.api
    # the config names where keys live; it never holds one
    assert API_KEY not in SecurityConfig().model_dump_json()


def test_keys_are_compared_in_constant_time(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(KEYS)
    calls: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module auth uses
    assert client.get("/v1/models", headers=bearer(API_KEY)).status_code == 200
    assert (API_KEY.encode(), API_KEY.encode()) in calls
    assert len(calls) == 2  # the API key and the admin key: no early exit on the first match


# --- admin and metrics tiers -------------------------------------------------------------------


def test_pool_changes_need_the_admin_key(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    for method, path, body in (
        ("POST", "/v1/pools", POOL),
        ("POST", "/v1/pools/eval/renew", None),
        ("DELETE", "/v1/pools/eval", None),
    ):
        forbidden = client.request(method, path, json=body, headers=bearer(API_KEY))
        assert forbidden.status_code == 403, path
        assert forbidden.json()["detail"]["code"] == "permission_denied"
        assert forbidden.headers["x-sie-error-code"] == "permission_denied"
        assert 'error="insufficient_scope"' in forbidden.headers["www-authenticate"]
        assert client.request(method, path, json=body).status_code == 401, path
        assert client.request(method, path, json=body, headers=bearer(WRONG_KEY)).status_code == 401
        allowed = client.request(method, path, json=body, headers=bearer(ADMIN_KEY))
        assert allowed.status_code == 200, (path, allowed.text)
    # reading pools takes the API key; the admin key works on every route
    assert client.get("/v1/pools", headers=bearer(API_KEY)).status_code == 200
    assert client.post(CHAT, json=chat(max_tokens=1), headers=bearer(ADMIN_KEY)).status_code == 200


def test_admin_key_alone_guards_only_pool_changes(make_client: MakeClient) -> None:
    client = make_client({"POOLSERVE_ADMIN_KEYS": ADMIN_KEY})
    assert client.post(CHAT, json=chat(max_tokens=1)).status_code == 200
    assert client.get("/v1/pools").status_code == 200
    assert client.post("/v1/pools", json=POOL).status_code == 401
    assert client.post("/v1/pools", json=POOL, headers=bearer(ADMIN_KEY)).status_code == 200


def test_metrics_key_is_separate(make_client: MakeClient) -> None:
    client = make_client({**KEYS, "POOLSERVE_METRICS_KEYS": METRICS_KEY})
    assert client.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200
    assert client.get("/metrics", headers=bearer(ADMIN_KEY)).status_code == 200
    scraped_with_api_key = client.get("/metrics", headers=bearer(API_KEY))
    assert scraped_with_api_key.status_code == 401
    assert "metrics" in scraped_with_api_key.json()["detail"]["message"]
    assert client.get("/metrics").status_code == 401
    assert client.get("/v1/models", headers=bearer(METRICS_KEY)).status_code == 401


def test_metrics_take_the_api_key_unless_public(make_client: MakeClient) -> None:
    keyed = make_client(KEYS)
    assert keyed.get("/metrics").status_code == 401
    assert keyed.get("/metrics", headers=bearer(API_KEY)).status_code == 200
    public = make_client(KEYS, metrics_public=True, health_public=True)
    assert public.get("/metrics").status_code == 200
    assert "poolserve_" in public.get("/metrics").text
    assert public.get("/health").status_code == 200
    assert public.get("/v1/models").status_code == 401  # only those two are public


def test_route_tiers() -> None:
    security = SecurityConfig()
    assert route_tier("POST", "/v1/pools/", security) == "admin"
    assert route_tier("POST", "/v1/pools/a/renew", security) == "admin"
    assert route_tier("DELETE", "/v1/pools/a", security) == "admin"
    assert route_tier("HEAD", "/v1/pools/a", security) == "api"
    assert route_tier("GET", "/metrics/", security) == "metrics"
    assert route_tier("GET", "/dashboard/static/x.js", security) == "dashboard"
    assert route_tier("GET", "/health", security) == "api"
    assert route_tier("GET", "/dashboardx", security) == "api"


# --- the dashboard: sign in with a key, get an HttpOnly SameSite=Strict cookie ---------------


def sign_in(client: TestClient, key: str, **headers: str) -> Any:
    return client.post(
        "/dashboard/login", data={"key": key}, headers=headers, follow_redirects=False
    )


def test_dashboard_sign_in_cookie(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    page = client.get("/dashboard")
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/html")
    assert 'action="/dashboard/login"' in page.text and 'name="key"' in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert client.get("/dashboard/api/state").status_code == 401
    assert client.get("/dashboard/static/dashboard.js").status_code == 401

    wrong = sign_in(client, WRONG_KEY)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    assert "set-cookie" not in wrong.headers and WRONG_KEY not in wrong.text

    signed_in = sign_in(client, API_KEY)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/dashboard", "Max-Age=43200"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain http on 127.0.0.1: a Secure cookie would not return
    assert API_KEY not in cookie

    page = client.get("/dashboard")
    assert page.status_code == 200 and "Sign out" in page.text
    assert 'action="dashboard/logout" hidden' not in page.text
    assert client.get("/dashboard/api/state").json()["status"]
    assert client.get("/dashboard/static/dashboard.js").status_code == 200
    # the cookie is the dashboard's only: every other route still needs the header
    session = client.cookies[SESSION_COOKIE]
    assert client.get("/v1/models", cookies={SESSION_COOKIE: session}).status_code == 401
    assert client.get("/metrics", cookies={SESSION_COOKIE: session}).status_code == 401

    signed_out = client.post("/dashboard/logout", follow_redirects=False)
    assert signed_out.status_code == 303
    assert f'{SESSION_COOKIE}=""' in signed_out.headers["set-cookie"]
    assert client.get("/dashboard/api/state").status_code == 401


def test_dashboard_takes_the_header_too_and_rejects_forged_cookies(
    make_client: MakeClient,
) -> None:
    client = make_client(KEYS)
    assert client.get("/dashboard/api/state", headers=bearer(API_KEY)).status_code == 200
    page = client.get("/dashboard", headers=bearer(ADMIN_KEY))
    assert page.status_code == 200 and 'action="dashboard/logout" hidden' in page.text
    authenticator: Authenticator = client.app.state.authenticator  # type: ignore[attr-defined]
    good = authenticator.session_cookie(API_KEY)
    expires, _, mac = good.partition(".")
    forged = [
        f"{int(expires) + 10}.{mac}",  # a later expiry with the old MAC
        f"{expires}.{mac[:-1]}0" if not mac.endswith("0") else f"{expires}.{mac[:-1]}1",
        authenticator.session_cookie(WRONG_KEY),
        API_KEY,
        "",
    ]
    for value in forged:
        client.cookies.set(SESSION_COOKIE, value, path="/dashboard")
        assert client.get("/dashboard/api/state").status_code == 401, value
    client.cookies.set(SESSION_COOKIE, good, path="/dashboard")
    assert client.get("/dashboard/api/state").status_code == 200


def test_dashboard_cookie_expires(make_client: MakeClient) -> None:
    client = make_client(KEYS, dashboard_session_seconds=60)
    authenticator: Authenticator = client.app.state.authenticator  # type: ignore[attr-defined]
    now = [1_000_000.0]
    authenticator.clock = lambda: now[0]
    cookie = authenticator.session_cookie(API_KEY)
    assert authenticator.session_valid(cookie)
    now[0] += 59
    assert authenticator.session_valid(cookie)
    now[0] += 2
    assert not authenticator.session_valid(cookie)


def test_dashboard_cookie_is_secure_behind_https(make_client: MakeClient) -> None:
    client = make_client(KEYS)
    cookie = sign_in(client, API_KEY, **{"X-Forwarded-Proto": "https"}).headers["set-cookie"]
    assert "Secure" in cookie


# --- CORS --------------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default(make_client: MakeClient) -> None:
    client = make_client()
    preflight = client.options(CHAT, headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers
    response = client.post(CHAT, json=chat(max_tokens=1), headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_configured_origins_only(make_client: MakeClient) -> None:
    client = make_client(KEYS, cors_allow_origins=[ORIGIN])
    preflight = client.options(CHAT, headers=PREFLIGHT)  # preflights carry no key
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    other = client.options(CHAT, headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    response = client.post(
        CHAT, json=chat(max_tokens=1), headers={"Origin": ORIGIN, **bearer(API_KEY)}
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-sie-error-code" in response.headers["access-control-expose-headers"].lower()
    # a 401 is readable by the page too, so it can ask for a key
    denied = client.post(CHAT, json=chat(), headers={"Origin": ORIGIN})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN


# --- logs: no prompt text, no keys -------------------------------------------------------------


def test_logs_hold_no_prompt_text_and_no_keys(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # what production logs (Serve's log_level: INFO)
    client = make_client(KEYS)
    headers = bearer(API_KEY)
    messages = [{"role": "user", "content": f"tell me about {SECRET_PROMPT}"}]
    requests: list[tuple[str, dict[str, Any]]] = [
        (CHAT, {"model": MODEL, "messages": messages, "max_tokens": 3}),
        (CHAT, {"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": SECRET_PROMPT, "max_tokens": 3}),
        ("/v1/completions", {"model": MODEL, "prompt": SECRET_PROMPT, "stream": True}),
        (GENERATE, {"prompt": SECRET_PROMPT, "max_new_tokens": 3}),
        (GENERATE, {"prompt": SECRET_PROMPT, "max_new_tokens": 3, "stream": True}),
        # failures: too long for the context, an unknown field, a route the fake engine does
        # not serve, an unknown model
        (GENERATE, {"prompt": f"{SECRET_PROMPT} " * 600, "max_new_tokens": 3}),
        (GENERATE, {"prompt": SECRET_PROMPT, "max_new_tokens": 3, "bogus": SECRET_PROMPT}),
        ("/v1/responses", {"model": MODEL, "input": SECRET_PROMPT, "max_output_tokens": 3}),
        (CHAT, {"model": "no/such", "messages": messages}),
    ]
    statuses = [
        client.post(path, json=body, headers=headers).status_code for path, body in requests
    ]
    assert statuses[:6] == [200] * 6 and all(status >= 400 for status in statuses[6:])
    client.post(CHAT, json={"model": MODEL, "messages": messages}, headers=bearer(WRONG_KEY))
    sign_in(client, API_KEY)
    sign_in(client, WRONG_KEY)

    records = caplog.records
    assert any("API keys: 1 api, 1 admin" in record.getMessage() for record in records)
    logged = "\n".join(
        f"{record.getMessage()} {record.exc_text or ''} {record.args!r}" for record in records
    )
    for secret in (SECRET_PROMPT, API_KEY, ADMIN_KEY, WRONG_KEY):
        assert secret not in logged, secret


def test_serve_config_security_example_is_valid() -> None:
    """The commented `security:` example in serve_config.yaml validates once uncommented."""
    lines = (Path(__file__).resolve().parents[2] / "serve_config.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# security:"))
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        indent, _, rest = line.partition("# ")
        block.append(indent + rest)
    example = yaml.safe_load("\n".join(block))["security"]
    security = SecurityConfig.model_validate(example)
    assert security.require_keys and security.cors_allow_origins == ["https://app.example.com"]
    assert not any("sk-" in str(value) for value in example.values())


def test_key_tiers_hold_under_a_serve_route_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve puts the route prefix in `root_path` (and in `path`): the tier must come from the
    path the routes match, or `/tenant/v1/pools` would slip past the admin check."""
    assert route_path({"path": "/tenant/v1/pools", "root_path": "/tenant"}) == "/v1/pools"
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    config = AppConfig.model_validate(
        {"engine_adapter": "tests.fakes.fake_engine:FakeAdapter", "models": [{"id": MODEL}]}
    )
    backend = LocalBackend(config)
    with TestClient(create_app(config, backend), root_path="/tenant") as client:
        client.portal.call(backend.start)  # type: ignore[union-attr]
        refused = client.post("/tenant/v1/pools", json=POOL, headers=bearer(API_KEY))
        assert refused.status_code == 403, refused.text
        created = client.post("/tenant/v1/pools", json=POOL, headers=bearer(ADMIN_KEY))
        assert created.status_code == 200, created.text
        missing = client.post(f"/tenant{CHAT}", json=chat(max_tokens=1))
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"


# --- failed sign-ins are throttled per client address -----------------------------------------


def test_sign_in_throttle_counts_failures_in_a_sliding_window() -> None:
    now = [1000.0]
    throttle = SignInThrottle(3, 60.0, clock=lambda: now[0], max_clients=2)
    for _ in range(2):
        throttle.failed("10.0.0.1")
        now[0] += 10
    assert throttle.retry_after("10.0.0.1") is None
    throttle.failed("10.0.0.1")  # failures at 1000, 1010, 1020
    assert throttle.retry_after("10.0.0.1") == 40.0
    assert throttle.retry_after("10.0.0.2") is None  # per address
    now[0] += 30
    assert throttle.retry_after("10.0.0.1") == 10.0
    now[0] += 10  # the oldest failure leaves the window: one more try
    assert throttle.retry_after("10.0.0.1") is None
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 10.0
    throttle.succeeded("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") is None
    # bounded memory: the least recently failing address is forgotten first
    for client in ("a", "b", "c"):
        for _ in range(3):
            throttle.failed(client)
    assert throttle.retry_after("a") is None
    assert throttle.retry_after("b") == throttle.retry_after("c") == 60.0


def test_dashboard_sign_in_is_throttled_after_repeated_failures(make_client: MakeClient) -> None:
    client = make_client(KEYS, dashboard_sign_in_attempts=3, dashboard_sign_in_window_seconds=30)
    assert [sign_in(client, WRONG_KEY).status_code for _ in range(3)] == [401, 401, 401]
    refused = sign_in(client, API_KEY)  # even the right key waits: no oracle while throttled
    assert refused.status_code == 429
    assert refused.headers["x-sie-error-code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert "Too many failed sign-ins" in refused.text and "set-cookie" not in refused.headers
    # the API's bearer check is not affected
    assert client.get("/v1/models", headers=bearer(API_KEY)).status_code == 200
    authenticator: Authenticator = client.app.state.authenticator  # type: ignore[attr-defined]
    authenticator.sign_ins.clock = lambda: time.monotonic() + 31
    assert sign_in(client, API_KEY).status_code == 303
