"""Full-size fuzz of every model loader: >= 10,000 mutated files, one markdown snippet out.

    nice -n 10 python bench/reliability_fuzz.py                 # 10,000 files, seed 1
    python bench/reliability_fuzz.py --cases 20000 --seed 5

The engine is tests/test_fuzz.py (the suite runs 1,200 files of it): seed models of every format
(packed, .safetensors, .pt, .onnx) mutated byte-blind and structure-aware, each loaded in a child
process under RLIMIT_AS (4 GiB) with a per-file hang timer; a crash restarts the child after the
crashing case. A failure matching a known, reported bug is counted separately (see KNOWN_BUGS in
tests/test_fuzz.py). Exit status 1 if anything new failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))
sys.path.insert(0, _ROOT)

import test_fuzz as fz  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--keep", default=None, help="folder to keep failing files in")
    ap.add_argument("--nice", type=int, default=0, help="run the fuzz child under nice -n N")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="lstm-fuzz-bench-")
    rep = fz.run_fuzz(args.seed, args.cases, work, timeout_s=args.timeout, max_restarts=50,
                      keep_dir=args.keep or os.path.join(work, "kept"), nice=args.nice)
    known = Counter(fz.known_bug(f) for f in rep.failures if fz.known_bug(f))
    new = [f for f in rep.failures if not fz.known_bug(f)]
    print(f"### Loader fuzz ({rep.done:,} files)\n")
    print(fz.markdown_summary(rep))
    print()
    if known:
        print("Known, reported bugs hit: " + ", ".join(f"{k} x{n}" for k, n in known.most_common())
              + " (see KNOWN_BUGS in tests/test_fuzz.py).")
    print(f"New failures: {len(new)}." + ("" if not new else "\n\n" + fz.FuzzReport(rep.seed, 0, failures=new)
                                          .describe_failures(30)))
    if rep.seed_errors:
        print(f"\nSeed models that did not load: {rep.seed_errors}")
    print(f"\n(work folder: {work})")
    return 1 if new or rep.seed_errors or rep.done < args.cases else 0


if __name__ == "__main__":
    sys.exit(main())
