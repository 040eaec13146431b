"""The dependency rules of docs/architecture.md, checked in a clean interpreter each:

- the engine (every module) never loads the HTTP or database stack;
- the platform (api, store, knowledge, protocol, settings) never loads torch or numpy;
- the pure-Python bookkeeping of the serving engine (scheduler, block allocator, step budget) loads no torch;
- building the CLI's parser loads none of the heavy stacks (every command pays for it);
- only glmstack/settings.py reads GLMSTACK_* variables.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import glmstack

PACKAGE_DIR = Path(glmstack.__file__).parent
HTTP_AND_DATABASE = ["fastapi", "starlette", "sqlalchemy", "httpx", "pydantic", "uvicorn", "alembic", "psycopg"]
TENSORS = ["torch", "numpy"]


def modules_under(package: str) -> list[str]:
    """Every module of a glmstack subpackage, found on disk (so a new file is covered without listing it)."""
    folder = PACKAGE_DIR / package.removeprefix("glmstack.").replace(".", "/")
    names = [package]
    for info in pkgutil.walk_packages([str(folder)], prefix=f"{package}."):
        if ".migrations" not in info.name and not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def loaded_after_importing(modules: list[str], code: str = "") -> set[str]:
    """Top-level package names in sys.modules after importing `modules` (and running `code`) in a fresh
    interpreter."""
    script = "\n".join([
        "import importlib, json, sys",
        f"for name in {modules!r}:",
        "    importlib.import_module(name)",
        code,
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))",
    ])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_the_module_lists_are_not_empty() -> None:
    # walk_packages finding nothing would make the checks below vacuous
    engine = set(modules_under("glmstack.engine"))
    assert {"glmstack.engine.kv_cache", "glmstack.engine.models.llama", "glmstack.engine.serving.core",
            "glmstack.engine.quant.int4", "glmstack.engine.native.fused_decoder"} <= engine
    assert {"glmstack.api.app", "glmstack.api.routes.chat"} <= set(modules_under("glmstack.api"))
    assert {"glmstack.store.keys", "glmstack.store.usage"} <= set(modules_under("glmstack.store"))


def test_engine_never_loads_the_http_or_database_stack() -> None:
    loaded = loaded_after_importing(modules_under("glmstack.engine"))
    assert "torch" in loaded  # the imports really happened
    assert loaded.isdisjoint(HTTP_AND_DATABASE), sorted(loaded & set(HTTP_AND_DATABASE))


@pytest.mark.parametrize("package", ["glmstack.api", "glmstack.store", "glmstack.knowledge", "glmstack.jobs"])
def test_platform_never_loads_torch_or_numpy(package: str) -> None:
    modules = [*modules_under(package), "glmstack.protocol", "glmstack.settings", "glmstack.durable"]
    loaded = loaded_after_importing(modules)
    assert ("fastapi" if package == "glmstack.api" else "sqlalchemy") in loaded  # the imports really happened
    assert loaded.isdisjoint(TENSORS), sorted(loaded & set(TENSORS))


def test_scheduler_and_block_allocator_are_plain_python() -> None:
    loaded = loaded_after_importing(["glmstack.engine.serving.scheduler", "glmstack.engine.serving.block_allocator",
                                     "glmstack.engine.serving.step_budget"])
    assert "torch" not in loaded


def test_training_stays_out_of_the_server() -> None:
    # fine-tuning runs as its own process (python -m glmstack.finetune); peft brings transformers (~3 s)
    server = [*modules_under("glmstack.api"), *modules_under("glmstack.jobs"), *modules_under("glmstack.engine"),
              "glmstack.cli.serve"]
    loaded = loaded_after_importing(server)
    assert loaded.isdisjoint({"peft", "transformers"}), sorted(loaded & {"peft", "transformers"})


def test_building_the_cli_parser_loads_no_heavy_stack() -> None:
    loaded = loaded_after_importing(["glmstack.cli.main"], "sys.modules['glmstack.cli.main'].build_parser()")
    heavy = set(TENSORS + HTTP_AND_DATABASE)
    assert loaded.isdisjoint(heavy), sorted(loaded & heavy)


def is_variable_name(node: ast.expr) -> bool:
    if isinstance(node, ast.JoinedStr) and node.values:  # f"GLMSTACK_{name}"
        node = node.values[0]
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("GLMSTACK_")


def environment_reads(path: Path) -> list[str]:
    """Lookups of a GLMSTACK_* name in one file, as "line: name": `<anything>.get("GLMSTACK_X")`,
    `os.getenv(...)`, `<anything>["GLMSTACK_X"]`, `"GLMSTACK_X" in <anything>` (whatever the mapping is
    called: `env = os.environ` first must not hide a read)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[ast.expr] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv"):
            names = node.args[:1]
        elif isinstance(node, ast.Subscript):
            names = [node.slice]
        elif isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops):
            names = [node.left]
        for name in names:
            if is_variable_name(name):
                found.append(f"{node.lineno}: {ast.unparse(name).strip(chr(39) + chr(34))}")
    return found


def test_only_settings_reads_glmstack_variables() -> None:
    readers = {str(p.relative_to(PACKAGE_DIR)): environment_reads(p) for p in PACKAGE_DIR.rglob("*.py")}
    assert readers.pop("settings.py")  # the one reader (which the scan must see)
    assert {path: reads for path, reads in readers.items() if reads} == {}


def test_the_environment_scan_finds_reads(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('import os\na = os.environ.get("GLMSTACK_A")\nb = os.getenv("GLMSTACK_B")\n'
                      'c = os.environ["GLMSTACK_C"]\nd = "GLMSTACK_D" in os.environ\nenv = os.environ\n'
                      'e = env.get("GLMSTACK_E", "")\nf = os.environ.get("HOME")\n')
    assert environment_reads(sample) == ["2: GLMSTACK_A", "3: GLMSTACK_B", "4: GLMSTACK_C", "5: GLMSTACK_D",
                                         "7: GLMSTACK_E"]
