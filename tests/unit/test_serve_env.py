"""app/serve_env.py: the node environment, with direct ingress only when opted in, and its fixed
ports replaced by free ones per cluster unless the environment names them."""

from __future__ import annotations

import socket

import pytest

from app.serve_env import DIRECT_INGRESS_ENV, HAPROXY_PORTS, SERVE_ENV, serve_env


def test_serve_settings_only_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*DIRECT_INGRESS_ENV, *HAPROXY_PORTS):
        monkeypatch.delenv(name, raising=False)
    assert serve_env() == SERVE_ENV


def test_direct_ingress_brings_its_settings_and_free_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in HAPROXY_PORTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # named: kept
    env = serve_env()
    assert DIRECT_INGRESS_ENV.items() <= env.items()
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    chosen = [int(env[name]) for name in HAPROXY_PORTS[1:]]
    assert len(set(chosen)) == len(chosen) and not {9101, 8500, 9500} & set(chosen)
    for port in chosen:  # free: bindable on every interface, as HAProxy and the proxy bind them
        with socket.socket() as sock:
            sock.bind(("", port))
