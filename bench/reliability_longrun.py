"""A long stream: 1,000,000 steps of a (I=64, H=128, L=2) float32 stream against float64.

    nice -n 10 python bench/reliability_longrun.py              # 1,000,000 steps (a few minutes)
    python bench/reliability_longrun.py --steps 100000

The float32 stream is stepped one sample at a time with ``out=`` (the service path: no
allocation per step); the float64 model with the same weights runs the same inputs in chunks
(``Stream.run``, same arithmetic). Recorded every ``--every`` steps: the largest |y32 - y64| so
far, the cell-state deviation, and the process RSS (from /proc/self/statm). Memory must be flat
and the deviation bounded (the README's float32 tanh has ~2e-7 error; the recurrence must not
accumulate it). Prints a markdown snippet; exit status 1 if RSS grew by more than 256 KB after
the first checkpoint or the deviation exceeded 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from lstm_cpu import LayerParams, LSTMModel  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--every", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    I, H, L = 64, 128, 2
    rng = np.random.default_rng(args.seed)
    s = 1 / np.sqrt(H)
    layers = [[LayerParams(rng.uniform(-s, s, (4 * H, I if l == 0 else H)), rng.uniform(-s, s, (4 * H, H)),
                           rng.uniform(-s, s, 4 * H))] for l in range(L)]
    # serial: one stream per core is the service pattern, and the float64 twin is over the
    # parallel threshold (1 MB), where a busy machine makes per-step thread wake-ups costly.
    m32 = LSTMModel(layers, kernel="serial")
    m64 = LSTMModel(layers, dtype=np.float64, kernel="serial")
    s32, s64 = m32.stream(), m64.stream()
    chunk = 1000
    x64 = np.empty((chunk, I))  # (chunk, I) inputs, float64
    x32 = np.empty((chunk, I), np.float32)  # the same inputs rounded to float32
    y32 = np.empty((chunk, H), np.float32)  # (chunk, H) float32 outputs, written in place
    # warm-up: one whole chunk through the exact loop below (compiles, fills numpy's and the
    # allocator's caches for every temporary), then the memory baseline
    for k in range(chunk):
        s32.step(x32[k], out=y32[k])
    np.max(np.abs(y32 - s64.run(x32.astype(np.float64))))
    s32.state[1] - s64.state[1]
    rss_bytes()
    s32.reset()
    s64.reset()
    rows = []
    worst = worst_c = 0.0
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    step_time = 0.0
    for start in range(0, args.steps, chunk):
        rng.standard_normal(out=x64)
        x32[...] = x64
        t = time.perf_counter()
        for k in range(chunk):
            s32.step(x32[k], out=y32[k])
        step_time += time.perf_counter() - t
        y64 = s64.run(x32.astype(np.float64))  # the float32 inputs, computed in float64
        worst = max(worst, float(np.max(np.abs(y32 - y64))))
        done = start + chunk
        if done % args.every == 0 or done >= args.steps:
            worst_c = float(np.max(np.abs(s32.state[1] - s64.state[1])))
            rows.append((done, worst, worst_c, rss_bytes()))
            print(f"  {done:>9,} steps  max|y32-y64| {worst:.2e}  |c32-c64| {worst_c:.2e}  "
                  f"RSS {rows[-1][3] / 2**20:.1f} MB  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    growth = max(r[3] for r in rows) - rss0
    # flat: no growth from the first checkpoint on (a one-off settling of allocator arenas in the
    # first interval is not a leak; a leak of even 1 byte per step would show 1 MB per checkpoint)
    drift = max(r[3] for r in rows) - rows[0][3]
    ok = worst <= 1e-4 and drift <= 256 << 10
    print(f"### Long run: {args.steps:,} steps, (I, H, L) = ({I}, {H}, {L}), float32 vs float64\n")
    print("| steps | max \\|y32 - y64\\| so far | \\|c32 - c64\\| now | RSS |")
    print("|---:|---:|---:|---:|")
    print(f"| 0 (after warm-up) | | | {rss0 / 2**20:.1f} MB |")
    for done, w, wc, r in rows:
        print(f"| {done:,} | {w:.2e} | {wc:.2e} | {r / 2**20:.1f} MB |")
    print(f"\nStepping: {step_time / args.steps * 1e6:.1f} µs per float32 step with out= (serial kernel); "
          f"RSS growth after warm-up: {growth / 2**10:.0f} KB, of which after the first checkpoint: "
          f"{drift / 2**10:.0f} KB; max deviation {worst:.2e} "
          f"({'within' if worst <= 1e-4 else 'OVER'} 1e-4). {'OK' if ok else 'FAILED'}.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
