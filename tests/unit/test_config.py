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
