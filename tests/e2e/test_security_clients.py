"""API keys through the real clients over real HTTP: the app runs in process under uvicorn on
127.0.0.1 (a thread, a free port) over the local backend and the fake engine, so no Ray and no
model are needed. The openai SDK (wrong key -> AuthenticationError; right key buffered and
streaming), curl for the dashboard's cookie sign-in and /metrics, the sie-sdk, and the sign-in in a real headless Chromium."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from app.config import AppConfig
from app.serve_env import free_port
from app.server import create_app
from tests.browser import open_page, screenshot, wait_for
from tests.fakes.local_backend import LocalBackend
from tests.needs import missing
from tests.sie import SIEFailure, run_sie

pytestmark = pytest.mark.e2e

MODEL = "org/fake-model"
API_KEY = "sk-e2e-api-7d41c0a9b2"
ADMIN_KEY = "sk-e2e-admin-5be83f1d64"
METRICS_KEY = "sk-e2e-metrics-90aa21cc3e"
WRONG_KEY = "sk-e2e-wrong-000111222"
SECRET_PROMPT = "marmalade-obelisk-quokka-3141"
KEY_FILES = {  # as a mounted Kubernetes secret would hold them; no environment variables
    "api": f"{API_KEY}\nsk-e2e-other-key\n",
    "admin": f"# rotated 2026-11\n{ADMIN_KEY}\n",
    "metrics": f"{METRICS_KEY}\n",
}


@dataclass
class Server:
    base_url: str
    records: list[logging.LogRecord]


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """create_app under uvicorn in a thread; every log record at INFO and up is collected."""
    security: dict[str, str] = {}
    for tier, keys in KEY_FILES.items():
        path = tmp_path_factory.mktemp("keys") / tier
        path.write_text(keys)
        security[f"{tier}_keys_file"] = str(path)
        security[f"{tier}_keys_env"] = "POOLSERVE_E2E_NO_SUCH_VARIABLE"
    config = AppConfig.model_validate(
        {
            "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
            "models": [{"id": MODEL}],
            "security": security,
        }
    )
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # production's level: nothing below INFO is written
    loop = asyncio.new_event_loop()
    try:
        backend = LocalBackend(config)
        port = free_port()
        # log_config=None: uvicorn's loggers (access log included) propagate to the root handler
        uvicorn_server = uvicorn.Server(
            uvicorn.Config(
                create_app(config, backend), host="127.0.0.1", port=port, log_config=None
            )
        )
        thread = threading.Thread(
            target=loop.run_until_complete, args=(uvicorn_server.serve(),), daemon=True
        )
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while not uvicorn_server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            asyncio.run_coroutine_threadsafe(backend.start(), loop).result(timeout=30)
            yield Server(f"http://127.0.0.1:{port}", records)
        finally:
            uvicorn_server.should_exit = True
            thread.join(timeout=30)
    finally:
        loop.close()
        root.removeHandler(handler)
        root.setLevel(level)


def openai_client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def test_openai_sdk_wrong_key_raises_authentication_error(server: Server) -> None:
    client = openai_client(server, WRONG_KEY)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert raised.value.response.headers["www-authenticate"].startswith("Bearer")
    assert WRONG_KEY not in raised.value.response.text
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    with pytest.raises(openai.AuthenticationError):  # streams fail before the first event
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
    # the metrics key is for /metrics only
    with pytest.raises(openai.AuthenticationError):
        openai_client(server, METRICS_KEY).models.list()


def test_openai_sdk_right_key_buffered_and_streaming(server: Server) -> None:
    client = openai_client(server, API_KEY)
    assert [model.id for model in client.models.list()] == [MODEL]
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=3
    )
    assert completion.choices[0].message.content == "alpha beta gamma "
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": SECRET_PROMPT}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == "alpha beta gamma delta "
    assert usage is not None and usage.completion_tokens == 4
    legacy = client.completions.create(model=MODEL, prompt=SECRET_PROMPT, max_tokens=2)
    assert legacy.choices[0].text == "alpha beta "
    # the admin key is an API key too
    assert openai_client(server, ADMIN_KEY).models.list().data


def test_anthropic_sdk_x_api_key(server: Server) -> None:
    """The anthropic SDK sends its key as `x-api-key`: a wrong one is its AuthenticationError
    (Anthropic's error shape), a right one passes (the fake engine then refuses Messages, a
    400: the real answers are tests/e2e/test_anthropic.py); `auth_token` (Bearer) works too."""
    import anthropic

    def messages(**key: str) -> None:
        client = anthropic.Anthropic(base_url=server.base_url, max_retries=0, **key)
        client.messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
        )

    with pytest.raises(anthropic.AuthenticationError) as raised:
        messages(api_key=WRONG_KEY)
    assert raised.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert WRONG_KEY not in raised.value.response.text
    for key in ({"api_key": API_KEY}, {"auth_token": API_KEY}):
        with pytest.raises(anthropic.BadRequestError):
            messages(**key)


def test_pool_changes_need_the_admin_key_over_http(server: Server) -> None:
    pool = {"name": "sec-e2e", "gpus": {"cpu": 1}}
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        denied = http.post("/v1/pools", json=pool, headers={"Authorization": f"Bearer {API_KEY}"})
        assert denied.status_code == 403
        assert denied.json()["detail"]["code"] == "permission_denied"
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert http.post("/v1/pools", json=pool, headers=admin).status_code == 200
        listed = http.get("/v1/pools", headers={"Authorization": f"Bearer {API_KEY}"})
        assert "sec-e2e" in [p["name"] for p in listed.json()["pools"]]
        assert http.delete("/v1/pools/sec-e2e", headers=admin).status_code == 200


def curl(*arguments: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None:
        missing("curl is not installed")
    command = ["curl", "-sS", "--max-time", "10", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)


def test_curl_dashboard_sign_in_with_a_cookie(server: Server, tmp_path: Path) -> None:
    jar = str(tmp_path / "cookies")
    status = ["-o", "/dev/null", "-w", "%{http_code}"]
    dashboard = f"{server.base_url}/dashboard"
    assert curl(*status, dashboard).stdout == "401"
    page = curl(dashboard).stdout
    assert "<form" in page and 'name="key"' in page
    assert curl(*status, f"{dashboard}/api/state").stdout == "401"

    wrong = curl(*status, "-c", jar, "-d", f"key={WRONG_KEY}", f"{dashboard}/login")
    assert wrong.stdout == "401"
    headers = curl(
        "-D", "-", "-o", "/dev/null", "-c", jar, "-d", f"key={API_KEY}", f"{dashboard}/login"
    )
    assert " 303" in headers.stdout.splitlines()[0]
    cookie_line = next(
        line for line in headers.stdout.splitlines() if line.lower().startswith("set-cookie:")
    )
    assert "HttpOnly" in cookie_line and "SameSite=strict" in cookie_line
    assert API_KEY not in cookie_line
    assert "#HttpOnly_127.0.0.1" in Path(jar).read_text()  # curl stored it as a browser would

    assert curl(*status, "-b", jar, dashboard).stdout == "200"
    assert curl(*status, "-b", jar, f"{dashboard}/static/dashboard.js").stdout == "200"
    state = curl("-b", jar, f"{dashboard}/api/state").stdout
    assert '"workers"' in state
    # the cookie opens the dashboard only
    assert curl(*status, "-b", jar, f"{server.base_url}/v1/models").stdout == "401"
    curl("-o", "/dev/null", "-b", jar, "-c", jar, "-X", "POST", f"{dashboard}/logout")
    assert curl(*status, "-b", jar, f"{dashboard}/api/state").stdout == "401"


def test_curl_metrics_take_the_metrics_key(server: Server) -> None:
    status = ["-o", "/dev/null", "-w", "%{http_code}"]
    metrics = f"{server.base_url}/metrics"
    assert curl(*status, metrics).stdout == "401"
    assert curl(*status, "-H", f"Authorization: Bearer {API_KEY}", metrics).stdout == "401"
    scraped = curl("-H", f"Authorization: Bearer {METRICS_KEY}", metrics).stdout
    assert "poolserve_" in scraped
    health = f"{server.base_url}/health"
    assert curl(*status, health).stdout == "401"
    assert curl(*status, "-H", f"Authorization: Bearer {API_KEY}", health).stdout == "200"


SIE_SNIPPET = """
    out = {}
    out["generate"] = client.generate(MODEL, "Hello", max_new_tokens=2)
    out["stream"] = [c async for c in aclient.stream_generate(MODEL, "Hi", max_new_tokens=2)]
    out["health"] = client.get_capacity()
    out["create_pool"] = catch(client.create_pool, "sec-sie", gpus={"cpu": 1})
    return out
"""


ADMIN_SNIPPET = """
    client.create_pool("sec-sie", gpus={"cpu": 1})
    state = client.get_pool("sec-sie")["status"]["state"]
    return {"state": state, "deleted": catch(client.delete_pool, "sec-sie")}
"""


def test_sie_sdk_with_and_without_a_key(server: Server) -> None:
    inject = {"MODEL": MODEL}
    with pytest.raises(SIEFailure) as raised:
        run_sie(
            'return client.generate(MODEL, "Hello", max_new_tokens=2)',
            server.base_url,
            client_kwargs={"api_key": WRONG_KEY},
            inject=inject,
        )
    assert raised.value.is_a("RequestError")
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"

    result = run_sie(
        SIE_SNIPPET, server.base_url, client_kwargs={"api_key": API_KEY}, inject=inject
    )
    assert result["generate"]["text"] == "alpha beta "
    assert result["stream"]
    denied = result["create_pool"]
    assert denied["type"] == "PoolError" and "need an admin key" in denied["message"], denied

    admin = run_sie(ADMIN_SNIPPET, server.base_url, client_kwargs={"api_key": ADMIN_KEY})
    assert admin["state"] in ("pending", "active")
    assert admin["deleted"]["type"] is None, admin["deleted"]


def test_server_logs_hold_no_prompt_and_no_key(server: Server) -> None:
    """Its own requests, and those of the tests before it in this module, logged at INFO."""
    with httpx.Client(base_url=server.base_url, timeout=10) as http:
        http.post(
            "/v1/generate/org__fake-model",
            json={"prompt": SECRET_PROMPT, "max_new_tokens": 2, "stream": True},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        http.post(
            "/v1/generate/org__fake-model",
            json={"prompt": SECRET_PROMPT, "max_new_tokens": 2},
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        )
    messages = [record.getMessage() for record in server.records]
    assert any("/v1/generate/org__fake-model" in message for message in messages)  # access log
    logged = "\n".join(messages + [record.exc_text or "" for record in server.records])
    for secret in (SECRET_PROMPT, API_KEY, ADMIN_KEY, METRICS_KEY, WRONG_KEY):
        assert secret not in logged, secret


def test_browser_sign_in_and_out_of_the_dashboard(server: Server) -> None:
    """A real headless Chromium: the form, a wrong key, the right key (an HttpOnly SameSite=Strict
    cookie the page's script cannot read), the live dashboard, and "Sign out"."""
    with open_page() as page:
        page.goto(f"{server.base_url}/dashboard")
        wait_for(page, "document.querySelector('input[name=key]') !== null", 30, "the form")

        def submit(key: str) -> None:
            page.fill("input[name=key]", key)
            page.click("button[type=submit]")

        submit(WRONG_KEY)
        wait_for(
            page,
            "(document.querySelector('p.error') || {}).textContent === 'That key is not valid here.'",
            30,
            "the wrong key's message",
        )
        submit(API_KEY)
        wait_for(
            page,
            "location.pathname === '/dashboard' && Number(document.body.dataset.updates || 0) >= 2",
            60,
            "the dashboard's live updates",
        )
        assert page.evaluate("document.cookie") == ""  # HttpOnly: out of the page's reach
        (cookie,) = page.context.cookies(f"{server.base_url}/dashboard")
        assert cookie["name"] == "poolserve_session" and API_KEY not in cookie["value"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/dashboard"
        assert page.evaluate("document.getElementById('signout').hidden") is False
        screenshot(page, "dashboard-signed-in.png")

        page.click("#signout button")
        wait_for(page, "document.querySelector('input[name=key]') !== null", 30, "the form again")
        assert page.context.cookies(f"{server.base_url}/dashboard") == []
