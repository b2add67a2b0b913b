"""The streaming service example (examples/stream_server.py) under a small load.

The server runs in-process on an ephemeral loopback port; 8 clients x 50 samples each own a
stream of one shared model, and every reply must arrive, in order, bit-identical (as the README
promises) to a sequential ``model.stream().run`` of the same inputs. Also: protocol errors,
reset, clients vanishing mid-frame, and the server surviving all of it. The full-size run
(200 x 1000) is bench/reliability_service.py.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys

import numpy as np
import pytest

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

from load_test import client_inputs, run_load_test  # noqa: E402
from stream_server import ERROR, HELLO, LEN, StreamServer, default_model, require_loopback  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return default_model()


async def _with_server(model, fn, **kw):
    srv = StreamServer(model, "127.0.0.1", 0, **kw)
    host, port = await srv.start()
    try:
        return await asyncio.wait_for(fn(srv, host, port), 120)
    finally:
        await srv.close()


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "to_thread"])
def test_small_load_all_replies_in_order_and_exact(model, offload):
    async def go(srv, host, port):
        return await run_load_test(host, port, model, clients=8, samples=50, window=4, seed=3, timeout=100)

    rep = asyncio.run(_with_server(model, go, offload=offload))
    print("\n" + rep.markdown())
    assert rep.ok, rep.problems
    assert rep.received == 8 * 50
    assert rep.max_dev == 0.0, f"replies differ from a sequential run by {rep.max_dev:.3g}"  # bit-identical
    assert np.isfinite(rep.p50_ms) and rep.p99_ms >= rep.p50_ms


async def _hello(host, port):
    r, w = await asyncio.open_connection(host, port)
    I, O = HELLO.unpack(await r.readexactly(HELLO.size))
    return r, w, I, O


async def _step(r, w, x):
    w.write(LEN.pack(4 * x.size) + x.astype("<f4").tobytes())
    await w.drain()
    n = LEN.unpack(await r.readexactly(4))[0]
    return np.frombuffer(await r.readexactly(n), "<f4")


def test_protocol_errors_reset_and_disconnects(model):
    xs = client_inputs(5, 0, 6, model.input_size)  # (6, I)
    ref = model.stream(kernel="serial").run(xs)  # (6, O)

    async def go(srv, host, port):
        # a wrong frame length gets an error frame and a hang-up, never a huge read
        r, w, I, O = await _hello(host, port)
        assert (I, O) == (model.input_size, model.output_size)
        w.write(LEN.pack(0x7FFFFFF0))
        await w.drain()
        assert LEN.unpack(await r.readexactly(4))[0] == ERROR
        msg = (await r.readexactly(LEN.unpack(await r.readexactly(4))[0])).decode()
        assert "expected" in msg
        assert await r.read() == b""  # closed
        w.close()
        # vanishing mid-header and mid-frame
        for cut in (2, 4 + 10):
            r, w, I, O = await _hello(host, port)
            w.write((LEN.pack(4 * I) + xs[0].astype("<f4").tobytes())[:cut])
            await w.drain()
            w.close()
        # reset: the stream starts over; state is per connection
        r, w, I, O = await _hello(host, port)
        r2, w2, _, _ = await _hello(host, port)
        a = [await _step(r, w, xs[k]) for k in range(3)]
        b0 = await _step(r2, w2, xs[0])
        w.write(LEN.pack(0))
        await w.drain()
        assert LEN.unpack(await r.readexactly(4))[0] == 0
        again = [await _step(r, w, xs[k]) for k in range(6)]
        np.testing.assert_array_equal(np.stack(a), ref[:3])
        np.testing.assert_array_equal(b0, ref[0])
        np.testing.assert_array_equal(np.stack(again), ref)
        for ww in (w, w2):
            ww.close()
        await asyncio.sleep(0.05)
        return srv

    srv = asyncio.run(_with_server(model, go))
    assert srv.errors == 1
    assert srv.connections == 0, "a connection handler did not finish"


def test_loopback_only():
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            require_loopback(host)
    require_loopback("127.0.0.1")
    require_loopback("::1")


def test_many_short_connections_do_not_leak(model):
    """200 connect/step/close cycles: the server's connection count returns to zero."""
    x = client_inputs(9, 1, 1, model.input_size)[0]
    ref = model.stream(kernel="serial").run(x[None])[0]

    async def go(srv, host, port):
        async def one():
            r, w, _, _ = await _hello(host, port)
            y = await _step(r, w, x)
            w.close()
            return y

        ys = await asyncio.gather(*[one() for _ in range(200)])
        await asyncio.sleep(0.1)
        return srv, ys

    srv, ys = asyncio.run(_with_server(model, go))
    for y in ys:
        np.testing.assert_array_equal(y, ref)
    assert srv.connections == 0
    assert srv.served == 200


def test_hello_layout():
    assert HELLO.size == 8 and LEN.size == 4
    assert struct.pack("<I", ERROR) == b"\xff\xff\xff\xff"
