"""The config is validated once per process: the builder validates serve_config.yaml's args
into an AppConfig and binds that object to every deployment; a replica unpickles it (as Serve
hands it the init args) without validating it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray import cloudpickle

from app.config import AppConfig

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


class CountingValidator:
    """Stands in for AppConfig's pydantic validator, counting whole-model validations."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def validate_python(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real.validate_python(*args, **kwargs)


def test_the_builder_validates_once_and_replicas_unpickle_without_validating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    from app.builder import build_app

    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0].get("args") or {}
    counting = CountingValidator(AppConfig.__pydantic_validator__)
    monkeypatch.setattr(AppConfig, "__pydantic_validator__", counting)

    built = build_serve_app(build_app(args), name="poolserve")
    assert counting.calls == 1
    configs = []
    for deployment in built.deployments:
        # the bytes Serve's controller passes to each replica's constructor
        init_args = cloudpickle.loads(deployment._replica_config.serialized_init_args)
        assert isinstance(init_args[0], AppConfig), deployment.name
        configs.append(init_args[0])
    assert counting.calls == 1
    assert {"Ingress", "PoolAutoscaler", "TenantLedger"} <= {d.name for d in built.deployments}
    assert all(config == AppConfig.model_validate(args) for config in configs)


def test_a_pickled_config_is_not_validated_again() -> None:
    """An AppConfig whose state no validator would accept comes back from pickle unchanged:
    unpickling restores the fields, it does not run the validators."""
    config = AppConfig()
    object.__setattr__(config, "worker_heartbeat_seconds", -1.0)  # invalid: gt=0
    restored = cloudpickle.loads(cloudpickle.dumps(config))
    assert restored.worker_heartbeat_seconds == -1.0


def test_usage_shards_are_ledger_deployments_and_need_leased_limits() -> None:
    """`tenancy.usage_shards: 3`: TenantLedger (shard 0, bound to the other two) and
    TenantLedger-1, -2; every Generator is bound to all three (it bills to one of them)."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from app.builder import build_app

    built = build_serve_app(build_app({"tenancy": {"usage_shards": 3}}), name="poolserve")
    names = {d.name for d in built.deployments}
    assert {"TenantLedger", "TenantLedger-1", "TenantLedger-2"} <= names
    assert "TenantLedger-3" not in names
    for deployment in built.deployments:
        init_args = cloudpickle.loads(deployment._replica_config.serialized_init_args)
        if deployment.name.startswith("TenantLedger"):
            shard = 0 if deployment.name == "TenantLedger" else int(deployment.name[-1])
            assert init_args[2] == shard and len(init_args[3]) == (2 if shard == 0 else 0)
        elif deployment.name.startswith("Generator"):
            assert len(init_args[3]) == 3
    with pytest.raises(ValueError, match=r"usage_shards > 1 needs tenancy\.leased_limits"):
        AppConfig.model_validate({"tenancy": {"usage_shards": 2, "leased_limits": False}})
    for bad in (0, 65, "two"):
        with pytest.raises(ValueError, match="usage_shards"):
            AppConfig.model_validate({"tenancy": {"usage_shards": bad}})
