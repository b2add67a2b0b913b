"""One tiny hand-checked LSTM (H=1, I=1) that catches swapped gates and a wrong cell formula.

Each gate gets its own input weight, recurrent weight and bias, so the four pre-activations are
distinct numbers. The expected values are the LSTM equations written out with math.exp/math.tanh
(see lstm_cpu/spec.py)::

    a_k = w_k * x_t + u_k * h_{t-1} + b_k        for k in (i, f, g, o)
    i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

The test first proves it can discriminate: every other assignment of the four weight rows to the
four gates (23 permutations), and the common wrong cell formulas, give a result far from the
expected one. Then the model, built from canonical LayerParams and through from_torch, must match.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lstm_cpu.spec import LayerParams

# Per gate (w: input weight, u: recurrent weight, b: bias), canonical order i, f, g, o.
W = {"i": 0.5, "f": -0.8, "g": 1.3, "o": 0.9}
U = {"i": -0.4, "f": 0.7, "g": -1.1, "o": 0.3}
Bv = {"i": 0.1, "f": 1.2, "g": -0.35, "o": -0.6}
GATES = ("i", "f", "g", "o")

XS = [0.7, -1.4, 0.25]  # three steps of a one-dimensional input
H0, C0 = 0.2, -0.5  # a non-zero initial state so the recurrent weights and f*c matter at t=0


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def hand_lstm(xs, h, c, order=GATES, cell="standard"):
    """The equations by hand. ``order`` assigns the weight rows (i, f, g, o) to gate roles."""
    role = dict(zip(order, GATES))  # weight row -> the gate it is (mis)used as
    out = []
    for x in xs:
        a = {role[k]: W[k] * x + U[k] * h + Bv[k] for k in GATES}
        i, f, g, o = sigmoid(a["i"]), sigmoid(a["f"]), math.tanh(a["g"]), sigmoid(a["o"])
        if cell == "standard":
            c = f * c + i * g
        elif cell == "no_forget":  # c_t = c + i*g
            c = c + i * g
        elif cell == "swapped_fi":  # c_t = i*c + f*g
            c = i * c + f * g
        elif cell == "sigmoid_g":  # candidate through sigmoid
            c = f * c + i * sigmoid(a["g"])
        h = o * math.tanh(c) if cell != "h_no_tanh" else o * c
        out.append((h, c))
    return out


EXPECTED = hand_lstm(XS, H0, C0)


def test_case_discriminates_gate_orders_and_formulas():
    """If this fails, the numbers above are too symmetric to catch a bug: pick others."""
    for perm in itertools.permutations(GATES):
        if perm == GATES:
            continue
        got = hand_lstm(XS, H0, C0, order=perm)
        assert max(abs(g[0] - e[0]) for g, e in zip(got, EXPECTED)) > 1e-2, perm
    for wrong in ("no_forget", "swapped_fi", "sigmoid_g", "h_no_tanh"):
        got = hand_lstm(XS, H0, C0, cell=wrong)
        assert max(abs(g[0] - e[0]) for g, e in zip(got, EXPECTED)) > 1e-2, wrong


def _canonical():
    col = lambda d: np.array([[d[k]] for k in GATES])  # (4H, 1) = (4, 1), rows i, f, g, o
    return LayerParams(w_ih=col(W), w_hh=col(U), bias=np.array([Bv[k] for k in GATES]))


def _check(model, tol):
    x = np.array(XS).reshape(3, 1)  # (T, I)
    def state():  # fresh arrays each time: (L*D, out), (L*D, H)
        return np.array([[H0]]), np.array([[C0]])

    y, (h, c) = model.run(x, state=state())
    for t, (he, ce) in enumerate(EXPECTED):
        assert abs(float(y[t, 0]) - he) < tol, (t, float(y[t, 0]), he)
    assert abs(float(h[0, 0]) - EXPECTED[-1][0]) < tol
    assert abs(float(c[0, 0]) - EXPECTED[-1][1]) < tol
    # The same through a stream with the state set by hand.
    s = model.stream()
    s.state = state()
    for t, (he, ce) in enumerate(EXPECTED):
        yt = s.step(x[t])
        assert abs(float(yt[0]) - he) < tol
        assert abs(float(s.state[1][0, 0]) - ce) < tol


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_canonical_layer_params(dtype, tol):
    from lstm_cpu.model import LSTMModel

    _check(LSTMModel([[_canonical()]], dtype=dtype), tol)


def test_naive_reference_agrees():
    import naive

    y, (h, c) = naive.run([[_canonical()]], np.array(XS).reshape(3, 1, 1),
                          np.array([[[H0]]]), np.array([[[C0]]]))
    np.testing.assert_allclose(y[:, 0, 0], [e[0] for e in EXPECTED], rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_from_torch_state_dict(dtype, tol):
    from lstm_cpu.importers.torch_lstm import from_torch

    # PyTorch's layout: weight_ih_l0 (4H, I) with row blocks (i, f, g, o); bias split in two.
    sd = {
        "weight_ih_l0": np.array([[W[k]] for k in GATES]),
        "weight_hh_l0": np.array([[U[k]] for k in GATES]),
        "bias_ih_l0": np.array([Bv[k] - 0.25 for k in GATES]),
        "bias_hh_l0": np.full(4, 0.25),  # folded: bias_ih + bias_hh = Bv
    }
    _check(from_torch(sd, dtype=dtype), tol)
    cell_sd = {k.replace("_l0", ""): v for k, v in sd.items()}
    _check(from_torch(cell_sd, dtype=dtype), tol)


def test_from_torch_module_matches_torch_and_hand():
    torch = pytest.importorskip("torch")
    from lstm_cpu.importers.torch_lstm import from_torch

    m = torch.nn.LSTM(1, 1).double()
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor([[W[k]] for k in GATES], dtype=torch.float64))
        m.weight_hh_l0.copy_(torch.tensor([[U[k]] for k in GATES], dtype=torch.float64))
        m.bias_ih_l0.copy_(torch.tensor([Bv[k] for k in GATES], dtype=torch.float64))
        m.bias_hh_l0.zero_()
        y, _ = m(torch.tensor(XS, dtype=torch.float64).reshape(3, 1),
                 (torch.tensor([[H0]], dtype=torch.float64), torch.tensor([[C0]], dtype=torch.float64)))
    # torch itself agrees with the hand equations: the canonical order really is PyTorch's.
    np.testing.assert_allclose(y[:, 0].numpy(), [e[0] for e in EXPECTED], rtol=0, atol=1e-14)
    _check(from_torch(m, dtype=np.float64), 1e-12)
