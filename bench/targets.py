"""Check the performance targets (issue 5) against a benchmark matrix's JSON.

    python bench/targets.py [bench/results.json]      # prints a markdown table

Every figure comes from the matrix run (peers timed side by side in one run); nothing here
times anything. Targets that need other measurements (a quiet tail-latency run, tracemalloc,
parity) are listed by bench/results.md's hand-written part.
"""

from __future__ import annotations

import json
import sys

SIZES = [(32, 64, 1), (64, 128, 1), (128, 256, 2), (256, 512, 2), (512, 1024, 1)]
STEP_TARGETS = [15, 10, 4, 2.5, 2]  # target 1: x faster than onnxruntime, 1 thread


def _index(results):
    out = {}
    for r in results:
        m, c = r["model"], r["config"]
        key = (c["mode"], c["batch"], c["threads"], (m["input_size"], m["hidden_size"], m["num_layers"]))
        out[key] = r
    return out


def _p50(r, name):
    rt = r["runtimes"].get(name)
    return None if rt is None else rt["p50_us"]


def _fmt(vals):
    return " / ".join("-" if v is None else f"{v:.2f}x" for v in vals)


def main(path="bench/results.json"):
    data = json.load(open(path))
    idx = _index(data["results"])
    rows = []

    def ratio(mode, batch, threads, size, peer="onnxruntime"):
        r = idx.get((mode, batch, threads, size))
        if r is None:
            return None
        a, b = _p50(r, peer), _p50(r, "lstm-cpu")
        return None if a is None or b is None else a / b

    r1 = [ratio("step", 1, 1, s) for s in SIZES]
    met1 = all(v is not None and v >= t for v, t in zip(r1, STEP_TARGETS))
    rows.append(("1", "step vs onnxruntime, 1 thread: 15x / 10x / 4x / 2.5x / 2x", _fmt(r1), met1))

    r2 = []
    for s in SIZES[2:]:
        r = idx.get(("step", 1, 1, s))
        r2.append(None if r is None else _p50(r, "lstm-cpu") / _p50(r, "numpy BLAS (bound)"))
    rows.append(("2", "H >= 256: step <= 1.25x numpy BLAS over the same weights",
                 " / ".join(f"{v:.2f}x of BLAS" for v in r2 if v is not None),
                 all(v is not None and v <= 1.25 for v in r2)))

    r3 = [ratio("step", 1, 2, s) for s in SIZES]
    rows.append(("3a", "2 threads both sides: ahead of onnxruntime at every size", _fmt(r3),
                 all(v is not None and v > 1 for v in r3)))
    one, two = idx.get(("step", 1, 1, SIZES[4])), idx.get(("step", 1, 2, SIZES[4]))
    if one and two:
        sp = _p50(one, "lstm-cpu") / _p50(two, "lstm-cpu")
        rows.append(("3b", "our 2-thread step at (512,1024,1) >= 1.4x our 1-thread step",
                     f"{sp:.2f}x", sp >= 1.4))

    for batch in (1, 16):
        vals = []
        for s in SIZES:
            o, t = ratio("sequence", batch, 1, s), ratio("sequence", batch, 1, s, "torch")
            vals.append(None if o is None or t is None else min(o, t))
        rows.append(("5", f"run T=500 batch {batch} per step <= onnxruntime and torch (min of the two ratios)",
                     _fmt(vals), all(v is not None and v >= 1 for v in vals)))

    st, single = idx.get(("streams", 64, 1, SIZES[2])), idx.get(("step", 1, 1, SIZES[2]))
    if st and single:
        frac = _p50(st, "lstm-cpu") / 64 / _p50(single, "lstm-cpu")
        rows.append(("6", "64 streams of (128,256,2): per stream <= 1/8 of a single step",
                     f"{frac:.3f} of a step", frac <= 1 / 8))

    tails = []
    for s in SIZES[:3]:
        r = idx.get(("step", 1, 1, s))
        rt = r["runtimes"]["lstm-cpu"]
        tails.append(rt["p99_us"] / rt["p50_us"])
    rows.append(("7", "p99 <= 2x p50 at the three small sizes (here interleaved with peers, not quiet)",
                 " / ".join(f"{v:.2f}x" for v in tails), all(v <= 2 for v in tails)))

    cold = [r["ours"].get("cold_process_cached") for r in data["results"] if r["ours"].get("cold_process_cached")]
    comp = [r["ours"].get("cold_process_compile") for r in data["results"] if r["ours"].get("cold_process_compile")]
    if cold and comp:
        warm_s = sum(cold[0][k] for k in ("import_s", "model_s", "first_step_s"))
        jit_s = sum(comp[0][k] for k in ("import_s", "model_s", "first_step_s"))
        rows.append(("8", "cold start: warm cache <= 1.5 s, first time <= 20 s",
                     f"{warm_s:.2f} s / {jit_s:.1f} s", warm_s <= 1.5 and jit_s <= 20))

    print("| # | target | measured | met |")
    print("|---|---|---|---|")
    for k, what, got, ok in rows:
        print(f"| {k} | {what} | {got} | {'yes' if ok else 'no'} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
