"""Many streams or sequences in one call.

Streams and sequences, however many, go through Numba's fused kernels: all of them in one pass
over each panel (``_product``) with a single stream's float order, so a stream's outputs must
be *bit-identical* whatever the batch it shares, with either kernel: array_equal; the same for a
sequence in a batched ``model.run``. (From ``MANY`` = 40 up they took numpy BLAS products until
2026-11-27, when the Numba kernels had become faster.) Many streams are also held to the float64
reference (naive.py) at float32 tolerance.
"""

import numpy as np
import pytest

import naive
from lstm_cpu import LSTMModel
from conftest import MANY
from test_core_naive import rand_layers

# (I, H, L, P): K = I + out covers K % 4 in {0, 1, 2, 3}; P > 0 projects; H=130 pads and, with
# kernel="parallel", splits into column chunks.
MODELS = [(3, 5, 1, 0), (6, 10, 2, 0), (7, 16, 2, 3), (5, 130, 2, 0), (8, 9, 3, 6)]


@pytest.mark.parametrize("I,H,L,P", MODELS)
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("N", [2, 4, 5, 7, 9, MANY - 1, MANY, 64])
def test_batched_stream_is_bit_identical_to_single_streams(I, H, L, P, kernel, N):
    rng = np.random.default_rng(I * 100 + H + N)
    m = LSTMModel(rand_layers(rng, I, H, L, P=P, scale=0.5), kernel=kernel)
    T = 6
    x = rng.normal(size=(T, N, I)).astype(np.float32)  # (T, N, I)
    sb = m.stream(batch=N)
    got = np.stack([sb.step(x[t]).copy() for t in range(T)])  # (T, N, out)
    for s in range(N):
        single = m.stream(kernel="serial")
        want = np.stack([single.step(x[t, s]).copy() for t in range(T)])
        assert np.array_equal(got[:, s], want), f"stream {s} of {N}: {np.abs(got[:, s] - want).max()}"
    # and the batched chunk run agrees with the batched step, bit for bit
    sr = m.stream(batch=N)
    assert np.array_equal(sr.run(x), got)


@pytest.mark.parametrize("I,H,L,P", MODELS[:4] + [(16, 256, 2, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_streams_and_sequences_are_identical_to_single_ones(I, H, L, P, dtype):
    rng = np.random.default_rng(I + H)
    m = LSTMModel(rand_layers(rng, I, H, L, P=P, scale=1 / np.sqrt(H)), dtype=dtype)
    T, N = 50, MANY
    x = rng.normal(size=(T, N, I)).astype(dtype)  # (T, N, I)
    sb = m.stream(batch=N)
    yb = np.stack([sb.step(x[t]) for t in range(T)])  # (T, N, out)
    alone = np.stack([m.stream().run(x[:, n]) for n in range(N)], axis=1)  # (T, N, out)
    np.testing.assert_array_equal(yb, alone)
    yr, _ = m.run(x)  # a batch of N sequences
    yr1 = np.stack([m.run(x[:, n])[0] for n in range(N)], axis=1)
    np.testing.assert_array_equal(yr, yr1)


@pytest.mark.parametrize("I,H,L,P", MODELS)
@pytest.mark.parametrize("B", [2, 5, MANY - 1, MANY])
def test_batched_run_matches_single_runs(I, H, L, P, B):
    """model.run over (T, B, I), with lengths, vs each sequence alone, with either kernel: the
    same bits (every row of the input projection and of the recurrence is computed on its own,
    in a fixed order)."""
    rng = np.random.default_rng(I * 10 + H + B)
    m = LSTMModel(rand_layers(rng, I, H, L, P=P, scale=1 / np.sqrt(H)), kernel="parallel")
    T = 7
    x = rng.normal(size=(T, B, I)).astype(np.float32)  # (T, B, I)
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T
    for kernel in ("serial", "parallel"):
        y, (h, c) = m.run(x, lengths=lengths, kernel=kernel)  # (T, B, out), (L, B, out), (L, B, H)
        for b in range(B):
            yb, (hb, cb) = m.run(x[:, b:b + 1], lengths=lengths[b:b + 1], kernel="serial")
            for got, want in ((y[:, b], yb[:, 0]), (h[:, b], hb[:, 0]), (c[:, b], cb[:, 0])):
                np.testing.assert_array_equal(got, want, err_msg=f"{kernel} sequence {b} of {B}")


@pytest.mark.parametrize("I,H,L,P", MODELS[:4])
@pytest.mark.parametrize("N", [MANY, MANY + 3])
def test_many_streams_match_reference(I, H, L, P, N):
    rng = np.random.default_rng(N + H)
    layers = rand_layers(rng, I, H, L, P=P, scale=0.5)
    m = LSTMModel(layers)
    T = 5
    x = rng.normal(size=(T, N, I))
    y_ref, (h_ref, c_ref) = naive.run(layers, x)
    s = m.stream(batch=N)
    ys = np.stack([s.step(x[t].astype(np.float32)).copy() for t in range(T)])
    np.testing.assert_allclose(ys, y_ref, atol=2e-5, rtol=0)
    h, c = s.state
    np.testing.assert_allclose(h, h_ref, atol=2e-5, rtol=0)
    np.testing.assert_allclose(c, c_ref, atol=2e-4, rtol=0)
    s2 = m.stream(batch=N)
    np.testing.assert_allclose(s2.run(x.astype(np.float32)), y_ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("B", [2, 6, 9, MANY + 1])
@pytest.mark.parametrize("D,reverse", [(1, False), (2, False), (1, True)])
def test_batched_sequences_with_lengths_match_reference(B, D, reverse):
    rng = np.random.default_rng(B * 10 + D)
    layers = rand_layers(rng, 5, 12, 2, D=D, P=0, scale=0.5)
    T = 9
    x = rng.normal(size=(T, B, 5))
    lengths = rng.integers(0, T + 1, size=B)
    lengths[0] = T  # at least one full-length sequence
    y_ref, (h_ref, c_ref) = naive.run(layers, x, lengths=lengths, reverse=reverse)
    for kernel in ("serial", "parallel"):
        m = LSTMModel(layers, reverse=reverse)
        y, (h, c) = m.run(x, lengths=lengths, kernel=kernel)
        np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=0)
        np.testing.assert_allclose(h, h_ref, atol=2e-5, rtol=0)
        np.testing.assert_allclose(c, c_ref, atol=2e-4, rtol=0)
        assert np.all(y[np.arange(T)[:, None] >= lengths[None, :]] == 0)


def test_batched_sequence_float64_is_exact_to_reference():
    rng = np.random.default_rng(3)
    layers = rand_layers(rng, 4, 20, 2, P=7, peep=True, scale=0.5)
    x = rng.normal(size=(7, 11, 4))
    y_ref, (h_ref, c_ref) = naive.run(layers, x)
    for B in (11, MANY):
        xb = np.concatenate([x] * (B // 11 + 1), axis=1)[:, :B]
        y, (h, c) = LSTMModel(layers, dtype=np.float64).run(xb)
        np.testing.assert_allclose(y[:, :11], y_ref, atol=1e-11, rtol=0)
        np.testing.assert_allclose(c[:, :11], c_ref, atol=1e-10, rtol=0)


def test_auto_kernel_goes_parallel_for_batches_with_enough_work():
    from lstm_cpu import _config
    from lstm_cpu.policy import BATCH_PARALLEL_MIN_BYTES

    rng = np.random.default_rng(11)
    m = LSTMModel(rand_layers(rng, 32, 64, 1))  # ~0.1 MB: a lone stream is serial
    per = m.weight_bytes
    big = -(-BATCH_PARALLEL_MIN_BYTES // per)  # smallest N with enough bytes per step
    assert 2 <= big < MANY
    assert m.stream().kernel == "serial"
    assert m.stream(batch=big - 1).kernel == "serial"
    want = "parallel" if _config.num_threads() > 1 else "serial"
    assert m.stream(batch=big).kernel == want
    assert m.stream(batch=big, kernel="serial").kernel == "serial"  # an explicit choice wins
    assert LSTMModel(rand_layers(rng, 32, 64, 1), kernel="serial").stream(batch=big).kernel == "serial"
    # and the parallel batch computes exactly what the serial one does
    x = rng.normal(size=(4, big, 32)).astype(np.float32)
    a = m.stream(batch=big).run(x)
    b = m.stream(batch=big, kernel="serial").run(x)
    assert np.array_equal(a, b)


def test_readme_promises_bits_at_any_batch():
    """The README's bit-identity promise has no batch-size clause left (there was one, for the
    BLAS products, until 2026-11-27)."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        text = " ".join(f.read().split())  # line breaks -> spaces
    assert "one stream in a batch of any number of streams" in text
    assert "same bits as the same sequence alone, whatever the batch" in text
    assert not re.findall(r"(?:fewer than|below) \d+ (?:streams|sequences)", text)
