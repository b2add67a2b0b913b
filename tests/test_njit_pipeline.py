"""A stream's step called from the user's own @numba.njit code (issue 12, item 5).

``stream.numba_args()`` gives the arrays ``(wbuf, meta, fpar, sbuf)`` that
``lstm_cpu.kernels.stack_step_serial(x, wbuf, meta, fpar, sbuf, y)`` takes; ``sbuf`` is the
stream's live state. A feature -> LSTM -> decision loop then compiles into one function with no
Python between steps, and must give exactly what ``stream.step`` gives, and leave the stream in
exactly the state ``stream.step`` would (it can carry on with either).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lstm_cpu import LayerParams, LSTMModel
from lstm_cpu.kernels import stack_step_serial

I, H = 32, 64


def _model(layers, head):
    rng = np.random.default_rng(3)
    params = [[LayerParams(rng.uniform(-.3, .3, (4 * H, I if l == 0 else H)),  # (4H, in)
                           rng.uniform(-.3, .3, (4 * H, H)),  # (4H, H)
                           rng.uniform(-.3, .3, 4 * H))]  # (4H,)
              for l in range(layers)]
    hw = (rng.uniform(-.3, .3, (3, H)), rng.uniform(-.3, .3, 3)) if head else None  # (O, H), (O,)
    return LSTMModel(params, head=hw)


@numba.njit
def _features(signal, t, x):
    """x (N*I,) <- first difference of signal (T, N*I) at t: the user's feature code."""
    for i in range(x.shape[0]):
        x[i] = (signal[t, i] - signal[t - 1, i]) if t > 0 else signal[t, i]


@numba.njit
def _pipeline(signal, wbuf, meta, fpar, sbuf, out_size):
    """signal (T, N*I) -> outputs (T, N*out_size) and decisions (T,) = argmax of the outputs."""
    T = signal.shape[0]
    x = np.empty(signal.shape[1], np.float32)  # (N*I,)
    ys = np.empty((T, out_size), np.float32)  # (T, N*O)
    decisions = np.empty(T, np.int64)
    for t in range(T):
        _features(signal, t, x)
        stack_step_serial(x, wbuf, meta, fpar, sbuf, ys[t])
        decisions[t] = np.argmax(ys[t])
    return ys, decisions


@pytest.mark.parametrize("layers, head, batch", [(1, False, None), (2, True, None), (2, False, 4)])
def test_njit_pipeline_matches_stream_step(layers, head, batch):
    model = _model(layers, head)
    N = 1 if batch is None else batch
    T = 50
    signal = np.random.default_rng(7).standard_normal((T, N * I)).astype(np.float32)  # (T, N*I)
    fast, slow = model.stream(batch=batch), model.stream(batch=batch)
    ys, decisions = _pipeline(signal, *fast.numba_args(), N * model.output_size)

    want = np.empty_like(ys)  # (T, N*O)
    x = np.empty(N * I, np.float32)
    for t in range(T):
        _features(signal, t, x)
        want[t] = slow.step(x if batch is None else x.reshape(N, I)).reshape(-1)
    np.testing.assert_array_equal(ys, want)
    np.testing.assert_array_equal(decisions, want.argmax(axis=1))
    for a, b in zip(fast.state, slow.state):  # the njit loop stepped the stream itself
        np.testing.assert_array_equal(a, b)
    x1 = signal[0] if batch is None else signal[0].reshape(N, I)
    np.testing.assert_array_equal(fast.step(x1), slow.step(x1))  # and step() carries on from it
    assert not np.array_equal(ys[0], ys[-1])  # the state really moved
