"""``model.run`` gives the bits of stepping a stream through the same inputs.

``run`` projects the inputs of all time steps in one pass over the weights; each element of
that projection is the chain of FMAs a step starts with (from the bias, input rows in ascending
order), and the recurrence continues the same chain over the recurrent rows; the cell update,
projection and linear head are the same functions. So the two must agree to the bit, for every
model kind, both kernels, any batch, chunking of the projection, lengths and initial state.
The float64 reference (naive.py) checks that what they agree on is right.
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
from lstm_cpu import LSTMModel, policy
from lstm_cpu.spec import Activation
from test_core_naive import rand_layers

KINDS = {  # name: (I, H, L, P, peephole, model options)
    "plain": (6, 20, 1, 0, False, {}),
    "two layers, five panels": (9, 80, 2, 0, False, {}),
    "projection": (5, 24, 2, 7, False, {}),
    "peepholes, clip": (4, 17, 2, 0, True, {"clip": 0.8}),
    "coupled gates": (3, 12, 1, 0, False, {"input_forget": True}),
    "float64": (5, 19, 2, 0, True, {"dtype": np.float64}),
    "head": (4, 16, 2, 0, False, {"head": "make"}),
}


def _model(name, kernel, rng):
    I, H, L, P, peep, opts = KINDS[name]
    opts = dict(opts)
    layers = rand_layers(rng, I, H, L, 1, P, peep)
    if opts.get("head") == "make":
        opts["head"] = (rng.normal(0, 0.3, (5, P or H)), rng.normal(0, 0.3, 5))
    return LSTMModel(layers, kernel=kernel, **opts), layers, opts


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("name", list(KINDS))
def test_run_equals_steps(name, kernel, rng):
    m, layers, opts = _model(name, kernel, rng)
    T, B = 11, 3
    x = rng.normal(size=(T, B, m.input_size)).astype(m.dtype)  # (T, B, I)
    y, (h, c) = m.run(x)
    s = m.stream(batch=B, kernel=kernel)
    ys = np.stack([s.step(x[t]).copy() for t in range(T)])  # (T, B, out or O)
    np.testing.assert_array_equal(y, ys)
    np.testing.assert_array_equal(h, s.state[0])
    np.testing.assert_array_equal(c, s.state[1])
    lone = m.stream(kernel=kernel)  # one sequence alone, stepped
    np.testing.assert_array_equal(m.run(x[:, 1])[0], np.stack([lone.step(x[t, 1]) for t in range(T)]))
    if "head" not in opts:  # the reference has no head; the head's own kernel is _emit's
        tol = 1e-11 if m.dtype == np.float64 else 2e-5
        y_ref, _ = naive.run(layers, x.astype(np.float64), clip=opts.get("clip"),
                             input_forget=opts.get("input_forget", False))
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=tol)


def test_general_activations_run_equals_steps(rng):
    acts = (Activation("HardSigmoid", 0.2, 0.5), Activation("Tanh"), Activation("Softsign"))
    layers = rand_layers(rng, 4, 12, 2, P=5, peep=True, acts=acts)
    m = LSTMModel(layers)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    s = m.stream()
    np.testing.assert_array_equal(m.run(x)[0], np.stack([s.step(v) for v in x]))


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_run_with_lengths_and_state_equals_steps(kernel, rng):
    m, _, _ = _model("two layers, five panels", kernel, rng)
    T, B = 9, 4
    x = rng.normal(size=(T, B, m.input_size)).astype(np.float32)
    h0 = rng.normal(size=(2, B, m.output_size)).astype(np.float32)
    c0 = rng.normal(size=(2, B, m.hidden_size)).astype(np.float32)
    lengths = np.array([9, 4, 0, 7])
    y, (h, c) = m.run(x, state=(h0, c0), lengths=lengths)
    for n, length in enumerate(lengths):
        s = m.stream(kernel=kernel)
        s.state = (h0[:, n], c0[:, n])
        ys = [s.step(x[t, n]) for t in range(length)]
        if length:
            np.testing.assert_array_equal(y[:length, n], np.stack(ys))
            np.testing.assert_array_equal(h[:, n], s.state[0])
            np.testing.assert_array_equal(c[:, n], s.state[1])
        assert not y[length:, n].any()


def test_split_and_chunked_runs_equal_steps(rng, monkeypatch):
    """The parallel split (groups of sequences per thread) and a projection in chunks of time
    steps (policy.sequence_chunk): still a stream's bits."""
    m, _, _ = _model("plain", "parallel", rng)
    T, B = 13, 2 * policy.SPLIT_MIN_STREAMS
    x = rng.normal(size=(T, B, m.input_size)).astype(np.float32)
    s = m.stream(batch=B, kernel="serial")
    ys = np.stack([s.step(x[t]).copy() for t in range(T)])
    np.testing.assert_array_equal(m.run(x)[0], ys)
    monkeypatch.setattr(policy, "SEQUENCE_CHUNK_BYTES", 4 * B * m._plan.C)  # chunks of 1 step
    assert policy.sequence_chunk(T, B, m._plan.C, 4) == 1
    np.testing.assert_array_equal(m.run(x, kernel="serial")[0], ys)


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("name", ["plain", "projection", "float64", "head"])
def test_short_runs_take_the_streaming_kernels(name, kernel, rng):
    """Up to policy.RUN_AS_STEPS_MAX_T steps, run goes through the streaming kernels: the same
    bits as steps, with the state handed in and out as the sequence kernels do."""
    m, _, _ = _model(name, kernel, rng)
    calls = []
    real = m._run_as_steps
    m._run_as_steps = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    B = 3
    h0 = rng.normal(size=(m.num_layers, B, m._out)).astype(m.dtype)
    c0 = rng.normal(size=(m.num_layers, B, m.hidden_size)).astype(m.dtype)
    for T in range(1, policy.RUN_AS_STEPS_MAX_T + 2):
        assert policy.run_as_steps(T, 1, False, np.full(B, T)) == (T <= policy.RUN_AS_STEPS_MAX_T)
        x = rng.normal(size=(T, B, m.input_size)).astype(m.dtype)
        y, (h, c) = m.run(x, state=(h0, c0))
        s = m.stream(batch=B, kernel=kernel)
        s.state = (h0, c0)
        np.testing.assert_array_equal(y, np.stack([s.step(x[t]).copy() for t in range(T)]))
        np.testing.assert_array_equal(h, s.state[0])
        np.testing.assert_array_equal(c, s.state[1])
        y1, (h1, c1) = m.run(x[:, 0], state=(h0[:, 0], c0[:, 0]))  # unbatched shapes
        np.testing.assert_array_equal(y1, y[:, 0])
        assert h1.shape == h0[:, 0].shape and c1.shape == c0[:, 0].shape
    assert calls == [T for T in range(1, policy.RUN_AS_STEPS_MAX_T + 1) for _ in range(2)]
    # shorter sequences, reverse and bidirectional models keep the sequence kernels
    assert not policy.run_as_steps(2, 1, False, np.array([2, 1]))
    assert not policy.run_as_steps(2, 1, True, np.full(3, 2))
    assert not policy.run_as_steps(2, 2, False, np.full(3, 2))
    assert not policy.run_as_steps(0, 1, False, np.full(3, 0))
