"""The sequence kernels alternate the order of W's panels every time step (``kernels._product_down``,
issue 12): the panels read last are still in cache when the next step starts with them. Each
element is computed by the same block whichever order the panels come in, so the order must not
change a bit, on either vector width, for any stream count or panel range, and must write only
the columns of its range.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu import LSTMModel, kernels

import naive
from test_core_naive import rand_layers

PANEL = kernels.PANEL
# (name, panels first first, panels last first): the host's kernels, the 8-lane ones (AVX2
# hosts; any x86-64 with AVX2 runs them) and the plain blocks (AVX-512 hosts, and float64)
PAIRS = [
    ("host", kernels._product, kernels._product_down),
    ("v8", kernels._make_product_v8(), kernels._make_product_v8(True)),
    ("plain", kernels._make_product(PANEL, kernels.BLOCK_STREAMS),
     kernels._make_product(PANEL, kernels.BLOCK_STREAMS, True)),
]
STREAMS = [1, 2, 3, 4, 5, 7, 16, 17, 40]


@pytest.mark.parametrize("name,up,down", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("N", STREAMS)
def test_panels_last_first_give_the_same_bits(name, up, down, N):
    rng = np.random.default_rng(N)
    K, n = 45, 5
    Wp = rng.standard_normal((n, K, PANEL)).astype(np.float32)  # (n, K, PANEL)
    Z = rng.standard_normal((N, K)).astype(np.float32)  # (N, K)
    for k0, k1, p0, p1 in ((0, K, 0, n), (12, K, 1, 4), (3, 4, 2, 3), (7, 7, 0, n)):
        A0 = rng.standard_normal((N, n * PANEL)).astype(np.float32)  # (N, C)
        want, got = A0.copy(), A0.copy()
        up(Z[:, : k1 - k0], Wp, want, p0, p1, k0, k1)
        down(Z[:, : k1 - k0], Wp, got, p0, p1, k0, k1)
        np.testing.assert_array_equal(got, want)
        # the range's columns hold the product (float64 sums), the others are untouched
        ref = A0.astype(np.float64)
        W = Wp[p0:p1, k0:k1].astype(np.float64).transpose(1, 0, 2).reshape(k1 - k0, (p1 - p0) * PANEL)
        ref[:, p0 * PANEL : p1 * PANEL] += Z[:, : k1 - k0].astype(np.float64) @ W
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
        np.testing.assert_array_equal(got[:, : p0 * PANEL], A0[:, : p0 * PANEL])
        np.testing.assert_array_equal(got[:, p1 * PANEL :], A0[:, p1 * PANEL :])


def test_float64_panels_last_first():
    rng = np.random.default_rng(9)
    Wp = rng.standard_normal((3, 20, PANEL))  # (3, 20, PANEL) float64
    Z = rng.standard_normal((6, 20))
    for _, up, down in PAIRS:
        want, got = np.zeros((6, 3 * PANEL)), np.zeros((6, 3 * PANEL))
        up(Z, Wp, want, 0, 3, 0, 20)
        down(Z, Wp, got, 0, 3, 0, 20)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, Z @ Wp.transpose(1, 0, 2).reshape(20, -1), rtol=1e-12)


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("B", [1, 3])
def test_a_sequence_over_alternating_steps_matches_the_float64_reference(kernel, B):
    """Whole sequences (five panels, odd and even steps, both directions) against naive.py's
    float64 LSTM: a panel skipped or computed twice on the odd steps would be far off."""
    rng = np.random.default_rng(B)
    I, H, T = 24, 80, 9  # Hp = 80: C = 320, five panels
    layers = rand_layers(rng, I, H, 2, D=2)
    x = rng.normal(size=(T, B, I)).astype(np.float32)  # (T, B, I)
    y_ref, (h_ref, c_ref) = naive.run(layers, x)
    y, (h, c) = LSTMModel(layers, kernel=kernel).run(x)  # y (T, B, 2H)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=2e-4)
