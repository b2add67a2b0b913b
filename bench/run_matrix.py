"""Run the benchmark size matrix and write bench/results.md and bench/results.json.

    python bench/run_matrix.py            # the full matrix (tens of minutes: run it on a quiet machine)
    python bench/run_matrix.py --quick    # a short smoke run -> bench/results-quick.{md,json}

Matrix: (I, H, L) = (32,64,1), (64,128,1), (128,256,2), (256,512,2), (512,1024,1) x modes
{step (batch 1); sequence T=500 at batch 1 and 16; 64 batched streams} x threads {1, 2}.

Every configuration is one ``python -m lstm_cpu bench --json`` process, so each starts clean
(threads, sessions, caches) and the CLI is what gets measured. Each runtime's outputs are checked
against ours before timing; runtimes are timed in interleaved rounds (see bench/README.md).

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: some machines here set them (older OpenBLAS builds crash
without them) and they slow a current numpy's BLAS, i.e. our in-run bound. Unless
``--keep-openblas-env`` is given, both are removed *together* from the benchmark processes' own
environment only (never from tests or CI), and the BLAS kernel that then runs is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZES = [(32, 64, 1), (64, 128, 1), (128, 256, 2), (256, 512, 2), (512, 1024, 1)]
THREADS = [1, 2]
SEQ_LEN = 500
STREAMS = 64
# Timed calls per size, chosen so that the slowest peer (torch nn.LSTM per step: ~10 ms at the
# largest sizes) takes seconds, not minutes: (step, streams, sequence calls).
# Small sizes get many sequence calls: each runtime's block starts after a settle sleep
# (timing.SETTLE_S), and the first calls after an idle core run slow (frequency, caches, the
# worker's wake-up). With 20 calls (2 timed a block) at (32,64,1), B=16, T=200, 2 threads, the
# median measured that ramp: ours 7.0 us a step against 5.1-5.2 steady, onnxruntime 6.1 against
# 5.6-5.8, swinging 30-50% between matrices; calls 1-3 after a 50 ms sleep ran 12.5 / 10.1 / 9.7
# us against 9.5 steady (1 thread). 200 calls (20 a block) time every runtime in its steady state.
CALLS = {
    (32, 64, 1): (3000, 600, 200),
    (64, 128, 1): (3000, 600, 100),
    (128, 256, 2): (1500, 300, 10),
    (256, 512, 2): (600, 150, 6),
    (512, 1024, 1): (600, 100, 6),
}
QUICK_SIZES = [(32, 64, 1), (128, 256, 2)]
QUICK_SEQ_LEN = 100


def configs(args):
    """The list of (label, bench argv) to run, in order."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    threads = args.threads or ([1] if args.quick else THREADS)
    seq_len = args.seq_len or (QUICK_SEQ_LEN if args.quick else SEQ_LEN)
    modes = args.modes or ["step", "sequence1", "sequence16", "streams"]
    out = []
    for t in threads:
        for size in sizes:
            n_step, n_streams, n_seq = CALLS.get(tuple(size), (1000, 200, 6))
            if args.quick:
                n_step, n_streams, n_seq = max(n_step // 10, 50), max(n_streams // 10, 20), 3
            base = ["--size", ",".join(map(str, size)), "--threads", str(t)]
            for m in modes:
                if m == "step":
                    argv = ["--mode", "step", "--steps", str(n_step), "--warmup", str(n_step // 10)]
                elif m.startswith("sequence"):
                    b = int(m[len("sequence"):] or 1)
                    argv = ["--mode", "sequence", "--seq-len", str(seq_len), "--batch", str(b),
                            "--steps", str(n_seq), "--warmup", "1"]
                elif m == "streams":
                    argv = ["--mode", "streams", "--batch", str(STREAMS), "--steps", str(n_streams),
                            "--warmup", str(max(n_streams // 10, 5))]
                else:
                    raise SystemExit(f"run_matrix: unknown mode {m!r}")
                if args.compare is not None:
                    argv += ["--compare", args.compare]
                out.append((f"{m} {size} threads {t}", base + argv))
    if args.cold and out:
        out[0] = (out[0][0], out[0][1] + ["--cold-process"])
    return out


def bench_env(keep_openblas: bool):
    env = dict(os.environ)
    removed = {}
    if not keep_openblas and ("OPENBLAS_CORETYPE" in env or "OPENBLAS_L2_SIZE" in env):
        for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # together, as the machine notes say
            if k in env:
                removed[k] = env.pop(k)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env, removed


def run_one(argv, env, timeout):
    cmd = [sys.executable, "-m", "lstm_cpu", "bench", "--json", "--no-progress", "--membw-mb",
           "256"] + argv
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or [f"exit {p.returncode}"]
        return None, lines[-1], wall
    res = json.loads(p.stdout)
    res["stderr_notes"] = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return res, None, wall


# =============================================================================================
# Markdown
# =============================================================================================
def _us(v):
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _peer_cell(r, name):
    s = r["runtimes"].get(name)
    if s is None:
        why = r.get("skipped", {}).get(name)
        return "skipped" if why else "–"
    mark = "" if r["checks"].get(name, {}).get("ok", True) else " **MISMATCH**"
    return f"{_us(s['p50_us'])} ({s['ratio_to_ours']:.2f}x){mark}"


def _group_key(r):
    c = r["config"]
    if c["mode"] == "step":
        return "step: one stream, batch 1, µs per step"
    if c["mode"] == "streams":
        return f"streams: {c['batch']} batched streams, µs per step (all streams)"
    return f"sequence: T={c['seq_len']} at batch {c['batch']}, µs per time step"


def markdown(doc):
    meta, results = doc["meta"], doc["results"]
    mach, ver = meta["machine"], meta["versions"]
    peers = [p for p in ("onnxruntime", "torch", "openvino")
             if any(p in r["runtimes"] for r in results)]
    L = []
    L.append("# lstm-cpu benchmark matrix" + (" (QUICK smoke run: short and noisy)" if meta["quick"] else ""))
    L.append("")
    L.append(f"- date: {meta['date']}")
    L.append(f"- command: `{meta['command']}`")
    caches = ", ".join(f"{k} {v}" for k, v in mach.get("caches", {}).items())
    ext = " ".join(mach.get("vector_extensions", [])) or "not recorded"
    L.append(f"- CPU: {mach['cpu']}, {mach['cores']} cores ({mach.get('usable_cores')} usable); {caches}")
    L.append(f"- vector extensions: {ext}")
    blas = mach.get("blas", {})
    L.append(f"- BLAS: {blas.get('name')} {blas.get('version')}, kernel {blas.get('core', '?')}"
             + (f"; removed from the benchmark's environment: {meta['openblas_env_removed']}"
                if meta.get("openblas_env_removed") else ""))
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v))
    copies = [r["bandwidth"]["memory_copy_gb_s"] for r in results
              if r["bandwidth"].get("memory_copy_gb_s")]
    if copies:
        L.append(f"- memory bandwidth (numpy copy of 256 MB, read+write counted), measured in "
                 f"every run: {min(copies):.1f} to {max(copies):.1f} GB/s")
    L.append("")
    L.append("Each cell: p50 µs (ratio = peer p50 / lstm-cpu p50; > 1 means lstm-cpu is faster). "
             "Every peer's outputs were checked against lstm-cpu before timing (max abs diff in "
             "the last column; > 1e-4 is flagged MISMATCH). Runtimes were timed in interleaved "
             "rounds with the state fed back every call. Method: bench/README.md.")
    groups = {}
    for r in results:
        groups.setdefault(_group_key(r), []).append(r)
    for title, rows in groups.items():
        L.append("")
        L.append(f"## {title}")
        L.append("")
        # Batch 1 is bound by weight traffic (GB/s); batched steps by arithmetic (GFLOP/s).
        per = "GB/s" if rows[0]["config"]["batch"] == 1 else "GFLOP/s"
        key = "gb_s" if per == "GB/s" else "gflop_s"
        head = ["I,H,L", "weights MB", "threads", "lstm-cpu p50", "p99"] + peers + \
               ["BLAS bound", f"ours {per}", f"bound {per}", "max diff"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for r in rows:
            m, ours = r["model"], r["runtimes"]["lstm-cpu"]
            bound = r["runtimes"].get("numpy BLAS (bound)")
            diffs = [c["max_abs_diff"] for c in r["checks"].values()]
            bw = r["bandwidth"]
            L.append("| " + " | ".join([
                f"{m['input_size']},{m['hidden_size']},{m['num_layers']}",
                f"{m['weight_bytes'] / 1e6:.2f}",
                str(r["config"]["threads"]),
                _us(ours["p50_us"]), _us(ours["p99_us"]),
                *[_peer_cell(r, p) for p in peers],
                _us(bound["p50_us"]) if bound else "–",
                f"{bw['ours_' + key]:.1f}" if bw.get("ours_" + key) else "–",
                f"{bw['bound_' + key]:.1f}" if bw.get("bound_" + key) else "–",
                f"{max(diffs):.1e}" if diffs else "–",
            ]) + " |")
    L.append("")
    L.append("## lstm-cpu start-up (kept apart from the steady state above)")
    L.append("")
    L.append("| config | first call in process (compile or cache load) | a fresh stream's (run's) first call, µs/step |")
    L.append("|---|---|---|")
    for r in results:
        o = r["ours"]
        L.append(f"| {r['label']} | {o['first_call_s'] * 1e3:.0f} ms | {_us(o['cold_call_us'])} |")
    for r in results:
        for key, label in (("cold_process_cached", "fresh process, warm Numba cache"),
                           ("cold_process_compile", "fresh process, empty Numba cache (JIT compile)")):
            cp = r["ours"].get(key)
            if cp and "error" not in cp:
                L.append(f"\n{label} ({r['label']}): import {cp['import_s']:.2f} s, model "
                         f"{cp['model_s'] * 1e3:.0f} ms, first step {cp['first_step_s']:.2f} s, "
                         f"second step {cp['second_step_us']:.0f} µs")
    notes = sorted({n for r in results for n in r.get("notes", []) if not n.startswith("check ")})
    if notes or doc["failures"]:
        L.append("")
        L.append("## Notes and failures")
        L.append("")
        for n in notes:
            L.append(f"- {n}")
        for f in doc["failures"]:
            L.append(f"- FAILED {f['label']}: {f['error']}")
    return "\n".join(L) + "\n"


# =============================================================================================
# Main
# =============================================================================================
def _sizes(text):
    out = []
    for part in text.split(";"):
        vals = tuple(int(v) for v in part.split(","))
        if len(vals) != 3:
            raise argparse.ArgumentTypeError(f"expected I,H,L[;I,H,L...], got {text!r}")
        out.append(vals)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short smoke run: 2 sizes, threads 1, T=100, few steps")
    ap.add_argument("--sizes", type=_sizes, help="override sizes, e.g. '32,64,1;128,256,2'")
    ap.add_argument("--threads", type=lambda s: [int(v) for v in s.split(",")],
                    help="override thread counts, e.g. '1,2'")
    ap.add_argument("--modes", type=lambda s: s.split(","),
                    help="subset of step,sequence1,sequence16,streams")
    ap.add_argument("--seq-len", type=int, help=f"sequence length (default {SEQ_LEN}, quick {QUICK_SEQ_LEN})")
    ap.add_argument("--compare", help="peers passed to lstm-cpu bench --compare (default: installed)")
    ap.add_argument("--cold", action="store_true", default=None,
                    help="measure fresh-process start-up once (default: on for the full matrix)")
    ap.add_argument("--keep-openblas-env", action="store_true",
                    help="keep OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE in the benchmark processes")
    ap.add_argument("--out", help="output path without extension (default bench/results, "
                                  "quick: bench/results-quick)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    if args.cold is None:
        args.cold = not args.quick
    out = args.out or os.path.join(HERE, "results-quick" if args.quick else "results")
    todo = configs(args)
    env, removed = bench_env(args.keep_openblas_env)
    if args.dry_run:
        for label, a in todo:
            print(f"{label}: lstm-cpu bench {shlex.join(a)}")
        return 0

    from lstm_cpu.bench.machine import machine_info, versions  # noqa: PLC0415

    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), ROOT)]
                         + list(sys.argv[1:] if argv is None else argv))
    results, failures = [], []
    t_all = time.perf_counter()
    for k, (label, a) in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {label} ...", end=" ", file=sys.stderr, flush=True)
        try:
            res, err, wall = run_one(a, env, args.timeout)
        except subprocess.TimeoutExpired:
            res, err, wall = None, f"timed out after {args.timeout:.0f} s", args.timeout
        if res is None:
            print(f"FAILED ({err})", file=sys.stderr)
            failures.append({"label": label, "argv": a, "error": err})
            continue
        res["label"], res["argv"] = label, a
        results.append(res)
        ratios = ", ".join(f"{n} {s['ratio_to_ours']:.2f}x" for n, s in res["runtimes"].items()
                           if s["kind"] == "peer")
        bad = [n for n, c in res["checks"].items() if not c["ok"]]
        print(f"{wall:.0f} s; ours p50 {res['runtimes']['lstm-cpu']['p50_us']:.1f} µs"
              + (f"; {ratios}" if ratios else "") + (f"; MISMATCH {bad}" if bad else ""),
              file=sys.stderr)
    # Machine facts from a process with the same environment as the benchmarks.
    probe = subprocess.run(
        [sys.executable, "-c", "import json; from lstm_cpu.bench.machine import machine_info, versions; "
         "print(json.dumps({'machine': machine_info(), 'versions': versions()}))"],
        env=env, cwd=ROOT, capture_output=True, text=True)
    facts = json.loads(probe.stdout) if probe.returncode == 0 else {
        "machine": machine_info(), "versions": versions()}
    doc = {
        "schema": "lstm-cpu-matrix/1",
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "quick": bool(args.quick),
            "wall_s": time.perf_counter() - t_all,
            "openblas_env_removed": removed,
            **facts,
        },
        "results": results,
        "failures": failures,
    }
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(doc))
    print(f"wrote {out}.md and {out}.json ({len(results)} configurations, {len(failures)} failed, "
          f"{doc['meta']['wall_s']:.0f} s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
