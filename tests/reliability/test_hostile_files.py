"""Hostile model files and chat templates: each is refused with one clean error naming the file, within 5 s
and 512 MB, in a forked child that exits normally; nothing in them runs; and the bundled model still loads.

See hostile_files.py for the cases and forked_child.py for how a child is run and watched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked_child import REPORTS, RSS_LIMIT, TIME_LIMIT_S, ChildReport, run_in_child
from hostile_files import CASES, MARKER, HostileCase, config

from glmstack.engine.chat_format import TemplateChatFormat
from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.catalog import bundled_model_path
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module", autouse=True)
def warm_parent(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Import in the parent what each child would otherwise import for itself (torch's meta-device and
    weights-only unpickler machinery, about a second), so a child's time is its own work."""
    folder = tmp_path_factory.mktemp("warm")
    config(folder)
    torch.save({"model.norm.weight": torch.zeros(8)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="missing"):
        load_model(folder, device="cpu")


def check_refusal(
    report: ChildReport, expected_error: str, request: pytest.FixtureRequest, name: str
) -> None:
    request.config.stash.setdefault(REPORTS, []).append((name, report))
    assert not report.killed, f"{name}: {report.killed}"
    assert report.exitcode == 0, f"{name}: child exited with {report.exitcode}"
    assert report.error == expected_error, f"{name}: {report.error}: {report.message}"
    assert report.seconds < TIME_LIMIT_S
    assert report.growth <= RSS_LIMIT, f"{name}: RSS grew {report.growth / 2**20:.0f} MB"
    assert "\n" not in report.message


def test_there_are_enough_distinct_cases() -> None:
    assert len(CASES) >= 50
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_file_is_refused(case: HostileCase, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = case.build(folder)
    report = run_in_child(load_model, path, device="cpu")
    check_refusal(report, "ModelFileError", request, case.name)
    assert str(folder) in report.message, "the message must name the file"
    assert case.expect in report.message, f"refused for another reason: {report.message}"
    assert not (folder / MARKER).exists() and not (tmp_path / MARKER).exists()


# ---- chat templates from model files -----------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "str class mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "joiner globals": "{{ joiner.__init__.__globals__ }}",
    "namespace globals": "{{ namespace.__init__.__globals__['os'] }}",
    "self context": "{{ self._TemplateReference__context.environment }}",
    "message dict class": "{{ messages[0].__class__.__base__.__subclasses__() }}",
    "format attribute walk": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "attr filter": "{{ messages|attr('__class__') }}",
    "mutate messages": "{{ messages.append({'role': 'system', 'content': 'injected'}) }}",
    "mutate a dict": "{{ messages[0].update({'content': 'injected'}) }}",
    "nested loops past the time limit": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
    "output into a set block": "{% set x %}{% for i in range(100000) %}{{ 'a' * 4000000 }}{% endfor %}"
    "{% endset %}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "a huge width": "{{ '%999999999d' % 1 }}",
    "a huge center": "{{ 'x'|center(1000000000) }}",
    "a huge replace": "{{ ('a' * 4000000)|replace('a', 'a' * 4000000) }}",
    "a huge join": "{{ (['a' * 4000000] * 1000)|join }}",
    "a huge batch": "{{ [1]|batch(1000000000, 'x')|list }}",
    "a huge power": "{{ 9 ** 999999999 }}",
    "recursive macro": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "expression nested 30000 deep": "{{ " + "[" * 30_000 + "]" * 30_000 + " }}",
    "blocks nested 3000 deep": "{% if 1 %}" * 3000 + "{% endif %}" * 3000,
    "a 1.4 MB template": "{{ x }}" * 200_000,  # compiling it would take ~45 s
}


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_from_gguf(bundled_model_path())


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_template_is_refused(name: str, tokenizer, tmp_path: Path, monkeypatch, request) -> None:
    monkeypatch.chdir(tmp_path)  # a relative `touch PWNED` would land here

    def render() -> None:
        TemplateChatFormat(tokenizer, HOSTILE_TEMPLATES[name]).render([{"role": "user", "content": "hi"}])

    report = run_in_child(render)
    check_refusal(report, "ChatTemplateError", request, f"template: {name}")
    assert not (tmp_path / MARKER).exists()


# ---- through the CLI, and afterwards -----------------------------------------------------------------------


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    chosen = ["gguf: the 49-byte file with an array of 2**63 u8", "safetensors: header length 2**63",
              "pickle: torch zip calling posix.system"]  # fmt: skip
    runs = []
    for number, case in enumerate(c for c in CASES if c.name in chosen):
        folder = tmp_path / f"m{number}"
        folder.mkdir()
        path = case.build(folder)
        command = [sys.executable, "-m", "glmstack.cli.main", "chat", "--model", str(path), "-p", "hi"]
        runs.append(
            (folder, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        )
    assert len(runs) == len(chosen)
    for folder, process in runs:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, stderr
        assert stderr.startswith("glmstack: error: ") and stderr.count("\n") == 1, stderr
        assert str(folder) in stderr and "Traceback" not in stderr and stdout == ""
        assert not (folder / MARKER).exists()


def test_bundled_model_still_loads() -> None:
    loaded = load_model(bundled_model_path(), device="cpu")
    with torch.no_grad():
        logits = loaded.module(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert logits.shape[-1] >= 49152 and torch.isfinite(logits).all()
