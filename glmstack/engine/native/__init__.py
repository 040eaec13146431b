"""Native CPU decode kernels: int8 / int4 weight-only GEMV (with RMSNorm, SiLU·mul and the residual add
fused in) and paged decode attention, in `kernels.cpp`.

PyTorch's fused weight-only kernels move 6–9 GB/s on the narrow matrices of small models, and a decode
step is ~1,300 small ATen ops; these kernels read the weights at memory bandwidth and let a decoder layer
run as five calls. They are compiled on first use with `torch.utils.cpp_extension.load` (ninja + a C++
compiler; ~20 s once, then cached: see `build_dir()`), for x86 CPUs with AVX-512 only.
Threads come from ATen's pool (`at::parallel_for`), so `torch.set_num_threads` governs them.

`kernels()` returns the module, or None when it cannot be used — no AVX-512, no compiler, a failed build,
or `GLMSTACK_NATIVE=0` — after logging the reason once; callers then take the ATen path.

The int4 GEMV quantizes activations to int8 (blocks of 32) and uses AVX512-VNNI where the CPU has it
(checked at run time), otherwise it works on fp32 activations. `GLMSTACK_INT4_VNNI=0` (read when the
module is loaded) or `kernels().set_int4_vnni(False)` selects the fp32 path anyway, e.g. to compare the two;
`kernels().int4_path()` says which is in use ("vnni" or "fp32").
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels.cpp")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fno-math-errno",
          # at::parallel_for is inline: without -fopenmp its `#pragma omp parallel` compiles to nothing. The
          # module then links libgomp.so.1, which resolves to the copy torch has already loaded (one pool).
          "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
_enabled = True  # tests flip this (set_enabled) to exercise the ATen fallback


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def unavailable_reason() -> str | None:
    """Why the native kernels cannot be built here, without trying to build them."""
    if _env_off("GLMSTACK_NATIVE"):
        return "disabled by GLMSTACK_NATIVE=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"the CPU has no AVX-512 (torch reports {capability})"
    return None


def _key() -> str:
    # One build per source + flags + torch version: a stale build is never loaded.
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode())
    return key.hexdigest()[:12]


def build_dir() -> Path:
    """`$GLMSTACK_NATIVE_DIR`, else torch's extension cache (`$TORCH_EXTENSIONS_DIR`, default
    ~/.cache/torch_extensions): shared by every GLMSTACK_HOME, so a server with a fresh home (tests do that)
    doesn't compile again."""
    root = os.environ.get("GLMSTACK_NATIVE_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "torch_extensions"
    return base / "glmstack_native" / _key()


def _build() -> ModuleType | None:
    reason = unavailable_reason()
    if reason:
        log.info("native decode kernels off: %s; using the ATen kernels", reason)
        return None
    try:
        from torch.utils import cpp_extension

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(name=f"glmstack_native_{_key()}", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                    extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a compile error: everything still runs on ATen
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "error" in line.lower() and "Error building" not in line),
                      lines[-1] if lines else "")
        log.warning("native decode kernels unavailable (%s: %s); using the ATen kernels",
                    type(exc).__name__, detail.strip()[:500])
        return None
    if _env_off("GLMSTACK_INT4_VNNI"):
        module.set_int4_vnni(False)
    log.info("native decode kernels ready (int4 path: %s)", module.int4_path())
    return module


def kernels() -> ModuleType | None:
    """The compiled module (building it on first call), or None where it can't be used."""
    if not _enabled:
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


def set_enabled(enabled: bool) -> bool:
    """Turn the native kernels on or off for this process (new calls only); returns the previous setting.
    Int4 weights packed while they were on keep the native layout, which the ATen fallback also reads."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous
