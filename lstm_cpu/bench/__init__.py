"""The benchmark behind ``lstm-cpu bench`` and ``bench/run_matrix.py``: tooling next to the
runtime, never imported by ``import lstm_cpu``.

Modules, one job each:

- :mod:`.config`   what a run measures (:class:`BenchConfig`), peers, modes, tolerance
- :mod:`.models`   the embedded default model; describe, FLOPs, float32 weights for peers
- :mod:`.machine`  CPU model and vector extensions, caches, BLAS, versions; thread pinning
- :mod:`.runners`  one module per runtime: ours, onnxruntime, torch, openvino, the BLAS bound
- :mod:`.timing`   warm-up, interleaved rounds, latency statistics, cold start
- :mod:`.run`      one run: runners, validation, timing, the result
- :mod:`.report`   the text report, the latency plot, the public JSON

Peers (onnxruntime, torch, openvino), tqdm and matplotlib are imported when used; a missing one
is skipped with a note. Importing this package loads the standard library, numpy and lstm_cpu.
"""

from .config import DEFAULT_PEERS, DEFAULT_SIZE, MODES, PEERS, TOLERANCE, BenchConfig
from .machine import installed_peers, machine_info, versions
from .models import embedded_layers, embedded_model
from .report import format_report, plot_latencies, public_result
from .run import run_bench
from .runners import PeerUnavailable
from .runners.bound import memory_bandwidth

__all__ = [
    "BenchConfig", "PEERS", "DEFAULT_PEERS", "MODES", "TOLERANCE", "DEFAULT_SIZE", "PeerUnavailable",
    "run_bench", "format_report", "plot_latencies", "public_result", "embedded_layers",
    "embedded_model", "machine_info", "versions", "installed_peers", "memory_bandwidth",
]
