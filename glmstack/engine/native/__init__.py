"""Native CPU kernels: int8 / int4 weight-only linears (with RMSNorm, SiLU·mul and the residual add
fused in) and paged attention (decoding and prompt rows), in `kernels.cpp`.

PyTorch's fused weight-only kernels move 6–9 GB/s on the narrow matrices of small models, and a decode
step is ~1,300 small ATen ops; these kernels read the weights at memory bandwidth and let a decoder layer
run as five calls. They are compiled on first use with `torch.utils.cpp_extension.load` (ninja + a C++
compiler; ~20 s once, then cached: see `build_dir()`), for x86 CPUs with AVX-512 only.
Threads come from ATen's pool (`at::parallel_for`), so `torch.set_num_threads` governs them.

`kernels()` returns the module, or None when it cannot be used — no AVX-512, no compiler, a failed build,
or turned off (`GLMSTACK_NATIVE=0`, through `configure`) — after logging the reason
once; callers then take the ATen path.

Where the CPU has AVX512-VNNI (checked at run time) the int8 and int4 linears quantize activations to int8
(blocks of 32) and sum in int32, for any number of rows: a row's result is the same bits whether the call
holds it alone or beside 500 prompt rows, so a greedy answer does not depend on the prefix cache or on the
other requests of a step. Without VNNI they work on fp32 activations. `vnni=False` (`GLMSTACK_VNNI=0`,
applied when the module is built) or `kernels().set_vnni(False)` selects the fp32 paths anyway, e.g. to
compare the two; `kernels().activation_path()` says which is in use ("vnni" or "fp32"); `vnni_rows()` tells
the Python side whether to send every row to the kernels.

`glmstack.load()` calls `configure` with its Settings' options before anything is built; `set_enabled`
is the switch tests and benchmarks flip to compare with the ATen path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.cpp")  # compiled; it includes the headers beside it
_HEADERS = ("int4_lanes.h", "int8_lanes.h")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fno-math-errno",
          # at::parallel_for is inline: without -fopenmp its `#pragma omp parallel` compiles to nothing. The
          # module then links libgomp.so.1, which resolves to the copy torch has already loaded (one pool).
          "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_enabled = True  # tests flip this (set_enabled) to exercise the ATen fallback


@dataclass(frozen=True)
class NativeOptions:
    enabled: bool = True  # False: never build, always the ATen path
    build_dir: Path | None = None  # None: torch's extension cache (see build_dir())
    vnni: bool = True  # False: the int8 / int4 kernels keep fp32 activations


_options = NativeOptions()


def configure(options: NativeOptions) -> None:
    """Apply the settings (GLMSTACK_NATIVE, GLMSTACK_NATIVE_DIR, GLMSTACK_VNNI). A module already built
    stays built; `enabled=False` stops its use and `vnni` switches its activation path."""
    global _options
    _options = options
    module = _state.get("module")
    if module is not None:
        module.set_vnni(options.vnni)  # (it stays off where the CPU has no VNNI)


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be built here, without trying to build them."""
    if not _options.enabled:
        return "disabled (GLMSTACK_NATIVE=0)"
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"the CPU has no AVX-512 (torch reports {capability})"
    return None


def _key() -> str:
    # One build per source + flags + torch version: a stale build is never loaded.
    sources = b"".join(path.read_bytes() for path in _sources())
    key = hashlib.sha256(sources + " ".join(_FLAGS).encode() + torch.__version__.encode())
    return key.hexdigest()[:12]


def build_dir() -> Path:
    """The configured `build_dir` (`GLMSTACK_NATIVE_DIR`), else torch's extension cache (its own
    `TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions): shared by every GLMSTACK_HOME, so a server
    with a fresh home (tests do that) doesn't compile again."""
    torch_root = os.environ.get("TORCH_EXTENSIONS_DIR")  # torch's own variable, as cpp_extension reads it
    base = _options.build_dir or (Path(torch_root) if torch_root else Path.home() / ".cache" / "torch_extensions")
    return base / "glmstack_native" / _key()


def _sources() -> list[Path]:
    return [_SOURCE] + [_SOURCE.with_name(name) for name in _HEADERS]


def _source_copy(directory: Path) -> Path:
    """kernels.cpp and its headers inside the build folder, compiled from there: the build rules name the
    source's path, so compiling the checkout's own file would make every checkout (or install) rebuild the
    others' build. The folder is keyed by the sources' content, so its copies are always the same files."""
    for original in _sources():
        copy = directory / original.name
        content = original.read_bytes()
        if not copy.is_file() or copy.read_bytes() != content:
            partial = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
            partial.write_bytes(content)
            os.replace(partial, copy)  # atomic: a concurrent build sees the old file or the whole new one
    return directory / _SOURCE.name


def is_built() -> bool:
    """Whether a build of this source is loaded or on disk (then `kernels()` takes a moment, not a compile)."""
    return _state.get("module") is not None or any(build_dir().glob("*.so"))


def _build() -> ModuleType | None:
    reason = unavailable_reason()
    if reason:
        log.info("native decode kernels off: %s; using the ATen kernels", reason)
        return None
    try:
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        source = _source_copy(directory)
        module = cpp_extension.load(name=f"glmstack_native_{_key()}", sources=[str(source)], extra_cflags=_FLAGS,
                                    extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compile error: everything still runs on ATen
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "error" in line.lower() and "Error building" not in line),
                      lines[-1] if lines else "")
        log.warning("native decode kernels unavailable (%s: %s); using the ATen kernels",
                    type(exc).__name__, detail.strip()[:500])
        return None
    if not _options.vnni:
        module.set_vnni(False)
    log.info("native kernels ready (activations: %s)", module.activation_path())
    return module


def kernels() -> ModuleType | None:
    """The compiled module (building it on first call), or None where it can't be used."""
    if not (_enabled and _options.enabled):
        return None
    try:
        return _state["module"]
    except KeyError:
        pass
    with _lock:
        if "module" not in _state:
            _state["module"] = _build()
    return _state["module"]


def available() -> bool:
    return kernels() is not None


def vnni_rows() -> bool:
    """Whether the int8 / int4 kernels are on their VNNI path, which takes any number of rows with one
    numerics (the quantized linears then send prompts there too, not to dequantize + GEMM)."""
    module = kernels()
    return module is not None and module.activation_path() == "vnni"


def set_enabled(enabled: bool) -> bool:
    """Turn the native kernels on or off for this process (new calls only); returns the previous setting.
    Int4 weights packed while they were on keep the native layout, which the ATen fallback also reads."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous
