"""Stream serving on Ray Serve (lstm_cpu.serve) next to examples/stream_server.py, same machine.

C concurrent streams (1, 64, 512), each a closed loop: send one sample, wait for its output, send
the next (one step in flight per stream, as an edge client does). For each target the clients run
for ``--seconds`` after every stream has made its first steps; the report gives steps/s over all
streams and the p50/p99 of one step's round trip as the client sees it.

Targets:
    stream_server   examples/stream_server.py in its own process, TCP frames (its protocol)
    ray-ws R        lstm_cpu.serve with R replicas, WebSocket /streams/ws, binary float32 frames
    ray-handle R    the same app through its Python DeploymentHandle (``handle.step.remote``)

Validate before timing: for every target the first outputs of two streams are compared with local
``model.stream()`` outputs (bit-identical expected; a mismatch is flagged in the table).

    python bench/serve_ray.py                      # 1, 64, 512 streams; R = 1, 2; 8 s each
    python bench/serve_ray.py --streams 1,64 --seconds 3 --replicas 2

All clients run in this one process (asyncio), which is part of what is measured: on a small
machine it competes with the servers for the same cores. Loopback only.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, os.path.join(_ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from load_test import spawn_server  # noqa: E402
from stream_server import HELLO, LEN, default_model  # noqa: E402

WARM_STEPS = 2  # untimed steps per stream (creates the stream, loads its replica's kernels)


class Run:
    """Latencies and step counts of one (target, streams) cell."""

    def __init__(self):
        self.lat = []  # seconds per timed step
        self.steps = 0
        self.mismatch = False
        self.elapsed = 0.0
        self.warm = 0  # streams past their warm-up steps


async def _closed_loop(step, xs, ref, run: Run, start: asyncio.Event, stop_at: list):
    """One stream: WARM_STEPS untimed steps, then timed ones until stop_at[0]."""
    t = 0
    for _ in range(WARM_STEPS):
        y = await step(xs[t % len(xs)])
        if ref is not None and t < len(ref) and not np.array_equal(y, ref[t]):
            run.mismatch = True
        t += 1
    run.warm += 1
    await start.wait()
    while time.perf_counter() < stop_at[0]:
        t0 = time.perf_counter()
        y = await step(xs[t % len(xs)])
        run.lat.append(time.perf_counter() - t0)
        if ref is not None and t < len(ref) and not np.array_equal(y, ref[t]):
            run.mismatch = True
        run.steps += 1
        t += 1


async def _measure(make_steppers, n, xs, ref, seconds) -> Run:
    """Open n streams (``make_steppers`` yields async step functions), run them, close them."""
    run = Run()
    start, stop_at = asyncio.Event(), [float("inf")]
    steppers, closers = await make_steppers(n)
    tasks = [asyncio.create_task(_closed_loop(s, xs, ref if k < 2 else None, run, start, stop_at))
             for k, s in enumerate(steppers)]
    # The clock starts for everyone at once, when every stream exists and is warm.
    while run.warm < n and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    run.elapsed = time.perf_counter() - t0
    for c in closers:
        await c()
    return run


# -- targets ----------------------------------------------------------------------------------
def tcp_target(port):
    async def make(n):
        steppers, closers = [], []
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            I, O = HELLO.unpack(await reader.readexactly(HELLO.size))

            async def step(x, reader=reader, writer=writer, O=O):
                writer.write(LEN.pack(4 * x.size) + x.astype("<f4").tobytes())
                (m,) = LEN.unpack(await reader.readexactly(LEN.size))
                return np.frombuffer(await reader.readexactly(m), "<f4")

            async def close(writer=writer):
                writer.close()

            steppers.append(step)
            closers.append(close)
        return steppers, closers
    return make


def ws_target(port):
    from websockets.asyncio.client import connect

    async def make(n):
        steppers, closers = [], []
        for k in range(n):
            sid = f"bench-ws-{k}-{time.time_ns()}"
            ws = await connect(f"ws://127.0.0.1:{port}/streams/ws?stream_id={sid}", max_queue=None)
            json.loads(await ws.recv())  # hello

            async def step(x, ws=ws):
                await ws.send(x.astype("<f4").tobytes())
                return np.frombuffer(await ws.recv(), "<f4")

            steppers.append(step)
            closers.append(ws.close)
        return steppers, closers
    return make


def handle_target(handle):
    async def make(n):
        tag = time.time_ns()
        steppers, closers = [], []
        for k in range(n):
            sid = f"bench-h-{k}-{tag}"

            async def step(x, sid=sid):
                return await handle.step.remote(sid, x)

            async def close(sid=sid):
                await handle.end.remote(sid)

            steppers.append(step)
            closers.append(close)
        return steppers, closers
    return make


# -- report -----------------------------------------------------------------------------------
def _row(name, n, run: Run) -> dict:
    lat = np.asarray(run.lat) * 1e3
    return {"target": name, "streams": n, "steps": run.steps,
            "steps_per_s": run.steps / run.elapsed if run.elapsed else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "mismatch": run.mismatch}


def markdown(rows) -> str:
    out = ["| target | streams | steps/s | p50 ms | p99 ms | timed steps | outputs |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['target']} | {r['streams']} | {r['steps_per_s']:,.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['steps']:,} | "
                   f"{'MISMATCH' if r['mismatch'] else 'bit-identical'} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,64,512", help="concurrent streams (default 1,64,512)")
    ap.add_argument("--replicas", default="1,2", help="replica counts of the Ray app (default 1,2)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per cell (default 8)")
    ap.add_argument("--no-server", action="store_true", help="skip examples/stream_server.py")
    ap.add_argument("--no-handle", action="store_true", help="skip the DeploymentHandle client")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    counts = [int(v) for v in args.streams.split(",")]
    replicas = [int(v) for v in args.replicas.split(",")]

    model = default_model()
    xs = np.random.default_rng(0).standard_normal((64, model.input_size)).astype(np.float32)
    ref = model.stream().run(xs)  # (64, out): what every stream's first outputs must be
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "default.lstm")
    model.save(path)
    print(f"model {model!r}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
          flush=True)
    rows = []

    def cell(name, target, n):
        r = _row(name, n, asyncio.run(_measure(target, n, xs, ref, args.seconds)))
        rows.append(r)
        print(markdown([r]).splitlines()[-1], flush=True)

    if not args.no_server:
        proc, port = spawn_server(path)
        try:
            for n in counts:
                cell("stream_server (TCP)", tcp_target(port), n)
        finally:
            proc.terminate()
            proc.wait(10)

    import ray
    from ray import serve

    from lstm_cpu.serve import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": _ROOT}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        for R in replicas:
            handle = serve.run(app(path, replicas=R), name="bench", route_prefix="/")
            for n in counts:
                cell(f"ray-ws R={R}", ws_target(http_port), n)
                if not args.no_handle:
                    cell(f"ray-handle R={R}", handle_target(handle), n)
    finally:
        serve.shutdown()
        ray.shutdown()
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["mismatch"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
