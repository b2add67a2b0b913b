"""Load test for examples/stream_server.py: C concurrent clients x S samples, verified.

Every client owns one connection (so one server-side stream), sends S samples of its own
seeded input sequence with up to ``--window`` samples in flight, and checks that every reply
arrives, in order, and matches what ``model.stream().run(xs)`` computes for the same inputs in
this process (bit-identical expected; the tolerance is 1e-6). It reports end-to-end latency per
sample (send -> reply received) as p50/p99, throughput, and the largest deviation.

    python examples/load_test.py                       # 200 clients x 1000 samples, spawns the server
    python examples/load_test.py --clients 8 --samples 50
    python examples/load_test.py --port 8765           # against a running server (same --model!)

Bounded: the whole run has a deadline (``--timeout``), each client a count of samples; it stops
by itself and exits 1 if anything was missing, late, out of order or wrong. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import lstm_cpu  # noqa: E402
from stream_server import ERROR, HELLO, LEN, default_model, require_loopback  # noqa: E402

TOLERANCE = 1e-6


def client_inputs(seed: int, client: int, samples: int, I: int) -> np.ndarray:
    """Client ``client``'s input sequence (S, I) float32, reproducible from (seed, client)."""
    return np.random.default_rng([seed, client]).standard_normal((samples, I)).astype(np.float32)


@dataclass
class ClientResult:
    client: int
    received: int = 0
    latencies: List[float] = field(default_factory=list)  # seconds, in sample order
    max_dev: float = 0.0
    bad: List[str] = field(default_factory=list)


async def run_client(host, port, client, xs, expected, window, hello_timeout=30.0) -> ClientResult:
    """Send xs (S, I) with up to ``window`` in flight; check each reply against expected (S, O)."""
    res = ClientResult(client)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), hello_timeout)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        I, O = HELLO.unpack(await asyncio.wait_for(reader.readexactly(HELLO.size), hello_timeout))
        S = xs.shape[0]
        if I != xs.shape[1] or O != expected.shape[1]:
            res.bad.append(f"server model is (I={I}, O={O}), expected (I={xs.shape[1]}, O={expected.shape[1]})")
            return res
        frames = [LEN.pack(4 * I) + xs[k].astype("<f4").tobytes() for k in range(S)]
        sent_at = [0.0] * S
        credit = asyncio.Semaphore(window)

        async def sender():
            for k in range(S):
                await credit.acquire()
                sent_at[k] = time.perf_counter()
                writer.write(frames[k])
                await writer.drain()

        send_task = asyncio.create_task(sender())
        try:
            for k in range(S):
                n = LEN.unpack(await reader.readexactly(4))[0]
                t = time.perf_counter()
                if n == ERROR:
                    m = LEN.unpack(await reader.readexactly(4))[0]
                    res.bad.append(f"sample {k}: server error: {(await reader.readexactly(m)).decode()}")
                    break
                if n != 4 * O:
                    res.bad.append(f"sample {k}: reply of {n} bytes, expected {4 * O}")
                    break
                y = np.frombuffer(await reader.readexactly(n), "<f4")  # (O,)
                res.latencies.append(t - sent_at[k])
                dev = float(np.max(np.abs(y - expected[k])))
                res.max_dev = max(res.max_dev, dev)
                if not dev <= TOLERANCE:  # also catches NaN
                    res.bad.append(f"sample {k}: reply differs from the sequential run by {dev:.3g}")
                res.received += 1
                credit.release()
        finally:
            send_task.cancel()
            try:
                await send_task
            except (asyncio.CancelledError, ConnectionError):
                pass
    except asyncio.IncompleteReadError:
        res.bad.append(f"connection closed after {res.received} replies")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return res


@dataclass
class LoadReport:
    clients: int
    samples: int
    window: int
    seconds: float
    received: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_dev: float
    problems: List[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.received == self.clients * self.samples

    def markdown(self) -> str:
        rate = self.received / self.seconds if self.seconds else 0.0
        return "\n".join([
            "| clients x samples | window | replies | wall time | throughput | p50 latency | p99 latency "
            "| max latency | max deviation vs sequential run |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {self.clients} x {self.samples} | {self.window} | {self.received} / {self.clients * self.samples} "
            f"| {self.seconds:.1f} s | {rate:,.0f} samples/s | {self.p50_ms:.2f} ms | {self.p99_ms:.2f} ms "
            f"| {self.max_ms:.1f} ms | {self.max_dev:.1e} |",
            "",
            "All replies arrived, in order, and matched." if self.ok else
            f"PROBLEMS ({len(self.problems)}): " + "; ".join(self.problems[:10]),
        ])


async def run_load_test(host: str, port: int, model, clients: int, samples: int, window: int = 4,
                        seed: int = 0, timeout: float = 600.0) -> LoadReport:
    """C clients x S samples against a server of ``model``; expected outputs computed here."""
    require_loopback(host)
    I = model.input_size
    inputs = [client_inputs(seed, c, samples, I) for c in range(clients)]
    # The reference: one stream per client, the whole sequence in one run() call.
    expected = [model.stream(kernel="serial").run(xs) for xs in inputs]  # each (S, O)
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(run_client(host, port, c, inputs[c], expected[c], window)) for c in range(clients)]
    problems = []
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        problems.append(f"{len(pending)} clients still running at the {timeout:.0f} s deadline")
        await asyncio.gather(*pending, return_exceptions=True)
    seconds = time.perf_counter() - t0
    results = []
    for t in done:
        if t.exception() is not None:
            problems.append(f"client failed: {type(t.exception()).__name__}: {t.exception()}")
        else:
            results.append(t.result())
    lat = np.array([v for r in results for v in r.latencies]) if results else np.zeros(0)
    for r in results:
        problems += [f"client {r.client}: {b}" for b in r.bad[:3]]
        if r.received != samples and not r.bad:
            problems.append(f"client {r.client}: {r.received} of {samples} replies")
    pct = (lambda q: float(np.percentile(lat, q) * 1e3) if lat.size else float("nan"))  # noqa: E731
    return LoadReport(clients, samples, window, seconds, sum(r.received for r in results), pct(50), pct(99),
                      float(lat.max() * 1e3) if lat.size else float("nan"),
                      max((r.max_dev for r in results), default=0.0), problems)


def spawn_server(model_path: Optional[str], kernel="serial", offload=False, nice=0):
    """Start examples/stream_server.py on a free loopback port; returns (Popen, port)."""
    cmd = [sys.executable, os.path.join(_HERE, "stream_server.py"), "--port", "0", "--print-port",
           "--kernel", kernel]
    if model_path:
        cmd += ["--model", model_path]
    if offload:
        cmd.append("--offload")
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the server did not start (printed {line!r})")
    return proc, int(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--window", type=int, default=4, help="samples in flight per client")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="an already running server; 0 spawns one")
    ap.add_argument("--model", help="model file the server uses (default: the embedded model)")
    ap.add_argument("--offload", action="store_true", help="spawned server steps in asyncio.to_thread")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    require_loopback(args.host)
    model = lstm_cpu.load(args.model) if args.model else default_model()
    proc = None
    port = args.port
    if not port:
        proc, port = spawn_server(args.model, offload=args.offload)
    try:
        rep = asyncio.run(run_load_test(args.host, port, model, args.clients, args.samples, args.window,
                                        args.seed, args.timeout))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(rep.markdown())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
