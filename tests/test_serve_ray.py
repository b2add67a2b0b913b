"""Stream serving on Ray Serve (lstm_cpu.serve, issue 14) on a local Ray instance.

One module-scoped ``ray.init(num_cpus=2)`` and one application with 2 replicas; every output is
compared with local ``Stream``s of the same model by ``array_equal`` (the service promises
bit-identity). Loopback only. Without ray these tests skip, except under CI (``CI`` set), where
a missing ray is a failure: the test extra installs it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import lstm_cpu
from lstm_cpu import LayerParams, LSTMModel

try:
    import ray
    from ray import serve

    HAVE_RAY = True
except ImportError:  # pragma: no cover - exercised on machines without the serve extra
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(not HAVE_RAY and not os.environ.get("CI"),
                               reason="ray[serve] is not installed (pip install -e '.[serve]')")

I, H, L = 12, 24, 2
APP = "lstm"
CKPT = 5  # checkpoint_every of the test app


def test_import_lstm_cpu_does_not_import_ray():
    code = ("import sys, lstm_cpu, lstm_cpu.cli, lstm_cpu.model; "
            "bad = [m for m in ('ray', 'lstm_cpu.serve', 'fastapi') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


def test_cli_serve_fails_cleanly_without_starting_ray(tmp_path, capsys):
    from lstm_cpu.cli import main

    assert main(["serve", str(tmp_path / "missing.lstm"), "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert "missing.lstm" in err or "pip install 'lstm-cpu[serve]'" in err, err
    assert main(["serve", "m.lstm", "--replicas", "0"]) == 2  # bad usage
    if HAVE_RAY:
        from lstm_cpu.serve import app

        path = str(tmp_path / "m.lstm")
        _model().save(path)
        for bad in [{"replicas": 0}, {"idle_timeout_s": float("nan")}, {"max_batch": 2.5},
                    {"checkpoint_every": -1}, {"batch_wait_ms": "1"}]:
            with pytest.raises(lstm_cpu.InputError, match=next(iter(bad))):
                app(path, **bad)
    if HAVE_RAY:
        assert not ray.is_initialized()


def test_ray_present_in_ci():
    """CI installs the test extra, which includes ray[serve]: its absence there is a failure."""
    if os.environ.get("CI"):
        assert HAVE_RAY, "CI is set but ray[serve] is missing: the test extra must install it"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
def _model(seed=1, hidden=H) -> LSTMModel:
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(hidden)
    layers = [[LayerParams(w_ih=rng.uniform(-s, s, (4 * hidden, I if l == 0 else hidden)),
                           w_hh=rng.uniform(-s, s, (4 * hidden, hidden)),
                           bias=rng.uniform(-s, s, 4 * hidden))] for l in range(L)]
    return LSTMModel(layers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "m.lstm"
    model = _model()
    model.save(str(path))
    return str(path), model


@pytest.fixture(scope="module")
def cluster(model_file):
    from lstm_cpu.serve import app

    port = _free_port()
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # workers import this tree
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        path, _ = model_file
        handle = serve.run(app(path, replicas=2, checkpoint_every=CKPT), name=APP,
                           route_prefix="/")
        yield {"handle": handle, "port": port, "path": path}
    finally:
        serve.shutdown()
        ray.shutdown()


def _reference(model, xs):
    """Outputs of local streams: xs (S, T, I) -> (S, T, out), each stream stepped alone."""
    return np.stack([model.stream().run(x) for x in xs])


async def _drive(clients, xs, barrier=None):
    """Step client s through xs[s] concurrently; ``barrier(t)`` is awaited before step t."""
    async def one(c, x):
        out = []
        for t in range(len(x)):
            if barrier is not None:
                await barrier(t)
            out.append(await c.step(x[t]))
        return np.stack(out)
    return await asyncio.gather(*[one(c, x) for c, x in zip(clients, xs)], return_exceptions=True)


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def _clients(handle, prefix, S, T, seed):
    """Inputs xs (S, T, I) and S StreamClients named prefix-0..S-1."""
    from lstm_cpu.serve import StreamClient

    xs = np.random.default_rng(seed).standard_normal((S, T, I)).astype(np.float32)
    return xs, [StreamClient(handle, f"{prefix}-{s}", keep=CKPT) for s in range(S)]


def _raise_any(outs):
    for o in outs:
        if isinstance(o, BaseException):
            raise o
    return np.stack(outs)


# ------------------------------------------------------------------------------------------------
# the pieces, without a cluster: batching rounds and the hash ring
# ------------------------------------------------------------------------------------------------
@needs_ray
def test_a_round_of_64_streams_is_bit_identical_to_each_alone():
    """64 concurrent steps go through one round, split below the engine's BLAS threshold."""
    from lstm_cpu.serve.batcher import GROUP_MAX, StepBatcher, StreamRecord

    model = _model()
    S, T = 64, 12
    xs = np.random.default_rng(11).standard_normal((S, T, I)).astype(np.float32)
    h0, c0 = model.stream().state
    recs = [StreamRecord(f"s{s}", h0.copy(), c0.copy()) for s in range(S)]
    b = StepBatcher(model, max_batch=S, wait_s=0.05)

    async def go():
        out = []
        for t in range(T):
            out.append(await asyncio.gather(*[b.submit(r, xs[s, t]) for s, r in enumerate(recs)]))
        b.close()
        return np.stack(out, axis=1)  # (S, T, out)

    np.testing.assert_array_equal(_run(go()), _reference(model, xs))
    assert b.rounds == T and b.stepped == S * T  # every round held all 64 streams
    assert S > GROUP_MAX  # so the round was split into groups
    assert all(r.steps == T for r in recs)


@needs_ray
def test_hash_ring_spreads_and_moves_only_the_new_nodes_share():
    from lstm_cpu.serve.router import HashRing

    keys = [f"stream-{k}" for k in range(4000)]
    two = HashRing(["a", "b"])
    three = HashRing(["a", "b", "c"])
    before = [two.node(k) for k in keys]
    after = [three.node(k) for k in keys]
    share = before.count("a") / len(keys)
    assert 0.35 < share < 0.65
    moved = [(x, y) for x, y in zip(before, after) if x != y]
    assert all(y == "c" for _, y in moved)  # nothing moves between the old nodes
    assert 0.2 < len(moved) / len(keys) < 0.45  # ~1/3 moves to the new node
    assert HashRing(["b", "a"]).node("x") == two.node("x")  # a function of the set, not the order


# ------------------------------------------------------------------------------------------------
# equality and routing
# ------------------------------------------------------------------------------------------------
@needs_ray
def test_64_streams_bit_identical_and_spread(cluster, model_file):
    _, model = model_file
    h = cluster["handle"]
    S, T = 64, 200
    xs, clients = _clients(h, "eq", S, T, seed=2)
    outs = _raise_any(_run(_drive(clients, xs)))
    np.testing.assert_array_equal(outs, _reference(model, xs))
    assert all(c.replayed == 0 for c in clients)
    where = {h.where.remote(f"eq-{s}").result() for s in range(S)}
    assert len(where) == 2 and None not in where  # both replicas hold streams
    # Batched: rounds held several streams (how many depends on the machine's load; a full
    # round of 64 is test_a_round_of_64_streams_is_bit_identical_to_each_alone).
    sh = serve.get_deployment_handle("LSTMStreams", APP)
    stats = [sh.stats.remote(_to=r).result() for r in where]
    assert sum(s["stepped"] for s in stats) >= S * T
    assert sum(s["stepped"] for s in stats) > sum(s["rounds"] for s in stats)


@needs_ray
def test_sticky_routing_without_a_directory_lookup(cluster):
    """Every call for one id reaches the replica holding it: no stream ever moves by itself."""
    h = cluster["handle"]
    x = np.zeros(I, np.float32)
    for s in range(8):
        h.step.remote(f"sticky-{s}", x).result()
    first = [h.where.remote(f"sticky-{s}").result() for s in range(8)]
    for _ in range(5):
        for s in range(8):
            h.step.remote(f"sticky-{s}", x).result()
    assert [h.where.remote(f"sticky-{s}").result() for s in range(8)] == first
    for s in range(8):
        assert h.end.remote(f"sticky-{s}").result() is True


# ------------------------------------------------------------------------------------------------
# snapshot / restore
# ------------------------------------------------------------------------------------------------
def _ids_on_two_replicas(h, prefix):
    """Two stream ids held by different replicas (stepped once, with a zero input)."""
    x = np.zeros(I, np.float32)
    seen = {}
    for k in range(64):
        sid = f"{prefix}-{k}"
        h.step.remote(sid, x).result()
        seen.setdefault(h.where.remote(sid).result(), sid)
        if len(seen) == 2:
            return list(seen.values())
    raise AssertionError(f"64 ids all landed on one replica: {seen}")


@needs_ray
def test_snapshot_restore_across_replicas_bit_exact(cluster, model_file):
    _, model = model_file
    h = cluster["handle"]
    a, b = _ids_on_two_replicas(h, "snap")
    assert h.where.remote(a).result() != h.where.remote(b).result()
    xs = np.random.default_rng(3).standard_normal((40, I)).astype(np.float32)
    ref_stream = model.stream()
    ref_stream.step(np.zeros(I, np.float32))  # both ids were started with one zero step
    ref = ref_stream.run(xs)  # (40, out)
    for t in range(20):
        np.testing.assert_array_equal(h.step.remote(a, xs[t]).result(), ref[t])
    blob = h.snapshot.remote(a).result()
    assert h.restore.remote(b, blob).result() == 21  # steps travel with the state
    for t in range(20, 40):  # b continues a's run on the other replica, and a goes on as well
        np.testing.assert_array_equal(h.step.remote(b, xs[t]).result(), ref[t])
        np.testing.assert_array_equal(h.step.remote(a, xs[t]).result(), ref[t])
    # restoring an older snapshot rewinds exactly
    assert h.restore.remote(a, blob).result() == 21
    np.testing.assert_array_equal(h.step.remote(a, xs[20]).result(), ref[20])
    for sid in (a, b):
        h.end.remote(sid).result()


# ------------------------------------------------------------------------------------------------
# bad input: typed errors, other streams undisturbed
# ------------------------------------------------------------------------------------------------
@needs_ray
def test_bad_input_typed_and_isolated(cluster, model_file, tmp_path):
    from lstm_cpu.serve import ModelMismatch, SnapshotError, StreamNotFound

    _, model = model_file
    h = cluster["handle"]
    xs = np.random.default_rng(4).standard_normal((6, I)).astype(np.float32)
    ref = model.stream().run(xs)
    y0 = h.step.remote("bad-ok", xs[0]).result()
    h.step.remote("bad-victim", xs[0]).result()

    cases = [(np.zeros(I + 1, np.float32), lstm_cpu.InputError, "shape"),
             (np.zeros((1, I), np.float32), lstm_cpu.InputError, "shape"),
             (np.array(["a"] * I), lstm_cpu.InputTypeError, "numeric"),
             ({"x": 1}, lstm_cpu.InputTypeError, "numeric"),
             (np.zeros(1 << 16, np.float32), lstm_cpu.InputError, "shape")]  # oversized
    for x, err, words in cases:
        with pytest.raises(err, match=words):
            h.step.remote("bad-victim", x).result()
    with pytest.raises(lstm_cpu.InputTypeError):
        h.step.remote(17, xs[1]).result()  # a non-str stream id
    with pytest.raises(lstm_cpu.InputError):
        h.step.remote("x" * 1000, xs[1]).result()

    blob = h.snapshot.remote("bad-victim").result()
    corrupt = bytearray(blob)
    corrupt[60] ^= 0xFF
    for bad, err in [(bytes(corrupt), SnapshotError), (blob[:-9], SnapshotError),
                     (b"not a snapshot at all", SnapshotError), ("text", SnapshotError)]:
        with pytest.raises(err):
            h.restore.remote("bad-victim", bad).result()
    # a valid snapshot of another model (same sizes, other weights) is refused
    from lstm_cpu.serve.snapshot import fingerprint, pack

    other = _model(seed=9)
    hh, cc = other.stream().state
    with pytest.raises(ModelMismatch):
        h.restore.remote("bad-victim", pack(fingerprint(other), 3, hh, cc)).result()
    assert isinstance(ModelMismatch("x"), lstm_cpu.LSTMError)
    with pytest.raises(StreamNotFound):
        h.snapshot.remote("bad-never-stepped").result()

    # none of it disturbed either stream: both continue exactly
    np.testing.assert_array_equal(y0, ref[0])
    for t in range(1, 6):
        np.testing.assert_array_equal(h.step.remote("bad-victim", xs[t]).result(), ref[t])
        np.testing.assert_array_equal(h.step.remote("bad-ok", xs[t]).result(), ref[t])
    for sid in ("bad-ok", "bad-victim"):
        h.end.remote(sid).result()


@needs_ray
def test_seq_mismatch_is_stream_lost_not_a_value(cluster):
    from lstm_cpu.serve import StreamLost

    h = cluster["handle"]
    x = np.ones(I, np.float32)
    h.step.remote("seq-a", x, seq=0).result()
    with pytest.raises(StreamLost) as e:
        h.step.remote("seq-a", x, seq=5).result()  # the client thinks it is further on
    assert e.value.resume_from == 1
    with pytest.raises(StreamLost) as e:
        h.step.remote("seq-new", x, seq=3).result()  # an unknown id is not silently step 0
    assert e.value.resume_from == 0
    h.end.remote("seq-a").result()
    h.end.remote("seq-new").result()


# ------------------------------------------------------------------------------------------------
# network ingress
# ------------------------------------------------------------------------------------------------
def _http(port, method, path, body=None, ctype="application/octet-stream"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@needs_ray
def test_http_steps_by_stream_id(cluster, model_file):
    _, model = model_file
    port = cluster["port"]
    xs = np.random.default_rng(5).standard_normal((5, I)).astype(np.float32)
    ref = model.stream().run(xs)
    for t in range(3):  # binary float32
        status, body = _http(port, "POST", "/streams/http-a/step", xs[t].astype("<f4").tobytes())
        assert status == 200
        np.testing.assert_array_equal(np.frombuffer(body, "<f4"), ref[t])
    status, body = _http(port, "POST", "/streams/http-a/step",  # JSON (float32 values exactly)
                         json.dumps({"x": [float(v) for v in xs[3]]}).encode(), "application/json")
    assert status == 200
    np.testing.assert_array_equal(np.asarray(json.loads(body)["y"], np.float32), ref[3])
    # bad input: typed JSON errors, the stream untouched
    status, body = _http(port, "POST", "/streams/http-a/step", b"\0" * (4 * I + 4))
    assert status == 400 and json.loads(body)["error"] == "InputError"
    status, body = _http(port, "POST", "/streams/http-a/step", b'{"x": ["a"]}', "application/json")
    assert status == 400 and json.loads(body)["error"] == "InputTypeError"
    status, body = _http(port, "POST", "/streams/http-a/step", b"\0" * (1 << 20))
    assert status == 400 and "oversized" in json.loads(body)["message"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # no length: chunked, endless
    conn.request("POST", "/streams/http-a/step", body=iter([b"\0" * 65536] * 64),
                 encode_chunked=True, headers={"Content-Type": "application/octet-stream"})
    r = conn.getresponse()
    assert r.status == 400 and "oversized" in json.loads(r.read())["message"]
    conn.close()
    status, body = _http(port, "POST", "/streams/http-a/step?seq=9", xs[4].astype("<f4").tobytes())
    assert status == 409 and json.loads(body)["resume_from"] == 4
    status, body = _http(port, "POST", "/streams/http-a/step?seq=4", xs[4].astype("<f4").tobytes())
    np.testing.assert_array_equal(np.frombuffer(body, "<f4"), ref[4])
    status, body = _http(port, "GET", "/streams/http-a/where")
    assert status == 200 and json.loads(body)["replica"]
    status, body = _http(port, "DELETE", "/streams/http-a")
    assert status == 200 and json.loads(body) == {"ended": True}


@needs_ray
def test_websocket_one_stream_per_connection(cluster, model_file):
    from websockets.asyncio.client import connect  # installed by ray[serve] (uvicorn[standard])

    _, model = model_file
    xs = np.random.default_rng(6).standard_normal((2, 8, I)).astype(np.float32)
    ref = _reference(model, xs)

    async def client(k):
        url = f"ws://127.0.0.1:{cluster['port']}/streams/ws?stream_id=ws-{k}"
        async with connect(url) as ws:
            hello = json.loads(await ws.recv())
            assert hello == {"stream_id": f"ws-{k}", "input_size": I,
                             "output_size": model.output_size, "dtype": "float32", "steps": 0}
            out = []
            for t in range(8):
                if t == 3:  # bad frames between good ones: typed errors, stream untouched
                    for bad, err in [("text", "InputTypeError"), (b"\0" * 7, "InputError"),
                                     (b"\0" * (4 * I * 50), "InputError")]:
                        await ws.send(bad)
                        msg = json.loads(await ws.recv())
                        assert msg["error"] == err, msg
                await ws.send(xs[k, t].astype("<f4").tobytes())
                out.append(np.frombuffer(await ws.recv(), "<f4"))
            return np.stack(out)

    async def both():
        return await asyncio.gather(client(0), client(1))

    async def resumed():  # keep=1: the stream outlives its connection and a new one resumes it
        url = f"ws://127.0.0.1:{cluster['port']}/streams/ws?stream_id=ws-keep&keep=1"
        out = []
        for part in (range(0, 3), range(3, 8)):
            async with connect(url) as ws:
                assert json.loads(await ws.recv())["steps"] == part[0]
                for t in part:
                    await ws.send(xs[0, t].astype("<f4").tobytes())
                    out.append(np.frombuffer(await ws.recv(), "<f4"))
        return np.stack(out)

    outs = _run(both())
    np.testing.assert_array_equal(np.stack(outs), ref)
    np.testing.assert_array_equal(_run(resumed()), ref[0])
    assert cluster["handle"].end.remote("ws-keep").result() is True
    h = cluster["handle"]
    deadline = time.monotonic() + 10  # the stream ends with its connection
    while h.where.remote("ws-0").result() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert h.where.remote("ws-0").result() is None


# ------------------------------------------------------------------------------------------------
# lifecycle: end and idle expiry (the app reconfigured to a 1 s idle timeout, no restart)
# ------------------------------------------------------------------------------------------------
@needs_ray
def test_end_and_idle_expiry(cluster, model_file):
    from lstm_cpu.serve import StreamExpired, app

    _, model = model_file
    h = cluster["handle"]
    serve.run(app(cluster["path"], replicas=2, checkpoint_every=CKPT, idle_timeout_s=1.0),
              name=APP, route_prefix="/")
    assert h.info.remote().result()["idle_timeout_s"] == 1.0
    try:
        xs = np.random.default_rng(7).standard_normal((3, I)).astype(np.float32)
        ref = model.stream().run(xs)
        h.step.remote("life-a", xs[0]).result()
        h.step.remote("life-a", xs[1]).result()
        assert h.end.remote("life-a").result() is True
        assert h.where.remote("life-a").result() is None
        # after end, the id starts afresh from the initial state
        np.testing.assert_array_equal(h.step.remote("life-a", xs[0]).result(), ref[0])

        h.step.remote("life-b", xs[0]).result()
        time.sleep(3.0)  # > idle_timeout_s + the reaper's period
        with pytest.raises(StreamExpired):
            h.step.remote("life-b", xs[1]).result()  # not a fresh state
        with pytest.raises(StreamExpired):
            h.step.remote("life-b", xs[1]).result()  # and it stays expired
        assert h.end.remote("life-b").result() is True
        np.testing.assert_array_equal(h.step.remote("life-b", xs[0]).result(), ref[0])
        assert h.end.remote("never-seen").result() is False
    finally:
        serve.run(app(cluster["path"], replicas=2, checkpoint_every=CKPT), name=APP,
                  route_prefix="/")


# ------------------------------------------------------------------------------------------------
# migration on scale-down / scale-up, and a replica dying
# ------------------------------------------------------------------------------------------------
class _Phases:
    """Lets every client reach step ``t`` before an operator action runs, then releases them."""

    def __init__(self, n_clients, actions):
        self.n, self.actions = n_clients, dict(actions)  # step -> callable run in a thread
        self.waiting = {t: 0 for t in self.actions}
        self.done = {t: asyncio.Event() for t in self.actions}

    async def __call__(self, t):
        if t not in self.actions:
            return
        self.waiting[t] += 1
        if self.waiting[t] == self.n:
            await asyncio.to_thread(self.actions[t])
            self.done[t].set()
        await self.done[t].wait()


@needs_ray
def test_scale_2_1_2_migrates_every_stream_exactly(cluster, model_file):
    from lstm_cpu.serve import app

    _, model = model_file
    h = cluster["handle"]
    S, T = 16, 45
    xs, clients = _clients(h, "scale", S, T, seed=8)
    where = {}

    def scale(n, tag):
        def act():
            where[tag] = [h.where.remote(f"scale-{s}").result() for s in range(S)]
            serve.run(app(cluster["path"], replicas=n, checkpoint_every=CKPT), name=APP,
                      route_prefix="/")
        return act

    outs = _raise_any(_run(_drive(clients, xs, _Phases(S, {15: scale(1, "two"),
                                                           30: scale(2, "one")}))))
    np.testing.assert_array_equal(outs, _reference(model, xs))
    assert [c.replayed for c in clients] == [0] * S  # exact migration, not checkpoint replay
    assert len(set(where["two"])) == 2 and len(set(where["one"])) == 1
    after = [h.where.remote(f"scale-{s}").result() for s in range(S)]
    assert len(set(after)) == 2  # spread again over the new pair
    for c in clients:
        _run(c.end())


@needs_ray
def test_directory_restart_keeps_live_streams_exact(cluster, model_file):
    """The directory (ownership, checkpoints) dies: streams on live replicas go on exactly."""
    _, model = model_file
    h = cluster["handle"]
    S, T = 8, 24
    xs, clients = _clients(h, "dir", S, T, seed=12)

    def kill_directory():
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if "#LSTMStreamDirectory#" in a["name"])
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    outs = _raise_any(_run(_drive(clients, xs, _Phases(S, {12: kill_directory}))))
    np.testing.assert_array_equal(outs, _reference(model, xs))
    assert [c.replayed for c in clients] == [0] * S
    # the new directory learnt from the replicas who holds what (so a moved stream is not "new")
    dh = serve.get_deployment_handle("LSTMStreamDirectory", APP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        owners = [dh.owner.remote(f"dir-{s}").result() for s in range(S)]
        if None not in owners:
            break
        time.sleep(0.2)
    assert owners == [h.where.remote(f"dir-{s}").result() for s in range(S)]
    # a new stream after the restart starts at the initial state
    y = h.step.remote("dir-new", xs[0, 0]).result()
    np.testing.assert_array_equal(y, model.stream().step(xs[0, 0]))
    h.end.remote("dir-new").result()
    for c in clients:
        _run(c.end())


@needs_ray
def test_killed_replica_continues_exactly_or_raises_stream_lost(cluster, model_file):
    from lstm_cpu.serve import StreamLost

    _, model = model_file
    h = cluster["handle"]
    S, T = 16, 40
    xs, clients = _clients(h, "kill", S, T, seed=10)
    victims = {}
    # Raw handle streams (no seq, no client help) stepped 7 times: checkpoint at step 5.
    R = 6
    xr = np.random.default_rng(13).standard_normal((R, 12, I)).astype(np.float32)
    ref_raw = _reference(model, xr)
    for t in range(7):
        for r in range(R):
            h.step.remote(f"raw-{r}", xr[r, t]).result()
    raw_where = [h.where.remote(f"raw-{r}").result() for r in range(R)]

    def kill():
        where = [h.where.remote(f"kill-{s}").result() for s in range(S)]
        victim = raw_where[0]
        victims.update({s: w == victim for s, w in enumerate(where)})
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#LSTMStreams#{victim}", namespace="serve")
        ray.kill(actor, no_restart=True)

    async def mid_run(t):  # at step 17 the kill starts, and the clients go on stepping;
        if t == 17 and not victims:  # from step 22 on they wait until it has happened
            victims["task"] = asyncio.ensure_future(asyncio.to_thread(kill))
        if t == 22:
            await asyncio.shield(victims["task"])

    outs = _run(_drive(clients, xs, mid_run))
    victims.pop("task")
    ref = _reference(model, xs)
    exact = lost = 0
    for s, o in enumerate(outs):
        if isinstance(o, StreamLost):
            lost += 1
        elif isinstance(o, BaseException):
            raise o
        else:
            np.testing.assert_array_equal(o, ref[s])  # never a wrong value
            exact += 1
    assert exact + lost == S and sum(victims.values()) >= 1
    hit = [(clients[s].replayed, clients[s].retries) for s in range(S) if victims[s]]
    assert any(r or n for r, n in hit), hit  # the failure did reach the victims' streams
    assert all(r <= CKPT for r, _ in hit), hit  # replay bounded by the checkpoint period
    # with the client's inputs kept, every stream continued exactly
    assert exact == S, (exact, hit, [str(o) for o in outs if isinstance(o, BaseException)])
    assert [clients[s].replayed for s in range(S) if not victims[s]] == [0] * (S - len(hit))
    # A raw stream of the dead replica is back at its checkpoint: StreamLost says from where to
    # resend, and from there every output is exact; the others just go on.
    for r in range(R):
        t = 7
        if raw_where[r] == raw_where[0]:
            with pytest.raises(StreamLost) as e:
                h.step.remote(f"raw-{r}", xr[r, 7]).result()
            assert e.value.resume_from == 5
            t = 5
        for t in range(t, 12):
            np.testing.assert_array_equal(h.step.remote(f"raw-{r}", xr[r, t]).result(),
                                          ref_raw[r, t])
