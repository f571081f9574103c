"""A tiny LoRA adapter for the embedded default model, built by the project itself (seeded
random weights on q_proj/v_proj, PEFT file layout), so the multi-LoRA path is tested for real
without a download. Its effect is to change what the model says, reproducibly."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile

from app.engine.default_model import ensure_default_model, model_cache_dir

EMBEDDED_LORA_SOURCE = "embedded:smollm2-demo-lora"
RANK = 8
ALPHA = 16
SEED = 1234
SCALE = 0.15
MARKER = ".poolserve-complete"


def demo_lora_dir() -> pathlib.Path:
    return model_cache_dir() / "loras" / "smollm2-demo"


def ensure_demo_lora() -> pathlib.Path:
    """Build the adapter once (atomically); returns its directory."""
    target = demo_lora_dir()
    if (target / MARKER).is_file():
        return target
    import torch
    from safetensors.torch import save_file

    config = json.loads((ensure_default_model(lambda _: None) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    shapes = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, out_features in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(RANK, hidden, generator=generator) * SCALE
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(out_features, RANK, generator=generator) * SCALE
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".demo-lora-", dir=target.parent))
    save_file(tensors, str(staging / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(shapes),
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    (staging / MARKER).write_text("ok\n")
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o644)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def resolve_lora_source(source: str) -> str:
    return str(ensure_demo_lora()) if source == EMBEDDED_LORA_SOURCE else source
