"""importers/onnx_lstm.py against onnxruntime (and onnx's ReferenceEvaluator for layout=1).

Every generated model is checked twice:
  * importer semantics alone: ``onnx_to_params`` -> tests/naive.py (float64) vs onnxruntime;
  * end to end: ``load_onnx`` -> ``LSTMModel.run(x, state, lengths)`` vs onnxruntime.
Sizes are tiny so the whole matrix stays fast. Tolerance: float32 runtimes, 1e-5.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lstm_cpu.importers.onnx_lstm import load_onnx, onnx_to_params  # noqa: E402
from lstm_cpu.errors import FormatError, InputError, LSTMError, UnsupportedModelError  # noqa: E402
from lstm_cpu.spec import Activation  # noqa: E402

try:
    from tests import onnx_helpers as oh
except ImportError:  # tests/ itself on sys.path
    import onnx_helpers as oh

ATOL = RTOL = 1e-5
I, H, T, N = 3, 4, 5, 3
D_OF = {"forward": 1, "reverse": 1, "bidirectional": 2}


# ---------------------------------------------------------------------------------------------
# The two-way check
# ---------------------------------------------------------------------------------------------
def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=RTOL, atol=ATOL,
                               err_msg=what)


def check_against(ref_outputs, model, x, *, state=None, lengths=None, ort_layout=0):
    """Compare ONNX outputs (Y, Y_h, Y_c) with naive on the imported params and with LSTMModel.run.

    x: time-major (T, N, I). state: ONNX-shaped (D, N, H) pair or None (layout 0 shapes).
    """
    Y, Yh, Yc = ref_outputs[:3]
    if ort_layout == 1:  # Y (N, T, D, H), Y_h (N, D, H) -> layout 0
        Y, Yh, Yc = np.transpose(Y, (1, 2, 0, 3)), np.transpose(Yh, (1, 0, 2)), np.transpose(Yc, (1, 0, 2))
    y_ref = oh.y_to_time_major(Y)
    layers, opt = onnx_to_params(model)
    h0, c0 = (None, None) if state is None else state
    if opt["initial_state"] is not None and state is None:
        h0 = np.repeat(opt["initial_state"][0][:, None, :], x.shape[1], axis=1)
        c0 = np.repeat(opt["initial_state"][1][:, None, :], x.shape[1], axis=1)
    y, (h, c) = oh.naive_single(layers[0], x, h0, c0, opt["clip"], opt["input_forget"], lengths,
                                reverse=opt["reverse"])
    _close(y, y_ref, "naive(params) y vs reference")
    _close(h, Yh, "naive(params) h vs reference")
    _close(c, Yc, "naive(params) c vs reference")
    m = load_onnx(model)
    assert m.reverse == opt["reverse"]
    y2, (h2, c2) = m.run(x, state, lengths)
    _close(y2, y_ref, "LSTMModel y vs reference")
    _close(h2, Yh, "LSTMModel h vs reference")
    _close(c2, Yc, "LSTMModel c vs reference")


def assert_acts(got, want):
    """Activations equal up to float32 rounding (ONNX stores alpha/beta as float32)."""
    assert [a.name for a in got] == [a.name for a in want]
    np.testing.assert_allclose([[a.alpha, a.beta] for a in got], [[a.alpha, a.beta] for a in want], rtol=1e-7)


def _x(rng, t=T, n=N, i=I, scale=1.0):
    return (rng.standard_normal((t, n, i)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Attribute matrix
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 14, 22])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("bias,peephole", [(True, True), (False, False), (True, False)])
def test_direction_opset_bias_peephole(rng, opset, direction, bias, peephole):
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, bias=bias, peephole=peephole)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction, opset=opset)
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


def test_lstm_1_with_output_sequence(rng):
    """LSTM-1 (opsets 1-6; onnxruntime has no kernel for it): same math as LSTM-7, plus an
    output_sequence attribute that only says whether Y is produced. Oracle: the opset-7 model."""
    w = oh.onnx_weights(rng, I, H, 2)
    old = oh.lstm_model(w["W"], w["R"], w["B"], direction="bidirectional", opset=6,
                        extra_attrs={"output_sequence": 1})
    new = oh.lstm_model(w["W"], w["R"], w["B"], direction="bidirectional", opset=7)
    x = _x(rng)
    assert onnx_to_params(old)[1]["source"]["lstm_version"] == 1
    check_against(oh.run_ort(new, {"X": x}), old, x)


@pytest.mark.parametrize("act", [a[0] for a in oh.all_activation_cases()])
@pytest.mark.parametrize("slot", [0, 1, 2])
def test_every_activation_in_every_slot(rng, act, slot):
    """Each of the 11 ONNX activations as f, g or h, with non-default alpha/beta where it takes them."""
    params = dict((n, (a, b)) for n, a, b in oh.all_activation_cases())
    acts = [("Sigmoid", None, None), ("Tanh", None, None), ("Tanh", None, None)]
    acts[slot] = (act,) + params[act]
    names, alphas, betas = oh.attrs_for_activations(acts)
    w = oh.onnx_weights(rng, I, H, 1, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], activations=names,
                          activation_alpha=alphas or None, activation_beta=betas or None)
    layers, _ = onnx_to_params(model)
    assert_acts(layers[0][0].activations, oh.spec_activations(acts))
    x = _x(rng, scale=0.5)
    check_against(oh.run_ort(model, {"X": x}), model, x)


def test_alpha_beta_consumed_in_order_across_directions(rng):
    """onnxruntime: alphas go, in order, to the activations taking an alpha; betas likewise.

    Forward (LeakyRelu, Affine, Elu) reverse (HardSigmoid, Tanh, ScaledTanh): alphas feed
    LeakyRelu, Affine, Elu, HardSigmoid, ScaledTanh; betas feed Affine, HardSigmoid, ScaledTanh.
    """
    names = ["LeakyRelu", "Affine", "Elu", "HardSigmoid", "Tanh", "ScaledTanh"]
    alphas = [0.05, 0.7, 0.9, 0.3, 1.2]
    betas = [0.1, 0.45, 0.8]
    w = oh.onnx_weights(rng, I, H, 2, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction="bidirectional", activations=names,
                          activation_alpha=alphas, activation_beta=betas)
    layers, _ = onnx_to_params(model)
    assert_acts(layers[0][0].activations,
                (Activation("LeakyRelu", 0.05), Activation("Affine", 0.7, 0.1), Activation("Elu", 0.9)))
    assert_acts(layers[0][1].activations,
                (Activation("HardSigmoid", 0.3, 0.45), Activation("Tanh"), Activation("ScaledTanh", 1.2, 0.8)))
    x = _x(rng, scale=0.5)
    check_against(oh.run_ort(model, {"X": x}), model, x)


@pytest.mark.parametrize("act,alpha,beta", [
    ("Affine", 0.0, 0.0), ("ThresholdedRelu", 0.0, 0.0), ("ScaledTanh", 0.0, 0.0),
    ("LeakyRelu", 0.01, 0.0), ("HardSigmoid", 0.2, 0.5), ("Elu", 1.0, 0.0),
])
def test_missing_alpha_beta_follow_onnxruntime(rng, act, alpha, beta):
    """No activation_alpha/beta: onnxruntime uses 0.0 for Affine, ThresholdedRelu, ScaledTanh
    (not the ONNX operators' defaults) and the usual defaults for the others. The importer writes
    the values explicitly, so the model does not depend on spec.ACTIVATIONS' defaults."""
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], activations=["HardSigmoid", "Tanh", act])
    layers, _ = onnx_to_params(model)
    assert_acts(layers[0][0].activations[2:], (Activation(act, alpha, beta),))
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


def test_activation_names_are_case_insensitive(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], activations=["sigmoid", "TANH", "tanh"])
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


@pytest.mark.parametrize("clip", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_clip(rng, clip, direction):
    """Large weights so the pre-activations really hit the bound; peepholes included (onnxruntime
    clips after adding the peephole term, and never clips c itself: the spec's equations)."""
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, peephole=True, scale=2.0)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction, clip=clip)
    x = _x(rng, scale=2.0)
    layers, opt = onnx_to_params(model)
    assert opt["clip"] == clip
    check_against(oh.run_ort(model, {"X": x}), model, x)


def _ort_input_forget_reference(p, x):
    """onnxruntime's input_forget: i from the input gate (with its peephole), then f = 1 - i."""
    Hh = p.hidden_size
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    hs = []
    for n in range(x.shape[1]):
        h, c = np.zeros(Hh), np.zeros(Hh)
        for t in range(x.shape[0]):
            a = p.w_ih @ x[t, n] + p.w_hh @ h + p.bias
            ai, af, ag, ao = np.split(a, 4)
            pi, pf, po = np.split(p.peephole, 3)
            i = sig(ai + pi * c)
            f = 1 - i
            c = f * c + i * np.tanh(ag)
            h = sig(ao + po * c) * np.tanh(c)
        hs.append(h)
    return np.array(hs)


def test_onnxruntime_input_forget_is_f_equals_one_minus_i(rng):
    """Documents what onnxruntime does with input_forget=1 (the importer's reference semantics)."""
    w = oh.onnx_weights(rng, I, H, 1, peephole=True, scale=1.0)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], input_forget=1)
    x = _x(rng)
    _, Yh, _ = oh.run_ort(model, {"X": x})
    layers, opt = onnx_to_params(model)
    assert opt["input_forget"] is True
    _close(_ort_input_forget_reference(layers[0][0], x.astype(np.float64)), Yh[0], "ORT input_forget")


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_input_forget_matches_onnxruntime(rng, direction):
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, peephole=True, scale=1.0)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction, input_forget=1)
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


# ---------------------------------------------------------------------------------------------
# Initial state, sequence_lens, layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_initial_state_as_graph_inputs(rng, direction):
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction,
                          initial_h="input", initial_c="input")
    x = _x(rng)
    h0 = rng.standard_normal((D, N, H)).astype(np.float32)
    c0 = rng.standard_normal((D, N, H)).astype(np.float32)
    layers, opt = onnx_to_params(model)
    assert opt["initial_state"] is None
    assert opt["source"]["inputs"]["initial_h"] == [{"name": "initial_h", "from": "initial_h",
                                                     "graph_input": "initial_h"}]
    check_against(oh.run_ort(model, {"X": x, "initial_h": h0, "initial_c": c0}), model, x, state=(h0, c0))


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("batch", [1, 3])
def test_initial_state_as_constants(rng, direction, batch):
    """Constant states: batch 1, or identical rows (broadcast) -> the model's initial_state."""
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D)
    h0 = np.repeat(rng.standard_normal((D, 1, H)), batch, axis=1).astype(np.float32)
    c0 = np.repeat(rng.standard_normal((D, 1, H)), batch, axis=1).astype(np.float32)
    model = oh.lstm_model(w["W"], w["R"], w["B"], direction=direction, initial_h=h0, initial_c=c0)
    x = _x(rng, n=batch)
    layers, opt = onnx_to_params(model)
    np.testing.assert_array_equal(opt["initial_state"][0], h0[:, 0, :])
    np.testing.assert_array_equal(opt["initial_state"][1], c0[:, 0, :])
    check_against(oh.run_ort(model, {"X": x}), model, x)
    m = load_onnx(model)
    np.testing.assert_allclose(m.initial_state[0], h0[:, 0, :])


def test_only_initial_h_constant(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    h0 = rng.standard_normal((1, 1, H)).astype(np.float32)
    model = oh.lstm_model(w["W"], w["R"], w["B"], initial_h=h0)
    x = _x(rng, n=1)
    check_against(oh.run_ort(model, {"X": x}), model, x)


def test_constant_state_with_different_rows_is_unsupported(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    h0 = rng.standard_normal((1, 2, H)).astype(np.float32)
    model = oh.lstm_model(w["W"], w["R"], w["B"], initial_h=h0)
    with pytest.raises(UnsupportedModelError, match="initial_h.*batch size 2"):
        load_onnx(model)


def test_all_zero_constant_state_is_no_state(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    z = np.zeros((1, 4, H), np.float32)
    model = oh.lstm_model(w["W"], w["R"], w["B"], initial_h=z, initial_c=z)
    assert onnx_to_params(model)[1]["initial_state"] is None


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_sequence_lens(rng, direction):
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction, sequence_lens=True,
                          initial_h="input", initial_c="input")
    x = _x(rng, n=4)
    lens = np.array([5, 3, 1, 2], np.int32)
    h0 = rng.standard_normal((D, 4, H)).astype(np.float32)
    c0 = rng.standard_normal((D, 4, H)).astype(np.float32)
    layers, opt = onnx_to_params(model)
    assert opt["source"]["inputs"]["sequence_lens"] == "sequence_lens"
    ref = oh.run_ort(model, {"X": x, "sequence_lens": lens, "initial_h": h0, "initial_c": c0})
    check_against(ref, model, x, state=(h0, c0), lengths=lens)


def test_sequence_length_zero(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], sequence_lens=True, initial_h="input", initial_c="input")
    x = _x(rng, n=2)
    lens = np.array([5, 0], np.int32)
    h0 = rng.standard_normal((1, 2, H)).astype(np.float32)
    c0 = rng.standard_normal((1, 2, H)).astype(np.float32)
    ref = oh.run_ort(model, {"X": x, "sequence_lens": lens, "initial_h": h0, "initial_c": c0})
    m = load_onnx(model)
    y, (h, c) = m.run(x, (h0, c0), lens)
    _close(h, ref[1], "h with a zero-length sequence")
    _close(c, ref[2], "c with a zero-length sequence")


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("state", [False, True])
def test_layout_1_against_reference_evaluator(rng, direction, state):
    """layout=1 (X (N, T, I), states (N, D, H)): onnxruntime refuses it, onnx's ReferenceEvaluator
    is the oracle (it ignores activations/clip, so the defaults are used here)."""
    D = D_OF[direction]
    w = oh.onnx_weights(rng, I, H, D, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction=direction, layout=1,
                          initial_h="input" if state else None, initial_c="input" if state else None)
    x_bm = rng.standard_normal((N, T, I)).astype(np.float32)  # batch-major
    feeds = {"X": x_bm}
    st = None
    if state:
        h0 = rng.standard_normal((N, D, H)).astype(np.float32)
        c0 = rng.standard_normal((N, D, H)).astype(np.float32)
        feeds.update(initial_h=h0, initial_c=c0)
        st = (np.transpose(h0, (1, 0, 2)).copy(), np.transpose(c0, (1, 0, 2)).copy())
    ref = oh.run_reference(model, feeds)
    _, opt = onnx_to_params(model)
    assert opt["source"]["layout"] == 1 and opt["source"]["inputs"]["batch_first"]
    check_against(ref, model, np.transpose(x_bm, (1, 0, 2)).copy(), state=st, ort_layout=1)


def test_layout_1_constant_state_is_batch_major(rng):
    w = oh.onnx_weights(rng, I, H, 2)
    h0 = rng.standard_normal((1, 2, H)).astype(np.float32)  # (N=1, D=2, H)
    model = oh.lstm_model(w["W"], w["R"], w["B"], direction="bidirectional", layout=1, initial_h=h0)
    _, opt = onnx_to_params(model)
    np.testing.assert_array_equal(opt["initial_state"][0], h0[0])


def test_layout_attribute_needs_opset_14(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], opset=7, layout=0)
    with pytest.raises(FormatError, match="layout"):
        load_onnx(model)


# ---------------------------------------------------------------------------------------------
# Where weights live
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights_as", ["constant", "identity"])
def test_weights_in_constant_nodes(rng, weights_as):
    w = oh.onnx_weights(rng, I, H, 2, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction="bidirectional", weights_as=weights_as)
    assert not model.graph.initializer
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, "bfloat16"])
def test_float16_bfloat16_float64_weights(rng, dtype):
    """Non-float32 weights are converted; the oracle is onnxruntime on the same values in float32."""
    w = oh.onnx_weights(rng, I, H, 1, peephole=True)
    if dtype == "bfloat16":
        rounded = {k: None if v is None else
                   ((v.view(np.uint32) + 0x8000) & 0xFFFF0000).astype(np.uint32).view(np.float32)
                   for k, v in w.items()}
    else:
        rounded = {k: None if v is None else v.astype(dtype).astype(np.float32) for k, v in w.items()}
    ref_model = oh.lstm_model(rounded["W"], rounded["R"], rounded["B"], rounded["P"])
    model = oh.lstm_model(rounded["W"], rounded["R"], rounded["B"], rounded["P"])
    for t in model.graph.initializer:  # rewrite the weights in the tested dtype
        a = numpy_helper.to_array(t)
        if dtype == "bfloat16":
            bits = (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            new = helper.make_tensor(t.name, TensorProto.BFLOAT16, a.shape, bits.tobytes(), raw=True)
        else:
            new = numpy_helper.from_array(a.astype(dtype), t.name)
        t.CopyFrom(new)
    x = _x(rng)
    ref = oh.run_ort(ref_model, {"X": x})
    check_against(ref, model, x)


def test_float16_weights_behind_cast(rng):
    """fp16-compressed models: float16 initializers -> Cast(to=FLOAT) -> LSTM (onnxruntime runs it)."""
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    g = model.graph
    new_inits = []
    for t in g.initializer:
        a = numpy_helper.to_array(t).astype(np.float16)
        new_inits.append(numpy_helper.from_array(a, t.name + "_fp16"))
        g.node.insert(0, helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT))
    del g.initializer[:]
    g.initializer.extend(new_inits)
    x = _x(rng)
    check_against(oh.run_ort(model, {"X": x}), model, x)


def _save_external(model, folder, location="weights.bin"):
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def test_external_data(rng, tmp_path):
    w = oh.onnx_weights(rng, I, H, 2, peephole=True)
    model = oh.lstm_model(w["W"], w["R"], w["B"], w["P"], direction="bidirectional")
    x = _x(rng)
    ref = oh.run_ort(model, {"X": x})
    path = _save_external(model, str(tmp_path))  # (converts model's tensors to external in place)
    assert os.path.getsize(tmp_path / "weights.bin") > 0
    loaded = onnx.load(path, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    m = load_onnx(path)
    y, (h, c) = m.run(x)
    _close(y, oh.y_to_time_major(ref[0]), "external data y")
    assert m.info()["source"]["path"] == path
    # from bytes there is no folder to read external data from
    with pytest.raises(FormatError, match="external data"):
        load_onnx(open(path, "rb").read())


def test_lstm_inside_if_branch(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.if_model(w["W"], w["R"], w["B"])
    x = _x(rng)
    (Y,) = oh.run_ort(model, {"X": x, "cond": np.array(True)})
    m = load_onnx(model)
    assert m.info()["source"]["nodes"] == ["lstm_in_if"]
    assert "then_branch" in m.info()["source"]["graph"]
    y, _ = m.run(x)
    _close(y, oh.y_to_time_major(Y), "LSTM in If branch")


def test_lstm_in_nested_subgraphs(rng):
    """If -> then_branch: If -> then_branch: LSTM (weights as Constants), found recursively."""
    w = oh.onnx_weights(rng, I, H, 1)
    inner = oh.if_model(w["W"], w["R"], w["B"])
    inner_if = inner.graph.node[0]
    outer_then = helper.make_graph([inner_if], "outer_then", [],
                                   [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    outer_else = helper.make_graph([helper.make_node("Identity", ["X"], ["Z"])], "outer_else", [],
                                   [helper.make_tensor_value_info("Z", TensorProto.FLOAT, None)])
    outer_if = helper.make_node("If", ["cond"], ["Yo"], then_branch=outer_then, else_branch=outer_else, name="outer")
    g = helper.make_graph([outer_if], "nested", list(inner.graph.input),
                          [helper.make_tensor_value_info("Yo", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    x = _x(rng)
    (Y,) = oh.run_ort(model, {"X": x, "cond": np.array(True)})
    m = load_onnx(model)
    assert m.info()["source"]["graph"].count("then_branch") == 2
    _close(m.run(x)[0], oh.y_to_time_major(Y), "LSTM in nested If")


# ---------------------------------------------------------------------------------------------
# Chains and choosing among candidates
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_chain_becomes_one_multilayer_model(rng, direction):
    D = D_OF[direction]
    ws = [oh.onnx_weights(rng, I if l == 0 else D * H, H, D, bias=l != 1) for l in range(3)]
    model = oh.stacked_model(ws, direction=direction)
    x = _x(rng)
    outs = oh.run_ort(model, {"X": x})
    m = load_onnx(model)
    assert (m.num_layers, m.num_directions) == (3, D)
    assert m.info()["source"]["nodes"] == ["lstm_0", "lstm_1", "lstm_2"]
    y, (h, c) = m.run(x)
    _close(y, oh.y_to_time_major(outs[0]), "stack y")
    _close(h, np.concatenate(outs[1::2]), "stack h")
    _close(c, np.concatenate(outs[2::2]), "stack c")
    # node= names any node of the chain: the whole chain is imported
    assert load_onnx(model, node="lstm_1").num_layers == 3


def test_chain_with_wrong_input_size_is_a_format_error(rng):
    ws = [oh.onnx_weights(rng, I, H, 1), oh.onnx_weights(rng, H + 1, H, 1)]
    model = oh.stacked_model(ws)
    with pytest.raises(FormatError, match=r"lstm_1.*W.*input size 5, expected 4"):
        load_onnx(model)


def test_lstm_feeding_an_lstm_of_another_hidden_size_is_two_candidates(rng):
    """An encoder feeding a decoder of another size is not one uniform stack: each node is a
    candidate of its own (it used to refuse the whole file), and each loads alone."""
    ws = [oh.onnx_weights(rng, I, H, 1), oh.onnx_weights(rng, H, H + 2, 1)]
    model = oh.stacked_model(ws)
    for a in model.graph.node[2].attribute:
        if a.name == "hidden_size":  # the builder wrote the first layer's H on every node
            a.i = H + 2
    with pytest.raises(InputError, match="2 independent LSTMs"):
        load_onnx(model)
    first, second = (n.name for n in model.graph.node if n.op_type == "LSTM")
    assert load_onnx(model, node=first).hidden_size == H
    assert (load_onnx(model, node=second).input_size, load_onnx(model, node=second).hidden_size) == (H, H + 2)


def _two_layer_graph(rng, *, layout, perm, shape):
    """LSTM(bidirectional) -> Transpose(perm) -> Reshape(shape) -> LSTM(bidirectional), both ``layout``."""
    w0, w1 = oh.onnx_weights(rng, I, H, 2), oh.onnx_weights(rng, 2 * H, H, 2)
    inits = [numpy_helper.from_array(v, f"{k}{l}") for l, w in enumerate((w0, w1)) for k, v in w.items()
             if v is not None] + [numpy_helper.from_array(np.array(shape, np.int64), "shape")]
    kw = dict(hidden_size=H, direction="bidirectional", layout=layout)
    nodes = [helper.make_node("LSTM", ["X", "W0", "R0", "B0"], ["Y0"], name="first", **kw),
             helper.make_node("Transpose", ["Y0"], ["Yt"], perm=perm),
             helper.make_node("Reshape", ["Yt", "shape"], ["X1"]),
             helper.make_node("LSTM", ["X1", "W1", "R1", "B1"], ["Y1", "Yh1", "Yc1"], name="second", **kw)]
    g = helper.make_graph(nodes, "two_layers", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("Y1", "Yh1", "Yc1")],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def test_layout_1_chain(rng):
    """Y (N, T, D, H) -> Reshape(0, 0, -1) -> X (N, T, D*H) of a layout=1 node: a chain too."""
    model = _two_layer_graph(rng, layout=1, perm=[0, 1, 2, 3], shape=[0, 0, -1])
    x_bm = rng.standard_normal((N, T, I)).astype(np.float32)
    Y, Yh, Yc = oh.run_reference(model, {"X": x_bm})
    m = load_onnx(model)
    assert m.num_layers == 2
    y, (h, c) = m.run(np.transpose(x_bm, (1, 0, 2)).copy())
    _close(y, oh.y_to_time_major(np.transpose(Y, (1, 2, 0, 3))), "layout-1 chain y")
    _close(h[2:], np.transpose(Yh, (1, 0, 2)), "layout-1 chain h of layer 2")


def test_layout_ops_that_interleave_directions_are_not_a_chain(rng):
    """(T, D, N, H) -> perm (0, 2, 3, 1) -> (T, N, H*D): directions interleaved, not a stack."""
    model = _two_layer_graph(rng, layout=0, perm=[0, 2, 3, 1], shape=[0, 0, -1])
    with pytest.raises(InputError, match="2 independent LSTM"):
        load_onnx(model)
    assert load_onnx(model, node="first").num_layers == 1


def _two_independent_lstms(rng):
    """Two LSTMs reading the same X (no chain): node names 'enc' (H=4) and 'other' (H=6)."""
    wa, wb = oh.onnx_weights(rng, I, 4, 1), oh.onnx_weights(rng, I, 6, 1)
    inits = [numpy_helper.from_array(wa["W"], "Wa"), numpy_helper.from_array(wa["R"], "Ra"),
             numpy_helper.from_array(wb["W"], "Wb"), numpy_helper.from_array(wb["R"], "Rb")]
    nodes = [helper.make_node("LSTM", ["X", "Wa", "Ra"], ["Ya"], name="enc", hidden_size=4),
             helper.make_node("LSTM", ["X", "Wb", "Rb"], ["Yb"], name="other", hidden_size=6)]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I])],
                          [helper.make_tensor_value_info("Ya", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("Yb", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def test_several_candidates_need_node(rng):
    model = _two_independent_lstms(rng)
    with pytest.raises(InputError) as ei:
        load_onnx(model)
    msg = str(ei.value)  # the table lstm_cpu.inspect prints: name, kind, input, hidden, layers, dirs
    assert re.search(r"\benc\s+operator\s+3\s+4\s+1\s+1\b", msg), msg
    assert re.search(r"\bother\s+operator\s+3\s+6\s+1\s+1\b", msg), msg
    assert "forward" in msg
    x = _x(rng)
    Ya, Yb = oh.run_ort(model, {"X": x})
    _close(load_onnx(model, node="other").run(x)[0], oh.y_to_time_major(Yb), "node='other'")
    _close(load_onnx(model, node="enc").run(x)[0], oh.y_to_time_major(Ya), "node='enc'")
    with pytest.raises(InputError, match="no LSTM node named 'nope'"):
        load_onnx(model, node="nope")


def test_source_info(rng, tmp_path):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], sequence_lens=True, initial_h="input", opset=22)
    path = str(tmp_path / "m.onnx")
    onnx.save_model(model, path)
    src = load_onnx(path).info()["source"]
    assert src["format"] == "onnx" and src["path"] == path and src["nodes"] == ["lstm"]
    assert src["opset"] == 22 and src["lstm_version"] == 22 and src["layout"] == 0
    assert src["inputs"]["X"] == "X" and src["inputs"]["sequence_lens"] == "sequence_lens"


def test_float64_model(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    m = load_onnx(model, dtype=np.float64)
    assert m.dtype == np.float64
    x = _x(rng)
    _close(m.run(x)[0], oh.y_to_time_major(oh.run_ort(model, {"X": x})[0]), "float64 model")


# ---------------------------------------------------------------------------------------------
# Bad files: the right lstm_cpu error, a clear message, nothing else escapes
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def good_model(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    return oh.lstm_model(w["W"], w["R"], w["B"])


def test_empty_file(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(FormatError, match="empty.onnx.*empty"):
        load_onnx(str(p))


def test_truncated_file(tmp_path, good_model):
    data = good_model.SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="trunc.onnx"):
        load_onnx(str(p))


def test_random_bytes(tmp_path):
    p = tmp_path / "random.onnx"
    p.write_bytes(np.random.default_rng(5).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(FormatError, match="random.onnx"):
        load_onnx(str(p))


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_onnx(str(tmp_path / "nope.onnx"))


def test_corrupted_bytes_never_leak_foreign_exceptions(good_model):
    """Flip bytes at random: each variant loads or raises an LSTMError, nothing else."""
    data = bytearray(good_model.SerializeToString())
    r = np.random.default_rng(11)
    for _ in range(60):
        d = bytearray(data)
        for pos in r.integers(0, len(d), 3):
            d[pos] = int(r.integers(0, 256))
        try:
            onnx_to_params(bytes(d))
        except LSTMError:
            pass


def test_hidden_size_disagrees_with_weights(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], hidden_size=H + 1)
    with pytest.raises(FormatError, match=r"'lstm'.*tensor W has shape \[1, 16, 3\], expected \[1, 20, I\]"):
        load_onnx(model)


def test_hidden_size_absurd(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], hidden_size=2 ** 31)
    with pytest.raises(FormatError, match="hidden_size=2147483648"):
        load_onnx(model)


def test_hidden_size_absent_is_read_from_R(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], hidden_size=None)
    assert load_onnx(model).hidden_size == H


def test_R_shape_mismatch(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"][:, :, :3].copy(), w["B"])
    with pytest.raises(FormatError, match=r"tensor R has shape \[1, 16, 3\], expected \[1, 16, 4\]"):
        load_onnx(model)


def test_direction_disagrees_with_weights(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], direction="bidirectional")
    with pytest.raises(FormatError, match=r"num_directions=2"):
        load_onnx(model)


def test_dims_larger_than_data(good_model):
    t = good_model.graph.initializer[0]  # W, raw_data for (1, 16, 3)
    t.dims[2] = 1000
    good_model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "I"  # X's size: free
    with pytest.raises(FormatError, match=r"input W .*shape \[1, 16, 1000\].*needs 64000 bytes, its raw_data has 192"):
        load_onnx(good_model)


def test_declared_input_size_disagrees_with_W(good_model):
    good_model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 7
    with pytest.raises(FormatError, match=r"X \('X'\) is declared with input size 7, tensor W expects 3"):
        load_onnx(good_model)


def test_dims_absurd(good_model):
    good_model.graph.initializer[0].dims[2] = 2 ** 40
    with pytest.raises(FormatError, match="outside"):
        load_onnx(good_model)


def test_nan_weights(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    w["R"][0, 0, 0] = np.nan
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    with pytest.raises(FormatError, match="NaN"):
        load_onnx(model)


def test_integer_weights_are_unsupported(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    t = model.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(np.ones(tuple(t.dims), np.int32), "W"))
    with pytest.raises(UnsupportedModelError, match=r"'lstm'.*input W.*INT32"):
        load_onnx(model)


def test_bool_weights_are_unsupported(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    t = model.graph.initializer[1]
    t.CopyFrom(numpy_helper.from_array(np.ones(tuple(t.dims), bool), "R"))
    with pytest.raises(UnsupportedModelError, match=r"input R.*BOOL"):
        load_onnx(model)


def test_weights_from_graph_inputs_are_unsupported(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], weights_as="input")
    with pytest.raises(UnsupportedModelError, match=r"'lstm': input W \('W'\) is graph input 'W'"):
        load_onnx(model)


def test_weights_computed_from_a_graph_input_are_unsupported(good_model):
    """W = W_half * scale with ``scale`` a graph input: known only at run time. (W computed from
    constants only is evaluated at load: tests/test_onnx_constants.py.)"""
    g = good_model.graph
    g.initializer[0].name = "W_half"
    g.input.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    g.node.insert(0, helper.make_node("Mul", ["W_half", "scale"], ["W"], name="scale_w"))
    with pytest.raises(UnsupportedModelError, match=r"input W \('W'\) is computed at run time by Mul node 'scale_w' from graph input 'scale'"):
        load_onnx(good_model)


def test_unknown_activation(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], activations=["Sigmoid", "Swish", "Tanh"])
    with pytest.raises(UnsupportedModelError, match=r"'lstm'.*activations.*'Swish'"):
        load_onnx(model)


def test_wrong_number_of_activations(rng):
    w = oh.onnx_weights(rng, I, H, 2)
    model = oh.lstm_model(w["W"], w["R"], w["B"], direction="bidirectional",
                          activations=["Sigmoid", "Tanh", "Tanh"])
    with pytest.raises(FormatError, match="lists 3 functions; expected 6"):
        load_onnx(model)


def test_bad_direction(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], direction="sideways")
    with pytest.raises(FormatError, match="direction='sideways'"):
        load_onnx(model)


def test_bad_clip(rng):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"], clip=-1.0)
    with pytest.raises(FormatError, match="clip=-1.0"):
        load_onnx(model)


def test_no_lstm_node():
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])])
    with pytest.raises(UnsupportedModelError, match="no LSTM node"):
        load_onnx(helper.make_model(g))


def test_protobuf_without_graph():
    with pytest.raises(FormatError, match="not an ONNX model"):
        load_onnx(onnx.ModelProto(producer_name="not a model").SerializeToString())


def test_undefined_weight_name(good_model):
    good_model.graph.node[0].input[2] = "does_not_exist"
    with pytest.raises(FormatError, match="'does_not_exist' is not defined"):
        load_onnx(good_model)


# -- external data attacks ---------------------------------------------------------------------
def _external_model(tmp_path, rng, location="weights.bin"):
    w = oh.onnx_weights(rng, I, H, 1)
    model = oh.lstm_model(w["W"], w["R"], w["B"])
    path = _save_external(model, str(tmp_path), location="weights.bin")
    m = onnx.load(path, load_external_data=False)
    return m, path


def _set_location(m, path, **fields):
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key in fields:
                e.value = str(fields[e.key])
    onnx.save_model(m, path)
    return path


def test_external_data_dotdot_refused(tmp_path, rng):
    sub = tmp_path / "model_dir"
    sub.mkdir()
    m, path = _external_model(sub, rng)
    os.replace(sub / "weights.bin", tmp_path / "weights.bin")  # the data sits one level up
    _set_location(m, path, location="../weights.bin")
    with pytest.raises(FormatError, match=r"\.\./weights.bin.*no absolute path, no '\.\.'"):
        load_onnx(path)


def test_external_data_absolute_refused(tmp_path, rng):
    m, path = _external_model(tmp_path, rng)
    _set_location(m, path, location=str(tmp_path / "weights.bin"))
    with pytest.raises(FormatError, match="relative path inside the model's folder"):
        load_onnx(path)


def test_external_data_symlink_outside_refused(tmp_path, rng):
    sub = tmp_path / "model_dir"
    sub.mkdir()
    m, path = _external_model(sub, rng)
    os.replace(sub / "weights.bin", tmp_path / "secret.bin")
    os.symlink(tmp_path / "secret.bin", sub / "weights.bin")
    with pytest.raises(FormatError, match="outside the model's folder"):
        load_onnx(path)


def test_external_data_symlink_inside_allowed(tmp_path, rng):
    m, path = _external_model(tmp_path, rng)
    os.replace(tmp_path / "weights.bin", tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", tmp_path / "weights.bin")
    assert load_onnx(path).hidden_size == H


def test_external_data_offset_beyond_file(tmp_path, rng):
    m, path = _external_model(tmp_path, rng)
    _set_location(m, path, offset=10 ** 12)
    with pytest.raises(FormatError, match=r"spans bytes \[1000000000000"):
        load_onnx(path)


def test_external_data_length_disagrees_with_dims(tmp_path, rng):
    m, path = _external_model(tmp_path, rng)
    _set_location(m, path, length=8)
    with pytest.raises(FormatError, match="needs .* bytes, its external data is 8 bytes"):
        load_onnx(path)


def test_external_data_missing_file(tmp_path, rng):
    m, path = _external_model(tmp_path, rng)
    os.remove(tmp_path / "weights.bin")
    with pytest.raises(FormatError, match="does not exist"):
        load_onnx(path)


# ---------------------------------------------------------------------------------------------
# importers/onnx_export.py: the same weights for benchmark peers
# ---------------------------------------------------------------------------------------------
def _random_layers(rng, L, D, acts=None, peephole=True, bias=True):
    from lstm_cpu.spec import LayerParams

    f = lambda *s: rng.standard_normal(s) * 0.5  # noqa: E731
    return [[LayerParams(f(4 * H, I if l == 0 else D * H), f(4 * H, H), f(4 * H) if bias else None, None,
                         f(3 * H) if peephole else None, *(() if acts is None else (acts[d],)))
             for d in range(D)] for l in range(L)]


def _export_feeds(x, L, D, state=None):
    feeds = {"X": x}
    for l in range(L):
        h = np.zeros((D, x.shape[1], H), np.float32) if state is None else state[0][l * D:(l + 1) * D]
        c = np.zeros((D, x.shape[1], H), np.float32) if state is None else state[1][l * D:(l + 1) * D]
        feeds[f"initial_h_{l}"], feeds[f"initial_c_{l}"] = h, c
    return feeds


@pytest.mark.parametrize("L,D", [(1, 1), (2, 1), (3, 2)])
def test_export_round_trip(rng, L, D):
    from lstm_cpu.importers.onnx_export import to_onnx
    from lstm_cpu.model import LSTMModel

    naive = oh.naive
    acts = [(Activation("HardSigmoid", 0.3, 0.4), Activation("Tanh"), Activation("ScaledTanh", 1.2, 0.8)),
            (Activation("Sigmoid"), Activation("Affine", 0.7, 0.1), Activation("LeakyRelu", 0.05))]
    layers = _random_layers(rng, L, D, acts=acts[:D] if D == 2 else None)
    model = LSTMModel(layers, clip=2.5)
    proto = to_onnx(model)
    x = _x(rng)
    h0 = rng.standard_normal((L * D, N, H)).astype(np.float32)
    c0 = rng.standard_normal((L * D, N, H)).astype(np.float32)
    outs = oh.run_ort(proto, _export_feeds(x, L, D, (h0, c0)))
    y, (h, c) = naive.run(layers, x, h0, c0, clip=2.5)
    _close(outs[0], y, "onnxruntime(to_onnx(model)) y vs naive")
    _close(np.concatenate(outs[1::2]), h, "Y_h per layer vs naive h")
    _close(np.concatenate(outs[2::2]), c, "Y_c per layer vs naive c")
    # and back: the importer reads exactly the same model
    back = load_onnx(proto)
    assert back.info()["source"]["nodes"] == [f"LSTM_{l}" for l in range(L)]
    y2, _ = back.run(x, (h0, c0))
    _close(y2, y, "load_onnx(to_onnx(model)) y vs naive")
    for row_a, row_b in zip(model.layer_params(), back.layer_params()):
        for a, b in zip(row_a, row_b):
            np.testing.assert_allclose(a.w_ih, b.w_ih)
            np.testing.assert_allclose(a.bias, b.bias, rtol=1e-6)
            np.testing.assert_allclose(a.peephole, b.peephole)
            assert_acts(a.activations, b.activations)


def test_export_bare_layers_and_head(rng):
    from lstm_cpu.importers.onnx_export import to_onnx
    from lstm_cpu.model import LSTMModel

    layers = _random_layers(rng, 2, 2, peephole=False, bias=False)
    head = (rng.standard_normal((6, 2 * H)), rng.standard_normal(6))
    proto = to_onnx(layers, head=head)
    x = _x(rng)
    (y_onnx, *_) = oh.run_ort(proto, _export_feeds(x, 2, 2))
    y, _ = LSTMModel(layers, head=head).run(x)
    assert y_onnx.shape == (T, N, 6)
    _close(y_onnx, y, "head")


def test_export_refuses_projection(rng):
    from lstm_cpu.importers.onnx_export import to_onnx
    from lstm_cpu.spec import LayerParams

    p = LayerParams(np.ones((4 * H, I)), np.ones((4 * H, 2)), None, np.ones((2, H)))
    with pytest.raises(UnsupportedModelError, match="projection"):
        to_onnx([[p]])


def test_cyclic_identity_chain_behind_a_weight(good_model):
    g = good_model.graph
    g.initializer[1].name = "unused"  # R now comes from a cycle of Identity nodes
    g.node.insert(0, helper.make_node("Identity", ["R_loop"], ["R"]))
    g.node.insert(0, helper.make_node("Identity", ["R"], ["R_loop"]))
    with pytest.raises(FormatError, match="too long or cyclic"):
        load_onnx(good_model)


# ---------------------------------------------------------------------------------------------
# A constant sequence_lens (tf2onnx / constant folding of static shapes)
# ---------------------------------------------------------------------------------------------
def _with_constant_lengths(model, lens, T, N, as_node=False, dtype=np.int32):
    """Wire a constant sequence_lens into the LSTM node; X gets static (T, N, I) when T is given."""
    g = model.graph
    t = onnx.numpy_helper.from_array(np.asarray(lens, dtype), "seq_const")
    if as_node:
        g.node.insert(0, onnx.helper.make_node("Constant", [], ["seq_const"], value=t, name="c_seq"))
    else:
        g.initializer.append(t)
    node = next(n for n in g.node if n.op_type == "LSTM")
    while len(node.input) < 5:
        node.input.append("")
    node.input[4] = "seq_const"
    if T is not None:
        x = next(i for i in g.input if i.name == "X")
        dims = x.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = T, N
    return model


@pytest.mark.parametrize("as_node", [False, True])
def test_constant_sequence_lens_equal_to_static_T_is_a_no_op(rng, as_node):
    T, N, I, H = 6, 3, 4, 5
    w = oh.onnx_weights(rng, I, H)
    model = _with_constant_lengths(oh.lstm_model(w["W"], w["R"], w["B"]), [T] * N, T, N, as_node)
    x = rng.standard_normal((T, N, I)).astype(np.float32)
    ref = oh.run_ort(model, {"X": x})[0]  # (T, 1, N, H)
    m = load_onnx(model)
    y, _ = m.run(x)
    np.testing.assert_allclose(y, ref[:, 0], atol=1e-5, rtol=0)
    assert "no-op" in m.info()["source"]["inputs"]["sequence_lens"]


@pytest.mark.parametrize("lens,T", [([6, 4, 6], 6), ([5, 5, 5], 6), ([6, 6, 6], None), ([], 6)])
def test_constant_sequence_lens_that_would_change_results_is_refused(rng, lens, T):
    w = oh.onnx_weights(rng, 4, 5)
    model = _with_constant_lengths(oh.lstm_model(w["W"], w["R"], w["B"]), lens, T, max(len(lens), 1))
    with pytest.raises(UnsupportedModelError, match="sequence_lens is a constant") as ei:
        load_onnx(model)
    assert ("not static" in str(ei.value)) == (T is None)


def test_constant_sequence_lens_of_wrong_type_is_refused(rng):
    w = oh.onnx_weights(rng, 4, 5)
    model = _with_constant_lengths(oh.lstm_model(w["W"], w["R"], w["B"]), [6, 6, 6], 6, 3, dtype=np.float32)
    with pytest.raises(UnsupportedModelError, match="int32"):
        load_onnx(model)


# ---------------------------------------------------------------------------------------------
# Model-local functions (hostile shapes; the torch export case is in test_onnx_torch_export.py)
# ---------------------------------------------------------------------------------------------
def _function_model(rng, funcs, main_op):
    """An LSTM inside function 'F0' (domain 'local'); ``funcs`` adds more functions; the main
    graph calls ``main_op``."""
    w = oh.onnx_weights(rng, 3, 4)
    lstm_fn = helper.make_function(
        "local", "F0", ["X"], ["Y"],
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w["W"], "W")),
         helper.make_node("Constant", [], ["R"], value=numpy_helper.from_array(w["R"], "R")),
         helper.make_node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=4)],
        [helper.make_opsetid("", 14)])
    graph = helper.make_graph(
        [helper.make_node(main_op, ["X"], ["Y"], domain="local")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, functions=[lstm_fn] + funcs,
                          opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("local", 1)])
    m.ir_version = 8
    return m, w


def test_lstm_in_a_local_function_is_inlined(rng):
    m, w = _function_model(rng, [], "F0")
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    ref = oh.run_ort(m, {"X": x})[0]  # (T, 1, N, H)
    model = load_onnx(m)
    y, _ = model.run(x)
    np.testing.assert_allclose(y, ref[:, 0], atol=1e-5, rtol=0)


def test_exponential_function_nesting_is_refused_quickly(rng):
    # F_k calls F_{k-1} twice: 2**30 LSTM nodes once inlined, from a file of a few KB.
    funcs = [helper.make_function("local", f"F{k}", ["X"], ["Y"],
                                  [helper.make_node(f"F{k - 1}", ["X"], ["A"], domain="local"),
                                   helper.make_node(f"F{k - 1}", ["A"], ["Y"], domain="local")],
                                  [helper.make_opsetid("", 14), helper.make_opsetid("local", 1)])
             for k in range(1, 31)]
    m, _ = _function_model(rng, funcs, "F30")
    with pytest.raises(FormatError, match="more than"):
        load_onnx(m)


def test_recursive_function_is_refused(rng):
    rec = helper.make_function("local", "R", ["X"], ["Y"],
                               [helper.make_node("R", ["X"], ["Y"], domain="local"),
                                helper.make_node("F0", ["X"], ["Z"], domain="local")],
                               [helper.make_opsetid("", 14), helper.make_opsetid("local", 1)])
    m, _ = _function_model(rng, [rec], "R")
    with pytest.raises(FormatError, match="calls itself"):
        load_onnx(m)
