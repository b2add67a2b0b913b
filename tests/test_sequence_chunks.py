"""model.run in chunks of time steps (policy.sequence_chunk): the input projections of a long,
wide batch are computed a chunk at a time, right before the recurrence reads them. Chunking
must not change a bit: lengths, backward and bidirectional layers, initial state, serial and
parallel kernels, against the same model run in one chunk."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu import LayerParams, LSTMModel, policy


def _model(I, H, L, D, reverse=False, seed=0):
    rng = np.random.default_rng(seed)
    layers = [[LayerParams(rng.uniform(-0.4, 0.4, (4 * H, I if l == 0 else D * H)),
                           rng.uniform(-0.4, 0.4, (4 * H, H)), rng.uniform(-0.2, 0.2, 4 * H))
               for _ in range(D)] for l in range(L)]
    return LSTMModel(layers, reverse=reverse)


def test_chunk_sizes_follow_the_policy():
    C, item = 1024, 4
    assert policy.sequence_chunk(200, 1, C, item) == 200  # 0.8 MB of projections: one pass
    Tc = policy.sequence_chunk(200, 16, C, item)  # 13 MB: chunks of ~2 MB
    assert Tc * 16 * C * item <= policy.SEQUENCE_CHUNK_BYTES < (Tc + 1) * 16 * C * item
    assert policy.sequence_chunk(5, 4096, 4096, 4) == 1  # never zero steps
    assert policy.sequence_chunk(0, 16, C, item) == 1


@pytest.mark.parametrize("D, reverse", [(1, False), (1, True), (2, False)])
def test_chunked_run_is_bit_identical(monkeypatch, D, reverse):
    """Serial kernels chunk (the parallel ones run whole: see model._sequence_chunks); the
    parallel run must give the same bits as both."""
    kernel = "serial"
    I, H, L, T, B = 5, 20, 2, 23, 6
    m = _model(I, H, L, D, reverse)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = np.array([23, 0, 7, 16, 1, 22])
    h0 = rng.standard_normal((L * D, B, H)).astype(np.float32) * 0.5
    c0 = rng.standard_normal((L * D, B, H)).astype(np.float32) * 0.5
    want = m.run(x, lengths=lengths, state=(h0, c0), kernel=kernel)
    assert policy.sequence_chunk(T, B, m._plan.C, 4) == T  # small: one chunk by default
    calls = []
    real = policy.sequence_chunk

    def small(T_, B_, C_, item_):
        calls.append(real(T_, B_, C_, item_))
        return 4  # chunks of 4 steps: 23 = 5 x 4 + 3, so a short last chunk too

    monkeypatch.setattr(policy, "sequence_chunk", small)
    got = m.run(x, lengths=lengths, state=(h0, c0), kernel=kernel)
    assert calls, "run did not ask for a chunk size"
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1][0], want[1][0])
    np.testing.assert_array_equal(got[1][1], want[1][1])
    par = m.run(x, lengths=lengths, state=(h0, c0), kernel="parallel")
    np.testing.assert_array_equal(par[0], want[0])
    np.testing.assert_array_equal(par[1][0], want[1][0])
