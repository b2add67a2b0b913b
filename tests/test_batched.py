"""Many streams or sequences in one call: both ways the gate product is computed.

Streams, however many, go through Numba's fused kernels: all streams in one pass over each panel
(``_product``) with a single stream's float order, so a stream's outputs must be *bit-identical*
whatever the batch it shares, with either kernel: array_equal. (From ``BLAS_MIN_BATCH`` streams up
they took BLAS products until 2026-11-27, when the Numba kernels had become faster.) A batched
``model.run`` of ``BLAS_MIN_BATCH`` sequences or more takes numpy BLAS products with their own
summation order: it is held to the same sequence alone at the bound the README states
(BLAS_ATOL), and to the float64 reference (naive.py) at float32 tolerance.
"""

import numpy as np
import pytest

import naive
from lstm_cpu import LSTMModel
from conftest import BLAS_MIN_BATCH
from test_core_naive import rand_layers

# (I, H, L, P): K = I + out covers K % 4 in {0, 1, 2, 3}; P > 0 projects; H=130 pads and, with
# kernel="parallel", splits into column chunks.
MODELS = [(3, 5, 1, 0), (6, 10, 2, 0), (7, 16, 2, 3), (5, 130, 2, 0), (8, 9, 3, 6)]


@pytest.mark.parametrize("I,H,L,P", MODELS)
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("N", [2, 4, 5, 7, 9, BLAS_MIN_BATCH - 1, BLAS_MIN_BATCH, 64])
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


#: From BLAS_MIN_BATCH streams up, a stream's outputs differ from the same stream alone by float
#: rounding: the README's bound, over 50 steps of models with PyTorch-like weights (std
#: 1/sqrt(H)). Measured (2-core AMD EPYC, OpenBLAS): <= 3.9e-7 in float32 (a few ulp of O(1)
#: outputs), <= 8.4e-16 in float64, from (3,5,1) to (64,512,1). A chaotic model (large weights)
#: amplifies any rounding difference through the recurrence, as it does float32's own error.
BLAS_ATOL = {np.float32: 1e-6, np.float64: 4e-15}


@pytest.mark.parametrize("I,H,L,P", MODELS[:4] + [(16, 256, 2, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_run_is_close_to_single_sequences_streams_identical(I, H, L, P, dtype):
    rng = np.random.default_rng(I + H)
    m = LSTMModel(rand_layers(rng, I, H, L, P=P, scale=1 / np.sqrt(H)), dtype=dtype)
    T, N = 50, BLAS_MIN_BATCH
    x = rng.normal(size=(T, N, I)).astype(dtype)  # (T, N, I)
    sb = m.stream(batch=N)
    assert sb.kernel != "blas"
    yb = np.stack([sb.step(x[t]) for t in range(T)])  # (T, N, out)
    alone = np.stack([m.stream().run(x[:, n]) for n in range(N)], axis=1)  # (T, N, out)
    np.testing.assert_array_equal(yb, alone)  # streams: the Numba kernels, a lone stream's bits
    yr, _ = m.run(x)  # a batch of N sequences: the BLAS path
    yr1 = np.stack([m.run(x[:, n])[0] for n in range(N)], axis=1)
    np.testing.assert_allclose(yr, yr1, rtol=0, atol=BLAS_ATOL[dtype])


@pytest.mark.parametrize("I,H,L,P", MODELS)
@pytest.mark.parametrize("B", [2, 5, BLAS_MIN_BATCH - 1])
def test_batched_run_matches_single_runs(I, H, L, P, B):
    """model.run over (T, B, I), with lengths, vs each sequence alone, with either kernel.

    Not promised bit for bit: the input projection is one BLAS product over all T*B rows, whose
    rounding may depend on the shape (numpy's single-row product, T*B = 1, differs); the
    recurrence itself is the fused kernel. Measured here: identical at T=7."""
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
                np.testing.assert_allclose(got, want, rtol=0, atol=BLAS_ATOL[np.float32],
                                           err_msg=f"{kernel} sequence {b} of {B}")


@pytest.mark.parametrize("I,H,L,P", MODELS[:4])
@pytest.mark.parametrize("N", [BLAS_MIN_BATCH, BLAS_MIN_BATCH + 3])
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


@pytest.mark.parametrize("B", [2, 6, 9, BLAS_MIN_BATCH + 1])
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
    for B in (11, BLAS_MIN_BATCH):
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
    assert 2 <= big < BLAS_MIN_BATCH
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


def test_readme_states_the_blas_crossover():
    """The README's bit-identity promise names the threshold the code uses: streams of any
    number are bit-identical; run() takes BLAS products from BLAS_MIN_BATCH sequences."""
    import os
    import re

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        text = " ".join(f.read().split())  # line breaks -> spaces
    assert "one stream in a batch of any number of streams" in text
    assert f"`model.run` from {BLAS_MIN_BATCH} sequences up" in text
    stated = {int(n) for n in re.findall(r"(?:fewer than|from|below) (\d+) (?:streams|sequences)", text)}
    assert stated == {BLAS_MIN_BATCH}, stated
