"""The peer runners of the benchmark: onnxruntime, torch and OpenVINO, on lstm-cpu's weights.

The code lives in the package :mod:`lstm_cpu.bench` (one runner module per runtime in
``lstm_cpu/bench/runners/``) so that ``lstm-cpu bench`` (an installed command that
cannot import this folder) and the scripts here share one implementation. This module re-exports
it for scripts and notebooks:

    import lstm_cpu
    from bench.peers import BenchConfig, run_bench, format_report
    print(format_report(run_bench(BenchConfig(mode="step", size=(128, 256, 2), compare=["onnxruntime"]))))

Each runner offers ``outputs(xs)`` (the short validation sequence from the initial state, xs
``(T, B, I)`` -> ``(T, B, out)``) and ``make_call()`` (a zero-argument callable doing one timed
unit with the state fed back).
Peers are imported lazily; a missing one raises :class:`PeerUnavailable` with the reason.

- onnxruntime: one InferenceSession on ``lstm_cpu.importers.onnx_export.to_onnx(model)`` (also
  when the model came from a user's ONNX file: the export carries exactly our weights and its
  tensor names are known); ``intra_op_num_threads=--threads``, ``inter_op_num_threads=1``,
  sequential execution; the state goes in as ``initial_h_l``/``initial_c_l`` and comes back as
  ``Y_h_l``/``Y_c_l`` every call.
- torch: ``nn.LSTM`` with the canonical weights copied in (torch's gate order is canonical; the
  folded bias goes to ``bias_ih``, ``bias_hh`` is zero), called per step under
  ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``.
- OpenVINO: the same ONNX compiled for CPU with static shapes, ``INFERENCE_NUM_THREADS=--threads``,
  ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_PRECISION_HINT=f32`` (its default is bfloat16 on
  CPUs with avx512_bf16), state fed back like onnxruntime.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _ROOT)

from lstm_cpu.bench import (  # noqa: E402
    MODES,
    PEERS,
    TOLERANCE,
    BenchConfig,
    PeerUnavailable,
    embedded_layers,
    embedded_model,
    format_report,
    installed_peers,
    machine_info,
    memory_bandwidth,
    plot_latencies,
    public_result,
    run_bench,
    versions,
)
from lstm_cpu.bench.runners import (  # noqa: E402
    BoundRunner,
    OnnxRuntimeRunner,
    OpenVINORunner,
    OursRunner,
    TorchRunner,
)

__all__ = [
    "MODES", "PEERS", "TOLERANCE", "BenchConfig", "BoundRunner", "OnnxRuntimeRunner",
    "OpenVINORunner", "OursRunner", "PeerUnavailable", "TorchRunner", "embedded_layers",
    "embedded_model", "format_report", "installed_peers", "machine_info", "memory_bandwidth",
    "plot_latencies", "public_result", "run_bench", "versions",
]
