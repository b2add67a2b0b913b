"""The full service load test: 200 clients x 1,000 samples against examples/stream_server.py.

    nice -n 10 python bench/reliability_service.py
    python bench/reliability_service.py --clients 50 --samples 200 --window 1

The server runs in its own process (embedded default model, I=64, H=256, L=2, serial kernel,
inline steps); the clients run here on one asyncio loop, each owning one connection and so one
stream. Every reply is checked against a sequential ``model.stream().run`` of the same inputs.
Prints a markdown snippet; exit status 1 if any reply was missing, out of order or wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "examples"))
sys.path.insert(0, _ROOT)

import lstm_cpu  # noqa: E402
from load_test import run_load_test, spawn_server  # noqa: E402
from stream_server import default_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--nice", type=int, default=0, help="run the server under nice -n N")
    args = ap.parse_args(argv)
    model = default_model()
    proc, port = spawn_server(None, offload=args.offload, nice=args.nice)
    try:
        rep = asyncio.run(run_load_test("127.0.0.1", port, model, args.clients, args.samples, args.window,
                                        seed=0, timeout=args.timeout))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"### Service load test ({args.clients} clients x {args.samples:,} samples)\n")
    print(f"Server: examples/stream_server.py, embedded model {model!r}, one stream per connection, "
          f"kernel=serial, {'asyncio.to_thread' if args.offload else 'inline'} steps; clients in one "
          f"asyncio process, {args.window} samples in flight each; loopback; lstm-cpu threading layer "
          f"{lstm_cpu.threading_layer()}.\n")
    print(rep.markdown())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
