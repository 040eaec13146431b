"""Settings come from GLMSTACK_* variables; bad values name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmstack.settings import Settings


def test_defaults(tmp_path: Path):
    s = Settings.from_env({"GLMSTACK_HOME": str(tmp_path)})
    assert s.home == tmp_path
    assert s.database_url == f"sqlite:///{tmp_path}/glmstack.db"
    assert (s.host, s.port, s.model, s.quantize, s.safety_dir) == ("127.0.0.1", 8000, None, "auto", None)
    assert (s.max_body_bytes, s.max_concurrency_per_key, s.max_queue, s.max_messages) == (4 << 20, None, 64, 256)
    assert (s.kv_cache_mb, s.native, s.native_dir, s.vnni) == (512, True, None, True)
    assert s.max_tokens_cap is None and s.shutdown_grace_s == 30


def test_home_defaults_to_dot_glmstack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({}).home == tmp_path / ".glmstack"


def test_values_from_env(tmp_path: Path):
    s = Settings.from_env({
        "GLMSTACK_HOME": str(tmp_path), "GLMSTACK_DATABASE_URL": "postgresql://u@db/glm",
        "GLMSTACK_PORT": "0",
        "GLMSTACK_MODEL": "glm-4-9b", "GLMSTACK_QUANTIZE": "int4", "GLMSTACK_MAX_TOKENS_CAP": "1024",
        "GLMSTACK_SAFETY_DIR": str(tmp_path / "lists"), "GLMSTACK_LOG_LEVEL": "debug", "GLMSTACK_DEVICE": "",
    })
    assert s.database_url == "postgresql://u@db/glm" and s.port == 0 and s.model == "glm-4-9b"
    assert s.quantize == "int4" and s.max_tokens_cap == 1024 and s.safety_dir == tmp_path / "lists"
    assert s.log_level == "DEBUG" and s.device == "auto"  # empty counts as unset


def test_engine_values_from_env(tmp_path: Path):
    s = Settings.from_env({
        "GLMSTACK_HOME": str(tmp_path), "GLMSTACK_KV_CACHE_MB": "64", "GLMSTACK_NATIVE": "0",
        "GLMSTACK_NATIVE_DIR": str(tmp_path / "build"), "GLMSTACK_VNNI": "off",
        "GLMSTACK_MAX_CONCURRENCY_PER_KEY": "3", "GLMSTACK_MODEL_ALIASES": "my-model=glm-4, gpt-4o-mini = glm-4.5",
        "GLMSTACK_SHUTDOWN_GRACE_S": "2.5",
    })
    assert s.shutdown_grace_s == 2.5
    assert s.model_aliases == {"my-model": "glm-4", "gpt-4o-mini": "glm-4.5"}
    assert (s.kv_cache_mb, s.native, s.native_dir, s.vnni) == (64, False, tmp_path / "build", False)
    assert s.max_concurrency_per_key == 3 and s.models_dir == tmp_path / "models"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GLMSTACK_PORT", "eighty", "GLMSTACK_PORT must be an integer"),
    ("GLMSTACK_MAX_QUEUE", "-1", "GLMSTACK_MAX_QUEUE must be at least 0"),
    ("GLMSTACK_QUANTIZE", "int3", "GLMSTACK_QUANTIZE must be one of auto, none, int8, int4"),
    ("GLMSTACK_NATIVE", "maybe", "GLMSTACK_NATIVE must be 1 or 0"),
    ("GLMSTACK_KV_CACHE_MB", "0", "GLMSTACK_KV_CACHE_MB must be at least 1"),
    ("GLMSTACK_MAX_CONCURRENCY_PER_KEY", "0", "GLMSTACK_MAX_CONCURRENCY_PER_KEY must be at least 1"),
    ("GLMSTACK_MODEL_ALIASES", "my-model", "GLMSTACK_MODEL_ALIASES must be name=target pairs"),
    ("GLMSTACK_SHUTDOWN_GRACE_S", "soon", "GLMSTACK_SHUTDOWN_GRACE_S must be a number"),
    ("GLMSTACK_SHUTDOWN_GRACE_S", "-1", "GLMSTACK_SHUTDOWN_GRACE_S must be at least 0"),
    ("GLMSTACK_SHUTDOWN_GRACE_S", "inf", "GLMSTACK_SHUTDOWN_GRACE_S must be a number"),
])
def test_bad_values_name_the_variable(name: str, value: str, message: str):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})
