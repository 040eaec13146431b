#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the benchmark peer of bench_servers.py) from the sources vendored in the
# llama-cpp-python sdist on PyPI: cmake + ninja, CPU only, native flags. Bench-only, never a glmstack
# dependency. About 10 minutes on 2 cores, once: the binary is cached by version and printed on stdout.
#   LLAMA_SERVER="$(bash benchmarks/build_llama_server.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${GLMSTACK_BENCH_CACHE:-$HOME/.cache/glmstack-bench}/llama-server-$VERSION"
BINARY="$CACHE/build/bin/llama-server"
say() { echo "build_llama_server.sh: $*" >&2; }

if [ -x "$BINARY" ]; then
  echo "$BINARY"
  exit 0
fi
PYTHON=.venv/bin/python
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$CACHE"
if [ ! -d "$CACHE/src" ]; then
  say "downloading the llama-cpp-python $VERSION sdist"
  "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$CACHE/download"
  tar xzf "$CACHE/download/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
  mv "$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp" "$CACHE/src"
  rm -rf "$CACHE/llama_cpp_python-$VERSION" "$CACHE/download"
fi
GENERATOR=()
if command -v ninja >/dev/null || [ -x .venv/bin/ninja ]; then
  GENERATOR=(-G Ninja)
  PATH="$PWD/.venv/bin:$PATH"
fi
say "configuring and building llama-server (about 10 minutes on 2 cores)"
cmake -S "$CACHE/src" -B "$CACHE/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$CACHE/build" --target llama-server -j "$(nproc)" >&2
echo "$BINARY"
