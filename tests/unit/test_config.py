"""serve_config.yaml: Ray's own schema accepts it and its args validate into AppConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import AppConfig

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_serve_config_passes_rays_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = (
        ServeDeploySchema.model_validate(load())
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(load())
    )
    assert [app.import_path for app in schema.applications] == ["app.builder:build_app"]


def test_serve_config_args_validate() -> None:
    args = load()["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    assert config.models[0].source == "embedded:smollm2"
    assert [p.deployment_name for p in config.profiles] == ["Generator-cpu"]


@pytest.mark.parametrize(
    "args",
    [
        {"models": []},
        {"models": [{"id": "a", "profiles": ["gpu"]}]},
        {"profiles": [{"name": "cpu"}, {"name": "cpu"}]},
        {"unknown": 1},
        {"profiles": [{"name": "Bad Name"}]},
        {"models": [{"id": "a", "engine": {"dtype": "int3"}}]},
    ],
)
def test_bad_config_is_refused(args: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError):
        AppConfig.model_validate(args)


def test_a_change_outside_what_workers_read_keeps_their_init_args() -> None:
    """Serve restarts a replica whose init args change: the Generator gets only what its
    workers read, so such a redeploy keeps the engines serving."""
    base = {
        "models": [
            {"id": "org/a", "profiles": ["cpu"]},
            {"id": "org/b", "profiles": ["cpu", "l4"]},
        ],
        "profiles": [{"name": "cpu"}, {"name": "l4", "num_gpus": 1}],
    }

    def worker_args(**changes: object) -> dict[str, object]:
        return AppConfig.model_validate({**base, **changes}).for_workers("cpu").model_dump()

    unchanged = worker_args()
    assert [m["id"] for m in unchanged["models"]] == ["org/a", "org/b"]  # type: ignore[index]
    assert worker_args(ingress={"num_replicas": 2}) == unchanged
    assert worker_args(pools={"control_interval_seconds": 3}) == unchanged
    assert worker_args(drain_timeout_seconds=60) == unchanged
    assert (
        worker_args(profiles=[{"name": "cpu", "max_replicas": 4}, {"name": "l4", "num_gpus": 2}])
        == unchanged
    )
    assert worker_args(kv={"max_waiting_requests": 3}) != unchanged
    assert worker_args(models=[{"id": "org/a", "profiles": ["cpu"]}]) != unchanged


def test_rollout_surge_defaults_to_a_spare_worker_only_without_gpus() -> None:
    config = AppConfig.model_validate(
        {
            "models": [{"id": "org/a", "profiles": ["cpu", "l4"]}],
            "profiles": [
                {"name": "cpu"},
                {"name": "l4", "num_gpus": 1},
                {"name": "a10", "num_gpus": 1, "surge_percent": 50},
            ],
        }
    )
    assert [p.rollout_surge_percent for p in config.profiles] == [100, 0, 50]
