"""The packed kernels against the float64 reference in naive.py, every feature of the core.

torch and onnxruntime parity live in their own files; this one needs numpy only.
"""

import numpy as np
import pytest

import naive
from lstm_cpu import LayerParams, LSTMModel
from lstm_cpu.spec import Activation


def rand_layers(rng, I, H, L, D=1, P=0, peep=False, acts=None, scale=0.3):
    out = P or H
    layers = []
    for l in range(L):
        fan_in = I if l == 0 else D * out
        row = []
        for _ in range(D):
            row.append(LayerParams(
                rng.normal(0, scale, (4 * H, fan_in)), rng.normal(0, scale, (4 * H, out)),
                rng.normal(0, scale, 4 * H), rng.normal(0, scale, (P, H)) if P else None,
                rng.normal(0, scale, 3 * H) if peep else None, acts))
        layers.append(row)
    return layers


CASES = [  # (I, H, L, D, P, peep)
    (3, 5, 1, 1, 0, False),
    (7, 17, 2, 1, 0, True),
    (5, 9, 3, 1, 4, False),
    (4, 130, 2, 2, 0, False),
    (6, 11, 2, 2, 3, True),
    (1, 1, 1, 1, 0, False),
    (4, 130, 2, 1, 7, True),  # two chunks: exercises the chunk split and the parallel kernel
]


@pytest.mark.parametrize("I,H,L,D,P,peep", CASES)
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-11)])
def test_run_matches_reference(I, H, L, D, P, peep, dtype, tol):
    rng = np.random.default_rng(I * 1000 + H)
    layers = rand_layers(rng, I, H, L, D, P, peep)
    T, B = 11, (3 if H % 2 else 5)  # fused Numba product (B % 4 != 0: a group of 4 + rest); see test_batched.py
    x = rng.normal(size=(T, B, I))
    y_ref, (h_ref, c_ref) = naive.run(layers, x)
    # kernel="parallel" packs one column chunk per thread: wide cases exercise the chunk split
    m = LSTMModel(layers, dtype=dtype, kernel="parallel" if H >= 128 else "auto")
    y, (h, c) = m.run(x)
    assert y.dtype == dtype and y.shape == (T, B, D * (P or H))
    np.testing.assert_allclose(y, y_ref, atol=tol, rtol=0)
    np.testing.assert_allclose(h, h_ref, atol=tol, rtol=0)
    np.testing.assert_allclose(c, c_ref, atol=tol * 10, rtol=0)
    if D == 1:
        for kernel in ("serial", "parallel"):
            s = m.stream(batch=B, kernel=kernel)
            ys = np.stack([s.step(x[t]) for t in range(T)])
            np.testing.assert_allclose(ys, y_ref, atol=tol, rtol=0)
            s1 = m.stream(kernel=kernel)
            np.testing.assert_allclose(s1.run(x[:, 1]), y_ref[:, 1], atol=tol, rtol=0)


@pytest.mark.parametrize("clip,coupled", [(0.7, False), (None, True), (1.5, True)])
def test_clip_and_coupled_gate(clip, coupled):
    rng = np.random.default_rng(5)
    layers = rand_layers(rng, 4, 10, 2, peep=True, scale=1.0)
    x = rng.normal(0, 2, size=(9, 5, 4))
    y_ref, (h_ref, c_ref) = naive.run(layers, x, clip=clip, input_forget=coupled)
    m = LSTMModel(layers, clip=clip, input_forget=coupled)
    y, (h, c) = m.run(x)
    np.testing.assert_allclose(y, y_ref, atol=3e-5)
    np.testing.assert_allclose(c, c_ref, atol=3e-5)
    s = m.stream(batch=5)
    np.testing.assert_allclose(s.run(x), y_ref, atol=3e-5)


ALL_ACTS = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "Affine", "LeakyRelu", "ThresholdedRelu",
            "ScaledTanh", "Elu", "Softsign", "Softplus"]


@pytest.mark.parametrize("name", ALL_ACTS)
def test_every_activation_in_every_slot(name):
    rng = np.random.default_rng(len(name))
    a = Activation(name, 0.7, 0.3) if name not in ("Sigmoid", "Tanh", "Relu", "Softsign", "Softplus") else Activation(name)
    for acts in ((a, Activation("Tanh"), Activation("Tanh")),
                 (Activation("Sigmoid"), a, Activation("Tanh")),
                 (Activation("Sigmoid"), Activation("Tanh"), a)):
        layers = rand_layers(rng, 3, 6, 1, acts=acts, scale=0.5)
        x = rng.normal(size=(6, 2, 3))
        y_ref, _ = naive.run(layers, x)
        for dtype, tol in ((np.float32, 5e-5), (np.float64, 1e-10)):
            y, _ = LSTMModel(layers, dtype=dtype).run(x)
            np.testing.assert_allclose(y, y_ref, atol=tol, rtol=1e-5, err_msg=f"{name} in {acts}")


def test_lengths_zero_tail_and_reverse_start():
    rng = np.random.default_rng(7)
    layers = rand_layers(rng, 3, 8, 2, D=2)
    T, B = 8, 5
    x = rng.normal(size=(T, B, 3))
    lengths = np.array([8, 5, 1, 0, 7])
    y_ref, (h_ref, c_ref) = naive.run(layers, x, lengths=lengths)
    y, (h, c) = LSTMModel(layers).run(x, lengths=lengths)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(h, h_ref, atol=2e-5)
    assert np.all(y[5:, 1] == 0) and np.all(y[:, 3] == 0)


def test_initial_state_and_head():
    rng = np.random.default_rng(8)
    layers = rand_layers(rng, 3, 6, 2)
    h0, c0 = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    hw, hb = rng.normal(size=(4, 6)), rng.normal(size=4)
    m = LSTMModel(layers, initial_state=(h0, c0), head=(hw, hb))
    x = rng.normal(size=(5, 3))
    y_ref, (h_ref, _) = naive.run(layers, x[:, None], h0[:, None], c0[:, None])
    expect = y_ref[:, 0] @ hw.T + hb
    y, (h, _) = m.run(x)
    assert m.output_size == 4
    np.testing.assert_allclose(y, expect, atol=3e-5)
    np.testing.assert_allclose(h, h_ref[:, 0], atol=2e-5)
    s = m.stream()
    np.testing.assert_allclose(np.stack([s.step(v) for v in x]), expect, atol=3e-5)
    s.reset()
    np.testing.assert_allclose(s.state[0], h0, atol=1e-6)


def test_large_inputs_stay_finite():
    rng = np.random.default_rng(9)
    m = LSTMModel(rand_layers(rng, 3, 16, 2))
    s = m.stream()
    for v in (1e30, -1e30, 3e38):
        y = s.step(np.full(3, v))
        assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1)


def test_nan_propagates_and_reset_recovers():
    rng = np.random.default_rng(10)
    m = LSTMModel(rand_layers(rng, 3, 8, 1))
    s = m.stream()
    assert np.all(np.isnan(s.step(np.array([np.nan, 0, 0]))))
    s.reset()
    assert np.all(np.isfinite(s.step(np.zeros(3))))


def test_packed_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(11)
    layers = rand_layers(rng, 4, 12, 2, P=5, peep=True, acts=("HardSigmoid", "Tanh", "Softsign"))
    m = LSTMModel(layers, clip=2.0, initial_state=(rng.normal(size=(2, 5)), rng.normal(size=(2, 12))))
    m.save(tmp_path / "m.lstm")
    import lstm_cpu

    m2 = lstm_cpu.load(tmp_path / "m.lstm")
    x = rng.normal(size=(6, 2, 4))
    y1, (h1, c1) = m.run(x)
    y2, (h2, c2) = m2.run(x)
    assert np.array_equal(y1, y2) and np.array_equal(h1, h2) and np.array_equal(c1, c2)
    assert m2.info()["activations"] == m.info()["activations"]
    assert not list(tmp_path.glob(".lstm-cpu-*"))  # the atomic save left no temporary file


def test_reverse_model_runs_backwards_and_refuses_streaming():
    rng = np.random.default_rng(12)
    layers = rand_layers(rng, 3, 7, 2)
    x = rng.normal(size=(6, 5, 3))
    lengths = np.array([6, 4, 1, 0, 3])
    y_ref, (h_ref, c_ref) = naive.run(layers, x, lengths=lengths, reverse=True)
    m = LSTMModel(layers, reverse=True)
    y, (h, c) = m.run(x, lengths=lengths)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(h, h_ref, atol=2e-5)
    assert np.all(h[:, 3] == 0) and np.all(c[:, 3] == 0)  # a length-0 sequence ends at zero state
    import lstm_cpu

    with pytest.raises(lstm_cpu.UnsupportedModelError, match="whole sequence"):
        m.stream()


def test_empty_sequence_with_head_returns_initial_state():
    rng = np.random.default_rng(13)
    layers = rand_layers(rng, 3, 6, 2, P=4)
    hw, hb = rng.normal(size=(2, 4)), rng.normal(size=2)
    m = LSTMModel(layers, head=(hw, hb))
    y, (h, c) = m.run(np.zeros((0, 5, 3)))
    assert y.shape == (0, 5, 2) and h.shape == (2, 5, 4) and c.shape == (2, 5, 6)
    assert np.all(h == 0) and np.all(c == 0)
    y1, _ = m.run(np.zeros((0, 3)))
    assert y1.shape == (0, 2)
