"""Properties of streaming (hypothesis): how a sequence is cut up must not change the answer.

* stepping one sample at a time == ``Stream.run`` over random chunk sizes == ``model.run``
* a batch of N streams == N single streams
* ``Stream.state`` get / set / reset round-trips, and the getter returns copies

Models are random canonical LayerParams (no torch needed), with the serial or the parallel kernel
(``LSTMModel(kernel=...)``, the default for the model's streams and runs). All of it is promised
bit for bit by the README and asserted with array_equal: the step and chunk paths share one
kernel; a stream in a batch computes exactly what it computes alone; ``model.run`` starts each
element's chain where a step does and continues it in the same order (tests/test_run_bits.py).
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lstm_cpu.model import LSTMModel  # noqa: E402
from lstm_cpu.spec import LayerParams  # noqa: E402



@st.composite
def models(draw):
    I = draw(st.integers(1, 9))
    # Mostly tiny; sometimes wide enough (>= 128) to be packed in 2 chunks for the parallel kernel.
    H = draw(st.one_of(st.integers(1, 12), st.sampled_from([70, 130])))
    L = draw(st.integers(1, 3))
    P = draw(st.sampled_from([0, 0, max(1, H // 2)])) if H > 1 else 0
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    out = P or H
    layers = []
    for l in range(L):
        fan_in = I if l == 0 else out
        # Scaled like PyTorch's init so gate pre-activations stay O(1) at any width: the property
        # is about chunking, not about float32 cancellation in a sum of hundreds of large terms.
        s = 1.5 / np.sqrt(fan_in + out)
        layers.append([LayerParams(
            w_ih=rng.uniform(-s, s, (4 * H, fan_in)),  # (4H, in)
            w_hh=rng.uniform(-s, s, (4 * H, out)),  # (4H, out)
            bias=rng.uniform(-0.5, 0.5, 4 * H) if bias else None,  # (4H,)
            w_hr=rng.uniform(-1.5, 1.5, (P, H)) / np.sqrt(H) if P else None,  # (P, H)
        )])
    kernel = draw(st.sampled_from(["serial", "parallel"]))
    return LSTMModel(layers, dtype=dtype, kernel=kernel), dtype, seed


def _chunks(draw, T):
    """Random chunk sizes summing to T, from random cut points (repeated cuts = empty chunks)."""
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=12)))
    bounds = [0] + cuts + [T]
    return [b - a for a, b in zip(bounds, bounds[1:])]


@given(data=st.data())
def test_step_equals_chunks_equals_run(data):
    model, dtype, seed = data.draw(models())
    T = data.draw(st.integers(1, 40))
    x = np.random.default_rng(seed + 1).standard_normal((T, model.input_size))  # (T, I) float64
    y_run, (h_run, c_run) = model.run(x)  # h (L, out), c (L, H)

    s = model.stream()
    y_step = np.stack([s.step(x[t]) for t in range(T)])  # (T, out)
    h_step, c_step = s.state

    s2 = model.stream()
    sizes = _chunks(data.draw, T)
    parts, t0 = [], 0
    for n in sizes:
        parts.append(s2.run(x[t0:t0 + n]))  # (n, out)
        t0 += n
    y_chunk = np.concatenate(parts)
    h_chunk, c_chunk = s2.state

    # Step vs chunks: the same kernel on the same numbers, bit for bit.
    np.testing.assert_array_equal(y_chunk, y_step, err_msg=f"chunks {sizes} vs step: y")
    np.testing.assert_array_equal(h_chunk, h_step, err_msg="chunks vs step: h")
    np.testing.assert_array_equal(c_chunk, c_step, err_msg="chunks vs step: c")
    # Step vs run: the projection's chains start where a step's do (tests/test_run_bits.py).
    np.testing.assert_array_equal(y_run, y_step, err_msg="step vs run: y")
    np.testing.assert_array_equal(h_run, h_step, err_msg="step vs run: h")
    np.testing.assert_array_equal(c_run, c_step, err_msg="step vs run: c")


@given(data=st.data())
def test_batch_of_streams_equals_single_streams(data):
    model, dtype, seed = data.draw(models())
    N = data.draw(st.integers(1, 5))
    T = data.draw(st.integers(1, 25))
    x = np.random.default_rng(seed + 2).standard_normal((T, N, model.input_size))  # (T, N, I)
    sb = model.stream(batch=N)
    yb = np.stack([sb.step(x[t]) for t in range(T)])  # (T, N, out)
    hb, cb = sb.state  # (L, N, out), (L, N, H)
    for n in range(N):
        s = model.stream()
        yn = np.stack([s.step(x[t, n]) for t in range(T)])  # (T, out)
        hn, cn = s.state
        np.testing.assert_array_equal(yb[:, n], yn, err_msg=f"batch item {n} y")
        np.testing.assert_array_equal(hb[:, n], hn, err_msg=f"batch item {n} h")
        np.testing.assert_array_equal(cb[:, n], cn, err_msg=f"batch item {n} c")
    # A sequence in a batched model.run: what it gives alone, and what the batched stream gives.
    yr, (hr, cr) = model.run(x)
    for n in range(N):
        yn, (hn, cn) = model.run(x[:, n])
        np.testing.assert_array_equal(yr[:, n], yn, err_msg=f"run: batch item {n} y")
        np.testing.assert_array_equal(cr[:, n], cn, err_msg=f"run: batch item {n} c")
    np.testing.assert_array_equal(yr, yb, err_msg="batch stream vs run: y")
    np.testing.assert_array_equal(hr, hb, err_msg="batch stream vs run: h")


@given(data=st.data())
def test_state_round_trip(data):
    model, dtype, seed = data.draw(models())
    batch = data.draw(st.sampled_from([None, 1, 3]))
    rng = np.random.default_rng(seed + 3)
    lead = () if batch is None else (batch,)
    T = data.draw(st.integers(1, 10))
    x = rng.standard_normal((T,) + lead + (model.input_size,))  # (T, [N,] I)
    s = model.stream(batch=batch)
    for t in range(T):
        s.step(x[t])

    # The getter returns copies: scribbling on them does not touch the stream.
    h, c = s.state  # (L, [N,] out), (L, [N,] H)
    h_keep, c_keep = h.copy(), c.copy()
    h[...] = 123.0
    c[...] = -7.0
    h2, c2 = s.state
    np.testing.assert_array_equal(h2, h_keep)
    np.testing.assert_array_equal(c2, c_keep)

    # set(get()) is the identity, and the next steps are then the same as never having set it.
    other = model.stream(batch=batch)
    other.state = (h_keep, c_keep)
    np.testing.assert_array_equal(other.state[0], h_keep)
    np.testing.assert_array_equal(other.state[1], c_keep)
    x2 = rng.standard_normal((5,) + lead + (model.input_size,))
    for t in range(5):
        np.testing.assert_array_equal(other.step(x2[t]), s.step(x2[t]))

    # Setting takes a copy too: changing the caller's arrays afterwards does nothing.
    h_new = rng.standard_normal(h_keep.shape)
    c_new = rng.standard_normal(c_keep.shape)
    s.state = (h_new, c_new)
    want_h, want_c = h_new.astype(dtype), c_new.astype(dtype)
    h_new[...] = 0.0
    c_new[...] = 0.0
    np.testing.assert_array_equal(s.state[0], want_h)
    np.testing.assert_array_equal(s.state[1], want_c)

    # A stream set to a state == run(x, state=that state).
    if batch is None:
        s3 = model.stream()
        st_h, st_c = rng.standard_normal(h_keep.shape), rng.standard_normal(c_keep.shape)
        s3.state = (st_h, st_c)
        ys = np.stack([s3.step(x2[t]) for t in range(5)])
        yr, (hr, cr) = model.run(x2, state=(st_h, st_c))
        np.testing.assert_array_equal(yr, ys, err_msg="set state + step vs run(state=)")
        np.testing.assert_array_equal(cr, s3.state[1], err_msg="set state + step vs run(state=): c")

    # reset() returns to zeros, and then behaves like a fresh stream.
    s.reset()
    assert not np.any(s.state[0]) and not np.any(s.state[1])
    fresh = model.stream(batch=batch)
    for t in range(3):
        np.testing.assert_array_equal(s.step(x2[t]), fresh.step(x2[t]))


def test_reset_returns_to_baked_initial_state():
    rng = np.random.default_rng(0)
    H, I = 4, 3
    p = LayerParams(w_ih=rng.standard_normal((4 * H, I)), w_hh=rng.standard_normal((4 * H, H)))
    h0, c0 = rng.standard_normal((1, H)), rng.standard_normal((1, H))  # (L*D, out), (L*D, H)
    model = LSTMModel([[p]], dtype=np.float64, initial_state=(h0, c0))
    s = model.stream()
    np.testing.assert_allclose(s.state[0], h0)
    np.testing.assert_allclose(s.state[1], c0)
    x = rng.standard_normal((6, I))
    ys = np.stack([s.step(x[t]) for t in range(6)])
    yr, _ = model.run(x)
    np.testing.assert_allclose(ys, yr, rtol=0, atol=1e-12)
    s.reset()
    np.testing.assert_allclose(s.state[0], h0)
    np.testing.assert_allclose(s.state[1], c0)
