"""The machine a benchmark ran on, and the thread counts of every runtime it times.

Probing (recorded in the JSON and the report header): the CPU model, its vector extensions (from
the ``flags`` line of ``/proc/cpuinfo``), cache sizes, numpy's BLAS and the versions of everything
timed. Probing never imports a peer: versions come from the installed distributions' metadata.

Thread pinning lives here and only here: :class:`ThreadPins` sets a runtime's own thread count
right before that runtime is checked, warmed up or timed, remembers the count it found, and puts
every count back afterwards. onnxruntime's and OpenVINO's counts are properties of a session or a
compiled model, so their options are built here too (:func:`onnxruntime_options`,
:func:`openvino_config`). numpy's BLAS is pinned through ctypes on the OpenBLAS that numpy loaded
(no threadpoolctl).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Dict, List, Optional

import numpy as np

from .config import DEFAULT_PEERS

# =============================================================================================
# CPU
# =============================================================================================
#: Vector extensions worth knowing when reading a kernel's speed, in the order they are reported.
#: Names as Linux spells them in /proc/cpuinfo (x86 ``flags``; on arm64 ``asimd``/``sve`` in
#: ``Features``).
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "asimd", "sve")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpuinfo_field(text: str, *keys: str) -> Optional[str]:
    """The value of the first line of ``/proc/cpuinfo`` text whose key is one of ``keys``."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in keys:
            return value.strip()
    return None


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    """'AMD EPYC 9B14' from ``/proc/cpuinfo`` (or the text given), else what platform knows."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    return (_cpuinfo_field(text or "", "model name") or platform.processor()
            or platform.machine())


def vector_extensions(cpuinfo: Optional[str] = None) -> List[str]:
    """The :data:`VECTOR_FLAGS` the first CPU of ``/proc/cpuinfo`` (or the text given) has."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    flags = set((_cpuinfo_field(text or "", "flags", "features") or "").split())
    return [f for f in VECTOR_FLAGS if f in flags]


def cpu_caches() -> Dict[str, str]:
    """Cache sizes of cpu0 from sysfs, e.g. {"L1d": "32K", "L2": "512K", "L3": "32768K"}."""
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    for k in range(8):
        level = _read(f"{base}/index{k}/level")
        if level is None:
            break
        kind = _read(f"{base}/index{k}/type") or ""
        name = f"L{level}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[name] = _read(f"{base}/index{k}/size") or "?"
    return out


# =============================================================================================
# numpy's BLAS (OpenBLAS through ctypes)
# =============================================================================================
_BLAS_SET = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
             "openblas_set_num_threads64_", "openblas_set_num_threads")
_BLAS_GET = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
             "openblas_get_num_threads64_", "openblas_get_num_threads")
_BLAS_CORE = ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
              "openblas_get_corename64_", "openblas_get_corename")


def _openblas_lib():
    """The OpenBLAS numpy loaded, through ctypes, or None (numpy built on another BLAS).

    Several OpenBLAS copies can be mapped (another package may bundle its own); numpy's own, in
    the ``numpy.libs`` folder next to numpy, is preferred.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "openblas" in ln.lower() and ".so" in ln}
    except OSError:
        return None
    numpy_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    for p in sorted(paths, key=lambda p: (not p.startswith(numpy_dir), p)):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


def _first_symbol(lib, names):
    return next((getattr(lib, n) for n in names if hasattr(lib, n)), None)


def blas_threads(n: Optional[int] = None) -> Optional[int]:
    """Set numpy's OpenBLAS thread count to ``n`` (if given); return the count in force, or None
    when numpy's BLAS is not an OpenBLAS we can reach."""
    lib = _openblas_lib()
    if lib is None:
        return None
    setter, getter = _first_symbol(lib, _BLAS_SET), _first_symbol(lib, _BLAS_GET)
    if n is not None and setter is not None:
        setter(ctypes.c_int(n))
    return int(getter()) if getter is not None else None


def blas_info() -> Dict[str, object]:
    """numpy's BLAS: name, version, the OpenBLAS kernel that runs, its threads, tuning variables."""
    info: Dict[str, object] = {}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["name"], info["version"] = blas.get("name"), blas.get("version")
    except (KeyError, TypeError, ValueError):  # an older numpy without mode="dicts"
        pass
    lib = _openblas_lib()
    core = None if lib is None else _first_symbol(lib, _BLAS_CORE)
    if core is not None:
        core.restype = ctypes.c_char_p
        info["core"] = core().decode()
    info["threads"] = blas_threads()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


# =============================================================================================
# Versions and the whole record
# =============================================================================================
def _version(dist: str) -> Optional[str]:
    """Version of an installed distribution without importing it (None if missing)."""
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def installed_peers() -> List[str]:
    """The default peers that are installed (the int8 peer runs only when asked for)."""
    return [p for p in DEFAULT_PEERS if _version(p) is not None]


def versions() -> Dict[str, Optional[str]]:
    import numba  # noqa: PLC0415 - always installed; lazy keeps `--help` fast

    import lstm_cpu  # noqa: PLC0415

    out = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "lstm_cpu": _version("lstm-cpu") or lstm_cpu.__version__,
    }
    for peer in DEFAULT_PEERS:  # the int8 peer is onnxruntime too
        out[peer] = _version(peer)
    out["numba_threading_layer"] = lstm_cpu.threading_layer()
    return out


def machine_info() -> Dict[str, object]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "vector_extensions": vector_extensions(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "caches": cpu_caches(),
        "platform": platform.platform(),
        "blas": blas_info(),
    }


# =============================================================================================
# Thread pinning: every runtime's count, set right before that runtime runs
# =============================================================================================
def onnxruntime_options(ort, threads: int):
    """Session options: ``threads`` intra-op threads, one inter-op thread, sequential execution."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return so


def openvino_config(threads: int) -> Dict[str, object]:
    """compile_model options: ``threads`` inference threads, one stream, latency hint, float32.

    The precision hint matters: on a CPU with avx512_bf16 (or AMX) OpenVINO computes in bfloat16
    by default, which differs from float32 by ~1e-3 and would compare different math."""
    return {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32"}


def _numba_threads(n: Optional[int] = None) -> int:
    import numba  # noqa: PLC0415

    if n is not None:
        numba.set_num_threads(n)
    return numba.get_num_threads()


def _torch_threads(n: Optional[int] = None) -> Optional[int]:
    torch = sys.modules.get("torch")  # never imported for this: only a peer that runs imports it
    if torch is None:
        return None
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


#: Runtime -> a function that sets its process-wide thread count (if given) and returns the count.
#: onnxruntime and OpenVINO are absent: their count is fixed when the session is built.
_SETTERS = {"numba": _numba_threads, "blas": blas_threads, "torch": _torch_threads}


class ThreadPins:
    """Pins runtimes' thread counts and restores what it found.

    ``pin("torch", 2)`` right before torch runs: the shared OpenMP runtime (torch and Numba's omp
    layer both use libgomp) lets one runtime's setting leak into another's, so a count set once
    at the start is not necessarily the count in force when a runtime is timed. The first time a
    runtime is pinned its count is remembered; :meth:`restore` puts every remembered count back,
    so that a benchmark run inside a larger process (a test session) leaves no trace.
    """

    def __init__(self):
        self.found: Dict[str, int] = {}

    def pin(self, runtime: Optional[str], n: int) -> None:
        setter = _SETTERS.get(runtime)
        if setter is None:
            return
        if runtime not in self.found:
            before = setter()
            if before is None:  # torch not imported, or numpy's BLAS not reachable
                return
            self.found[runtime] = before
        setter(n)

    def restore(self) -> None:
        for runtime, n in self.found.items():
            _SETTERS[runtime](n)
        self.found.clear()


__all__ = ["VECTOR_FLAGS", "cpu_model", "vector_extensions", "cpu_caches", "blas_threads",
           "blas_info", "versions", "machine_info", "installed_peers", "onnxruntime_options",
           "openvino_config", "ThreadPins"]
