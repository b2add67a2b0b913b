"""importers/onnx_export.py: every model to_onnx writes round-trips through load, and runs in
onnxruntime as lstm-cpu runs it; what cannot be written is refused with a typed error."""

from __future__ import annotations

import numpy as np
import pytest

import onnxruntime as ort

from lstm_cpu import LayerParams, LSTMModel, UnsupportedModelError
from lstm_cpu.importers.onnx_export import to_onnx
from lstm_cpu.importers.onnx_lstm import load_onnx
from lstm_cpu.spec import Activation

I, H, T = 4, 8, 9


def _layers(rng, L, D, peep=False, acts=None):
    return [[LayerParams(rng.normal(size=(4 * H, I if l == 0 else D * H)) * 0.5,
                         rng.normal(size=(4 * H, H)) * 0.5, rng.normal(size=4 * H) * 0.5,
                         None, rng.normal(size=3 * H) * 0.5 if peep else None,
                         acts or (Activation("Sigmoid"), Activation("Tanh"), Activation("Tanh")))
             for _ in range(D)] for l in range(L)]


CASES = {
    "plain": dict(L=1, D=1),
    "stack-bidirectional": dict(L=2, D=2),
    "reverse": dict(L=1, D=1, reverse=True),
    "initial-state": dict(L=2, D=1, init=True),
    "reverse-initial-state": dict(L=1, D=1, reverse=True, init=True),
    "bidirectional-initial-state": dict(L=2, D=2, init=True),
    "clip-coupled-peepholes": dict(L=1, D=1, clip=0.7, input_forget=True, peep=True),
    "activations": dict(L=1, D=2,
                             acts=(Activation("HardSigmoid", 0.3, 0.4), Activation("Tanh"),
                                   Activation("Softsign"))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_onnx_round_trips_and_runs_in_onnxruntime(name):
    c = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    L, D = c["L"], c["D"]
    init = None
    if c.get("init"):
        init = (rng.normal(size=(L * D, H)), rng.normal(size=(L * D, H)))
    head = (rng.normal(size=(3, D * H)), rng.normal(size=3)) if c.get("head") else None
    m = LSTMModel(_layers(rng, L, D, c.get("peep", False), c.get("acts")), clip=c.get("clip"),
                  input_forget=c.get("input_forget", False), initial_state=init, head=head,
                  reverse=c.get("reverse", False))
    proto = to_onnx(m)
    back = load_onnx(proto)
    # everything the model is made of comes back, bit for bit
    assert back.reverse == m.reverse and back.input_forget == m.input_forget
    assert np.float32(back.clip or 0) == np.float32(m.clip or 0)  # ONNX stores clip as float32
    assert np.array_equal(back._wbuf, m._wbuf) and np.array_equal(back._meta, m._meta)
    assert (back.initial_state is None) == (init is None)
    if init is not None:
        for a, b in zip(back.initial_state, m.initial_state):
            np.testing.assert_array_equal(a, b)
    x = rng.normal(size=(T, I)).astype(np.float32)
    y, (h, cst) = m.run(x)
    y2, (h2, c2) = back.run(x)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(h2, h)
    # onnxruntime runs the file as lstm-cpu does; the initial state is the inputs' default
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"X": x[:, None, :]}
    if init is None:
        for l in range(L):
            feeds[f"initial_h_{l}"] = np.zeros((D, 1, H), np.float32)
            feeds[f"initial_c_{l}"] = np.zeros((D, 1, H), np.float32)
    y_ort = sess.run(["Y"], feeds)[0][:, 0, :]
    np.testing.assert_allclose(y_ort, y, atol=2e-5, rtol=0)


def test_projection_cannot_be_written_and_says_so():
    rng = np.random.default_rng(9)
    P = 3
    layers = [[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, P)),
                           rng.normal(size=4 * H), rng.normal(size=(P, H)))]]
    with pytest.raises(UnsupportedModelError, match="projection"):
        to_onnx(LSTMModel(layers))
