"""What the source tree may not do with model files, checked on its syntax tree, and the dependency floors
the hardening relies on."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "glmstack"
SANDBOX = PACKAGE / "engine" / "chat_format" / "jinja_sandbox.py"  # the one place Jinja environments are made
FLOORS = {  # distribution -> lowest safe version, and why
    "jinja2": ("3.1.6", "sandbox escapes through str.format and |attr fixed in 3.1.5/3.1.6"),
    "python-multipart": ("0.0.18", "CVE-2024-53981: form parsing DoS"),
    "torch": ("2.6", "CVE-2025-32434: torch.load(weights_only=True) could run code"),
}
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
JINJA_UNSANDBOXED = {"Environment", "Template", "SandboxedEnvironment", "NativeEnvironment"}
JINJA_ANY = JINJA_UNSANDBOXED | {"ImmutableSandboxedEnvironment"}  # that one only in SANDBOX


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value == value for k in call.keywords
    )


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(package.parent)
        jinja_forbidden = JINJA_UNSANDBOXED if path == SANDBOX else JINJA_ANY
        for node in ast.walk(tree):
            line = f"{where}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = {alias.name for alias in node.names}
                if module in UNPICKLERS or names & UNPICKLERS:
                    found.append(f"{line}: imports an unpickler ({module or ', '.join(names & UNPICKLERS)})")
                if module and module.startswith("jinja2") and names & jinja_forbidden:
                    found.append(
                        f"{line}: imports {', '.join(sorted(names & jinja_forbidden))} from {module}"
                    )
            if (
                isinstance(node, ast.Attribute)
                and node.attr in jinja_forbidden
                and dotted(node).startswith("jinja2")
            ):
                found.append(f"{line}: uses {dotted(node)}")
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            if name == "torch.load" and not keyword_is(node, "weights_only", True):
                found.append(f"{line}: torch.load without weights_only=True")
            if name in {"np.load", "numpy.load"} and keyword_is(node, "allow_pickle", True):
                found.append(f"{line}: numpy.load with allow_pickle=True")
            if name in {"exec", "eval", "__import__", "compile"} or name.endswith("spec_from_file_location"):
                found.append(f"{line}: {name}() can run code from a checkpoint folder")
            if name in jinja_forbidden:
                found.append(f"{line}: {name}()")
            if any(k.arg == "trust_remote_code" for k in node.keywords):
                found.append(f"{line}: trust_remote_code")
    return found


def test_no_pickle_loading_unsandboxed_jinja_or_remote_code() -> None:
    assert violations() == []


def test_the_checks_above_catch_what_they_should(tmp_path: Path) -> None:
    bad = tmp_path / "glmstack" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle\nimport jinja2\nimport torch\n"
        "from jinja2.sandbox import ImmutableSandboxedEnvironment\n"
        "pickle.loads(b'')\ntorch.load('x')\njinja2.Environment()\nImmutableSandboxedEnvironment()\n"
        "exec('1')\nf(trust_remote_code=True)\ntorch.load('x', weights_only=True)\n"
    )
    found = "\n".join(violations(bad.parent))
    for expected in ("bad.py:1: imports an unpickler", "bad.py:4: imports ImmutableSandboxedEnvironment",
                     "bad.py:6: torch.load", "bad.py:7: uses jinja2.Environment",
                     "bad.py:8: ImmutableSandboxedEnvironment()", "bad.py:9: exec()",
                     "bad.py:10: trust_remote_code"):  # fmt: skip
        assert expected in found
    assert "bad.py:11" not in found


def test_chat_templates_never_come_from_requests() -> None:
    for path in [*(PACKAGE / "api").rglob("*.py"), PACKAGE / "protocol.py"]:
        text = path.read_text(encoding="utf-8")
        assert "chat_template" not in text and "TemplateChatFormat" not in text, path


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


@pytest.mark.parametrize("distribution", FLOORS)
def test_dependency_floor(distribution: str) -> None:
    floor, why = FLOORS[distribution]
    installed = importlib.metadata.version(distribution)
    assert version(installed) >= version(floor), f"{distribution} {installed} < {floor}: {why}"
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(
        r for r in requirements if re.match(rf"{re.escape(distribution)}\s*[<>=!~]", r, re.IGNORECASE)
    )
    pinned = re.search(r"(?:>=|==|~=)\s*([\d.]+)", spec)
    assert pinned and version(pinned.group(1)) >= version(floor), f"pyproject allows {spec!r}: {why}"
