"""A model's recommended sampling, read from its own files (engine/loading/generation_config.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.catalog import bundled_model_path
from glmstack.engine.loading.checkpoint import Checkpoint, open_checkpoint
from glmstack.engine.loading.generation_config import generation_defaults
from glmstack.protocol import GenerationDefaults


def hf_folder(tmp_path: Path, generation_config: dict | str | None) -> Checkpoint:
    if generation_config is not None:
        text = generation_config if isinstance(generation_config, str) else json.dumps(generation_config)
        (tmp_path / "generation_config.json").write_text(text)
    return Checkpoint(tmp_path, "safetensors", {"model_type": "llama"}, [])


def test_generation_config_json(tmp_path: Path) -> None:
    # GLM-4-9B-Chat's own file
    ckpt = hf_folder(tmp_path, {"eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
                                "do_sample": True, "temperature": 0.8, "max_length": 128000, "top_p": 0.8})
    assert generation_defaults(ckpt) == GenerationDefaults(0.8, 0.8, None, "generation_config.json")
    ckpt = hf_folder(tmp_path, {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 512})
    assert generation_defaults(ckpt) == GenerationDefaults(0.6, 0.95, 512, "generation_config.json")


@pytest.mark.parametrize("config", [None, {"do_sample": False, "temperature": 0.3},
                                    {"temperature": 7, "top_p": "high", "max_new_tokens": -1}])
def test_no_usable_recommendation_means_none(tmp_path: Path, config: dict | None) -> None:
    ckpt = hf_folder(tmp_path, config)
    defaults = generation_defaults(ckpt)
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (None, None, None)


def test_a_broken_generation_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="generation_config.json.*not valid JSON"):
        generation_defaults(hf_folder(tmp_path, "{not json"))


def test_gguf_sampling_metadata_then_the_model_card_table(tmp_path: Path) -> None:
    meta = {"general.basename": "smollm2", "general.sampling.temp": 0.6, "general.sampling.top_p": 0.95}
    assert generation_defaults(Checkpoint(tmp_path / "m.gguf", "gguf", meta, [])) == GenerationDefaults(
        0.6, 0.95, None, "GGUF general.sampling")
    meta = {"general.basename": "SmolLM2"}
    assert generation_defaults(Checkpoint(tmp_path / "m.gguf", "gguf", meta, [])) == GenerationDefaults(
        0.2, 0.9, None, "model card: SmolLM2")
    assert generation_defaults(Checkpoint(tmp_path / "m.gguf", "gguf", {"general.basename": "x"}, [])) == (
        GenerationDefaults())


def test_the_bundled_model() -> None:
    path = bundled_model_path()
    assert path is not None
    assert generation_defaults(open_checkpoint(path)) == GenerationDefaults(0.2, 0.9, None, "model card: SmolLM2")
