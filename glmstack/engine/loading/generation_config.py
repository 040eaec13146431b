"""A model's recommended sampling (`protocol.GenerationDefaults`), from its own files:

1. `generation_config.json` beside an HF checkpoint (`temperature`, `top_p`, `max_new_tokens`; ignored when it
   says `do_sample: false`, which is greedy by default, not a recommendation for sampled requests);
2. a GGUF's `general.sampling.temp` / `general.sampling.top_p` (llama.cpp writes them when the model card has
   them);
3. the table below, keyed by the GGUF's `general.basename`, for models whose card recommends values that their
   files do not carry.

A checkpoint with none of these gets no defaults: the platform's documented ones (0.95 / 0.7) apply.
"""

from __future__ import annotations

from typing import Any

from glmstack.engine.loading.checkpoint import Checkpoint
from glmstack.engine.loading.json_files import read_json
from glmstack.protocol import GenerationDefaults

# general.basename -> (temperature, top_p, where it is written)
MODEL_CARD_DEFAULTS: dict[str, tuple[float, float, str]] = {
    # huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct: its usage example samples with temperature=0.2, top_p=0.9
    "smollm2": (0.2, 0.9, "model card: SmolLM2"),
}


def generation_defaults(ckpt: Checkpoint) -> GenerationDefaults:
    if ckpt.format == "gguf":
        return _from_gguf(ckpt.config)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    config = read_json(folder / "generation_config.json", missing_ok=True)
    if not config or config.get("do_sample") is False:
        return GenerationDefaults()
    return GenerationDefaults(
        temperature=_number(config.get("temperature"), 0.0, 1.0),
        top_p=_number(config.get("top_p"), 0.0, 1.0),
        max_tokens=_whole(config.get("max_new_tokens")),
        source="generation_config.json",
    )


def _from_gguf(meta: dict[str, Any]) -> GenerationDefaults:
    temperature = _number(meta.get("general.sampling.temp"), 0.0, 1.0)
    top_p = _number(meta.get("general.sampling.top_p"), 0.0, 1.0)
    if temperature is not None or top_p is not None:
        return GenerationDefaults(temperature, top_p, source="GGUF general.sampling")
    card = MODEL_CARD_DEFAULTS.get(str(meta.get("general.basename", "")).lower())
    if card is not None:
        return GenerationDefaults(card[0], card[1], source=card[2])
    return GenerationDefaults()


def _number(value: Any, low: float, high: float) -> float | None:
    """A float within the API's own range, or None (absent, mistyped or out of range: the file is not
    trusted to set what a request could not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if low <= value <= high else None


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
