"""One benchmark run: build the runners, validate them, time them, assemble the result.

Method (see ``bench/README.md``):

1. Every runtime gets the *same* weights: onnxruntime and OpenVINO through
   ``lstm_cpu.importers.onnx_export.to_onnx(model)``, torch through an ``nn.LSTM`` whose
   parameters are copied from ``model.layer_params()``.
2. Validate before timing (karpathy/llm.c ``dev/cuda``): each peer runs a short sequence with the
   same state feeding that is timed later; its outputs are compared with ours and the max abs
   difference is reported. A difference above :data:`~.config.TOLERANCE` is reported loudly.
3. Time in interleaved rounds (:mod:`.timing`), each runtime's threads pinned right before its
   own block (:class:`~.machine.ThreadPins`).
4. Ours is timed in steady state only. The JIT compile (or Numba cache load) of the first call
   and the first step of a fresh stream are measured apart and reported apart.
5. Next to our achieved weight bandwidth, two figures from the same run (:mod:`.runners.bound`):
   numpy's BLAS over the same weights and a memory copy.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from ..errors import InputError
from .config import CHECK_STEPS, DEFAULT_PEERS, REDUCED_TOLERANCE, SCHEMA, TOLERANCE, BenchConfig
from .machine import ThreadPins, machine_info, versions
from .models import describe_model, float32_layers, load_bench_model, matmul_flops
from .runners import (BoundRunner, ExportedGraph, OnnxRuntimeInt8Runner, OnnxRuntimeRunner, OpenVINORunner, OursRunner,
                      PeerUnavailable, Runner, TorchRunner)
from .runners.bound import memory_bandwidth
from .timing import SETTLE_S, Progress, cold_process, latency_stats, time_interleaved, warm_up

Echo = Optional[Callable[[str], None]]


def run_bench(cfg: BenchConfig, echo: Echo = None, model=None,
              source: Optional[str] = None) -> Dict[str, object]:
    """Run one benchmark configuration and return the JSON-able result.

    ``echo`` receives human-readable notes as they happen (skips, checks, mismatches).
    ``model``/``source``: benchmark this LSTMModel instead of ``cfg``'s file or embedded model.
    Every thread count it pins is restored afterwards, so that a benchmark run inside a larger
    process (a test session) leaves no trace.
    """
    pins = ThreadPins()
    try:
        return _run_bench(cfg.resolved(), echo, model, source, pins)
    finally:
        pins.restore()


def _note(notes: List[str], text: str, echo: Echo):
    text = " ".join(text.split())  # peers' errors span lines; a note is one line
    if len(text) > 400:
        text = text[:397] + "..."
    notes.append(text)
    if echo:
        echo(text)


def _alarm(text: str, echo: Echo):
    """A mismatch is shown at once on stderr, whatever the output mode."""
    if echo is None or getattr(echo, "quiet", False):
        sys.stderr.write(f"lstm-cpu: WARNING: {text}\n")
        sys.stderr.flush()


def _inputs(cfg: BenchConfig, input_size: int, rng):
    """One timed call's input for ours and for the peers: the same values, each runtime's axes.

    step: ``(I,)`` and ``(1, 1, I)``; streams: ``(B, I)`` and ``(1, B, I)``; sequence: ``(T, B, I)``.
    """
    B, T, I = cfg.batch, cfg.seq_len, input_size
    if cfg.mode == "step":
        x = rng.uniform(-1, 1, I).astype(np.float32)  # (I,)
        return x, x.reshape(1, 1, I)
    if cfg.mode == "streams":
        x = rng.uniform(-1, 1, (B, I)).astype(np.float32)  # (B, I)
        return x, x.reshape(1, B, I)
    x = rng.uniform(-1, 1, (T, B, I)).astype(np.float32)  # (T, B, I)
    return x, x


def _peer_runners(model, layers, cfg: BenchConfig, shape_x, notes, echo, skipped) -> List[Runner]:
    """The peers asked for that can run this model here; the others go to ``skipped``."""
    graph = None

    def build(name: str) -> Runner:
        nonlocal graph
        if name == "torch":
            return TorchRunner(model, layers, cfg)
        if graph is None:  # onnxruntime and openvino run the same exported graph
            graph = ExportedGraph(model)
        if name == "onnxruntime":
            return OnnxRuntimeRunner(cfg, graph)
        if name == "onnxruntime-int8":
            return OnnxRuntimeInt8Runner(cfg, graph)
        return OpenVINORunner(cfg, graph, shape_x)

    runners: List[Runner] = []
    for name in (cfg.compare if cfg.compare is not None else DEFAULT_PEERS):
        try:
            runners.append(build(name))
            continue
        except PeerUnavailable as e:
            skipped[name] = str(e)
        except Exception as e:  # noqa: BLE001 - a peer failing must not kill the benchmark
            skipped[name] = f"failed to set up: {type(e).__name__}: {e}"
        _note(notes, f"skipped {name}: {skipped[name]}", echo)
    return runners


def _run_bench(cfg: BenchConfig, echo: Echo, model, source, pins: ThreadPins) -> Dict[str, object]:
    import numba  # noqa: PLC0415

    notes: List[str] = []
    if cfg.threads > numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be <= {numba.config.NUMBA_NUM_THREADS} "
                         f"(NUMBA_NUM_THREADS), got {cfg.threads}")

    def pin(r: Runner):
        pins.pin(r.threads_of, cfg.threads)

    # Numba's threads before the model is built: its packing may depend on the thread count.
    pins.pin(OursRunner.threads_of, cfg.threads)
    t_load = time.perf_counter()
    if model is None:
        model, source = load_bench_model(cfg)
    load_s = time.perf_counter() - t_load
    if cfg.mode != "sequence" and (model.num_directions != 1 or model.reverse):
        raise InputError(f"mode {cfg.mode!r} streams forward through time and needs a forward "
                         f"model; this one is bidirectional or reverse: use --mode sequence")
    layers = float32_layers(model)  # the weights every peer and the bound are given
    peer_model = model  # the float model: what the peers (and onnxruntime-int8's quantizer) get
    if cfg.weights is not None:
        model = model.with_weights(cfg.weights)  # ours only
    B, T = cfg.batch, cfg.seq_len
    rng = np.random.default_rng(cfg.seed + 1)
    x_ours, x_peer = _inputs(cfg, model.input_size, rng)

    # --- ours: compile (or cache load) and cold first step, apart from the steady state -------
    ours = OursRunner(model, cfg)
    ours.x = x_ours
    # The first stream of the process pays the JIT compile or cache load, in its creation or in
    # its first step: both count.
    compile_s = sum(ours.first_call(x_ours))
    create_s, first_s = ours.first_call(x_ours)
    first_call_us = first_s * 1e6 / ours.steps_per_call

    # --- peers, validated before timing -------------------------------------------------------
    skipped: Dict[str, str] = {}
    peers = _peer_runners(peer_model, layers, cfg, x_peer.shape, notes, echo, skipped)
    if cfg.mode == "sequence":
        # The timed input itself: peers compiled for a static shape (OpenVINO) accept only it.
        xs, tc = x_ours, T  # (T, B, I)
    else:
        tc = CHECK_STEPS
        xs = rng.uniform(-1, 1, (tc, B, model.input_size)).astype(np.float32)  # (T_check, B, I)
    pin(ours)
    ref = ours.outputs(xs)  # (T_check, B, out)
    checks: Dict[str, Dict[str, object]] = {}
    runners: List[Runner] = [ours]
    for r in peers:
        try:
            pin(r)
            got = r.outputs(xs)
            diff = float(np.max(np.abs(got.reshape(ref.shape) - ref)))
        except Exception as e:  # noqa: BLE001 - a peer failing must not kill the benchmark
            skipped[r.name] = f"check run failed: {type(e).__name__}: {e}"
            _note(notes, f"skipped {r.name}: {skipped[r.name]}", echo)
            continue
        r.x = x_peer
        runners.append(r)
        reduced = r.name == "onnxruntime-int8" or model.weights != "float32"
        tol = REDUCED_TOLERANCE if reduced else TOLERANCE  # quantization error, not another model
        ok = bool(diff <= tol)
        checks[r.name] = {"max_abs_diff": diff, "ok": ok, "steps": tc}
        if ok:
            _note(notes, f"check {r.name}: max abs diff vs lstm-cpu {diff:.2e} over {tc} steps (ok)",
                  echo)
        else:
            msg = (f"!!! MISMATCH {r.name}: max abs diff vs lstm-cpu {diff:.3e} > {tol:g} "
                   f"over {tc} steps: its timings compare different math !!!")
            _note(notes, msg, echo)
            _alarm(msg, echo)
    runners.append(BoundRunner(layers, B, ours.steps_per_call))

    # --- warm up, then interleaved rounds -----------------------------------------------------
    calls = {r.name: r.make_call() for r in runners}
    t_warm = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for r in runners:
            for ctx in r.contexts():
                stack.enter_context(ctx)
        per_call_s = warm_up(runners, calls, cfg.warmup, pin)
        estimate_s = cfg.steps * sum(per_call_s.values())
        # Auto: a bar on a terminal for runs longer than ~1.5 s; --progress forces it.
        show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and estimate_s > 1.5)
        progress = Progress(cfg.steps * len(runners), bool(show), f"bench {cfg.mode}")
        try:
            durations = time_interleaved(runners, calls, cfg.steps, cfg.rounds, progress, pin,
                                         settle=SETTLE_S if cfg.threads > 1 else 0.0)
        finally:
            progress.close()
    wall_s = time.perf_counter() - t_warm

    # --- result -------------------------------------------------------------------------------
    wbytes = int(model.weight_bytes)
    flops = matmul_flops(model, layers) * B  # per step, all streams
    stats: Dict[str, Dict[str, object]] = {}
    for r in runners:
        stats[r.name] = {**latency_stats(durations[r.name], r.steps_per_call, B), "kind": r.kind}
    ours_p50 = stats[ours.name]["p50_us"]
    for s in stats.values():
        p50_s = s["p50_us"] * 1e-6
        s["ratio_to_ours"] = s["p50_us"] / ours_p50 if ours_p50 > 0 else None
        s["weight_gb_s"] = wbytes / p50_s / 1e9 if p50_s > 0 else None
        s["gflop_s"] = flops / p50_s / 1e9 if p50_s > 0 and flops else None
    membw = memory_bandwidth(cfg.membw_mb)
    bound = stats[BoundRunner.name]
    result = {
        "schema": SCHEMA,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": cfg.command,
        "config": {
            "mode": cfg.mode, "batch": B, "seq_len": T if cfg.mode == "sequence" else None,
            "threads": cfg.threads, "steps": cfg.steps, "warmup": cfg.warmup,
            "rounds": cfg.rounds, "seed": cfg.seed, "unit": "call" if cfg.mode == "sequence" else "step",
        },
        "model": describe_model(model, source),
        "machine": machine_info(),
        "versions": versions(),
        "ours": {
            "load_s": load_s,
            "first_call_s": compile_s,  # first stream + step (or run): JIT compile or cache load
            "cold_call_us": first_call_us,  # first call on a fresh stream, per step
            "stream_create_us": create_s * 1e6,  # model.stream(...) itself
            "steady_p50_us": ours_p50,
        },
        "checks": checks,
        "skipped": skipped,
        "runtimes": stats,
        "bandwidth": {
            "weight_bytes": wbytes,
            "flops_per_step": flops,  # matrix products only, all B streams
            "ours_gflop_s": stats[ours.name]["gflop_s"],
            "bound_gflop_s": bound["gflop_s"],
            "ours_gb_s": stats[ours.name]["weight_gb_s"],
            "bound_gb_s": bound["weight_gb_s"],
            "bound_method": "numpy BLAS matvec over fused (4H, in+out) per layer",
            "memory_copy_gb_s": membw["copy_gb_s"] if membw else None,
            "memory_copy_mb": membw["array_mb"] if membw else None,
        },
        "wall_s": wall_s,
        "mismatch": any(not c["ok"] for c in checks.values()),
        "notes": notes,
    }
    if cfg.cold_process:
        if echo:
            echo("measuring cold start in fresh processes ...")
        result["ours"]["cold_process_cached"] = cold_process(cfg, empty_cache=False)
        result["ours"]["cold_process_compile"] = cold_process(cfg, empty_cache=True)
    result["_durations_us"] = {r.name: (durations[r.name] / 1e3 / r.steps_per_call).tolist()
                               for r in runners}
    return result
