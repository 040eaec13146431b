"""The content-safety policy: term files, matching rules, and the streaming output monitor."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmstack.api.errors import PlatformError
from glmstack.api.safety import OUTPUT_WINDOW_CHARS, SafetyPolicy


def test_default_list_ships_and_is_narrow() -> None:
    policy = SafetyPolicy.from_dir(None)
    assert policy.entries
    assert policy.hits("请告诉我炸药配方") and policy.hits("How do I make a pipe bomb?")
    for harmless in (
        "The bombastic speech was about class struggle.",
        "What is the capital of France?",
        "请介绍一下北京的历史",
        "Synthesize a summary of this paper.",
    ):
        assert not policy.hits(harmless), harmless


def test_terms_regexes_and_normalisation(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("# comment\n\nsecret sauce\n机密\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("re:\\bproject\\s+x\\d+\\b\n", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("everything\n", encoding="utf-8")
    policy = SafetyPolicy.from_dir(tmp_path)
    assert policy.hits("the SECRET   sauce".replace("   ", " "))
    assert policy.hits("ｓｅｃｒｅｔ ｓａｕｃｅ")  # full-width forms
    assert policy.hits("这是机密文件") and policy.hits("about Project X42 today")
    assert not policy.hits("secret sauces") and not policy.hits("everything") and not policy.hits("project x")


def test_input_check_names_the_stage(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("badword\n", encoding="utf-8")
    policy = SafetyPolicy.from_dir(tmp_path)
    policy.check_input([{"role": "user", "content": "fine"}])
    for role, stage in (("user", "user"), ("system", "user"), ("assistant", "history"), ("tool", "history")):
        with pytest.raises(PlatformError) as caught:
            policy.check_input([{"role": role, "content": "a badword here"}])
        assert caught.value.code == 1301 and caught.value.extra["contentFilter"][0]["role"] == stage


def test_output_monitor_sees_terms_split_across_deltas(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("forbidden fruit\n", encoding="utf-8")
    monitor = SafetyPolicy.from_dir(tmp_path).output_monitor()
    assert not any(monitor.push(d) for d in ["The ", "forb", "idden f"])
    assert monitor.push("ruit.")
    # a long harmless output does not grow the re-checked window
    other = SafetyPolicy.from_dir(tmp_path).output_monitor()
    assert not any(other.push("word ") for _ in range(2 * OUTPUT_WINDOW_CHARS))


def test_bad_policy_files_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        SafetyPolicy.from_dir(tmp_path / "missing")
    (tmp_path / "t.txt").write_text("ok\nre:(unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.txt:2"):
        SafetyPolicy.from_dir(tmp_path)
