"""What a benchmark result says: the text report, the latency plot and the public JSON."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .config import PEERS


def _fmt_us(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_report(res: Dict[str, object]) -> str:
    c, m, o, bw = res["config"], res["model"], res["ours"], res["bandwidth"]
    mach, ver = res["machine"], res["versions"]
    lines = []
    shape = f"I={m['input_size']} H={m['hidden_size']} L={m['num_layers']}"
    if m["proj_size"]:
        shape += f" P={m['proj_size']}"
    if m["num_directions"] == 2:
        shape += " bidirectional"
    what = {"step": "one stream, one step per call (batch 1)",
            "streams": f"{c['batch']} batched streams, one step per call",
            "sequence": f"whole sequence T={c['seq_len']} at batch {c['batch']} per call"}[c["mode"]]
    lines.append(f"model   {m['source']}: {shape}, {m['dtype']}, "
                 f"{m['weight_bytes'] / 1e6:.2f} MB of weights")
    lines.append(f"mode    {c['mode']}: {what}; threads {c['threads']}")
    peers = ", ".join(f"{k} {ver[k]}" for k in PEERS if ver.get(k))
    ext = " ".join(mach["vector_extensions"]) or "none known"
    lines.append(f"machine {mach['cpu']} ({ext}), {mach['cores']} cores; numpy {ver['numpy']}, "
                 f"numba {ver['numba']}" + (f", {peers}" if peers else ""))
    fresh = ("a fresh run's first call" if c["mode"] == "sequence" else
             f"a fresh stream: created in {_fmt_us(o.get('stream_create_us', 0))} µs, first step")
    lines.append(f"ours    first call {o['first_call_s'] * 1e3:.1f} ms (JIT compile or Numba cache "
                 f"load); {fresh} {_fmt_us(o['cold_call_us'])} µs/step; steady state below")
    for key, label in (("cold_process_cached", "fresh process, warm Numba cache"),
                       ("cold_process_compile", "fresh process, empty Numba cache")):
        cp = o.get(key)
        if cp:
            if "error" in cp:
                lines.append(f"        {label}: failed: {cp['error']}")
            else:
                lines.append(f"        {label}: import {cp['import_s']:.2f} s, model "
                             f"{cp['model_s'] * 1e3:.0f} ms, first step {cp['first_step_s']:.2f} s")
    for note in res["notes"]:
        lines.append(f"note    {note}")
    unit = "per time step" if c["mode"] == "sequence" else "per step"
    lines.append("")
    lines.append(f"{c['steps']} timed calls per runtime in {c['rounds']} interleaved rounds, "
                 f"after {c['warmup']} warm-up calls; µs {unit}")
    batched = c["batch"] > 1
    head = (f"{'runtime':<20} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9} {'steps/s':>11}"
            + (f" {'samples/s':>11}" if batched else "") + f" {'ratio':>7}")
    lines.append(head)
    lines.append("-" * len(head))
    for name, s in res["runtimes"].items():
        ratio = "" if s["kind"] == "bound" else f"{s['ratio_to_ours']:.2f}"
        flag = "  MISMATCH" if name in res["checks"] and not res["checks"][name]["ok"] else ""
        lines.append(f"{name:<20} {_fmt_us(s['p50_us']):>9} {_fmt_us(s['p90_us']):>9} "
                     f"{_fmt_us(s['p99_us']):>9} {_fmt_us(s['max_us']):>9} "
                     f"{s['steps_per_s']:>11,.0f}"
                     + (f" {s['samples_per_s']:>11,.0f}" if batched else "") + f" {ratio:>7}{flag}")
    lines.append("ratio = runtime p50 / lstm-cpu p50 (> 1: lstm-cpu is faster)")
    bwl = f"weights {bw['weight_bytes'] / 1e6:.2f} MB/step: lstm-cpu {bw['ours_gb_s']:.1f} GB/s"
    if bw["bound_gb_s"]:
        bwl += f"; numpy BLAS over the same weights {bw['bound_gb_s']:.1f} GB/s (in-run bound)"
    if bw["memory_copy_gb_s"]:
        bwl += f"; memory copy {bw['memory_copy_gb_s']:.1f} GB/s ({bw['memory_copy_mb']} MB, r+w)"
    lines.append(bwl)
    if c["batch"] > 1 and bw.get("ours_gflop_s"):
        # At batch N a step reuses each weight N times: arithmetic, not bandwidth, bounds it.
        fl = f"batch {c['batch']}: matrix products {bw['flops_per_step'] / 1e6:.1f} MFLOP/step: " \
             f"lstm-cpu {bw['ours_gflop_s']:.1f} GFLOP/s"
        if bw.get("bound_gflop_s"):
            fl += f"; numpy BLAS {bw['bound_gflop_s']:.1f} GFLOP/s"
        lines.append(fl)
    if res["mismatch"]:
        lines.append("!!! at least one peer computed different outputs: see MISMATCH above !!!")
    return "\n".join(lines)


def plot_latencies(res: Dict[str, object], path: str) -> Optional[str]:
    """Write per-runtime latency distributions to ``path``; return a note if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "skipped --plot: matplotlib is not installed (pip install matplotlib)"
    data = res["_durations_us"]
    c, m = res["config"], res["model"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, v in data.items():
        v = np.sort(np.asarray(v))  # (calls,) µs, ascending
        q = np.arange(1, v.size + 1) / v.size
        p50, p99 = np.percentile(v, 50), np.percentile(v, 99)
        line, = ax.plot(v, q, drawstyle="steps-post", linewidth=1.5,
                        label=f"{name}: p50 {p50:.1f}, p99 {p99:.1f} µs")
        # Tail view: the fraction of calls slower than x, on log-log axes.
        bx.plot(v, 1.0 - q + 1.0 / v.size, drawstyle="steps-post", color=line.get_color())
    unit = "µs per time step" if c["mode"] == "sequence" else "µs per step"
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel(unit)
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("fraction of calls at most x")
    ax.set_title("latency distribution (CDF)", fontsize=10)
    bx.set_yscale("log")
    bx.set_ylabel("fraction of calls slower than x")
    bx.set_title("tail", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"lstm-cpu bench: mode {c['mode']}, batch {c['batch']}, threads {c['threads']}, "
                 f"I={m['input_size']} H={m['hidden_size']} L={m['num_layers']}; "
                 f"{c['steps']} calls per runtime, interleaved", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def public_result(res: Dict[str, object]) -> Dict[str, object]:
    """The result without the raw per-call durations (kept only for the plot)."""
    return {k: v for k, v in res.items() if not k.startswith("_")}
