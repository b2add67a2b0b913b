"""Weights that real ONNX files compute from constants, keep in outer scopes, or store in 16/64 bits.

Oracle: torch (nn.LSTM) on the same weights, over a stream of 60 steps (or a 60-step sequence
for bidirectional stacks) with the final state compared. Issue #10, items 1-3:

* W/R/B written by ``torch.onnx.export(..., do_constant_folding=False)`` (Slice, Concat,
  Unsqueeze, ... of initializers), evaluated at load by onnx's ReferenceEvaluator;
* float16 / bfloat16 / float64 initializers, directly or behind ``Cast`` (a model converted to
  fp16 by hand with onnx.helper, as onnxconverter-common's converter does);
* LSTM nodes in nested ``If`` branches reading initializers and Constant outputs of enclosing
  graphs (each one a candidate, picked with ``node=``);
* the safety of evaluation: sizes bounded before a node runs, evaluator failures named,
  external data outside the model's folder refused, run-time values never evaluated.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lstm_cpu.errors import FormatError, UnsupportedModelError  # noqa: E402
from lstm_cpu.importers.onnx_lstm import load_onnx  # noqa: E402

I, H, T = 3, 5, 60
ATOL = RTOL = 2e-5


def _torch_lstm(num_layers=1, bidirectional=False, seed=0, round_to=None):
    """A random nn.LSTM; ``round_to`` (torch.float16 / torch.bfloat16): weights made exactly
    representable in that type, so a file storing them in it holds the very same numbers."""
    torch.manual_seed(seed)
    m = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.6, 0.6)
            if round_to is not None:
                p.copy_(p.to(round_to).float())
    return m.eval()


def _x(seed=1):
    return torch.randn(T, 1, I, generator=torch.Generator().manual_seed(seed))


def _compare_stream(m, model, x):
    """Step ``model``'s stream through x (T, 1, I) and compare every output and the final state
    with the torch module (a one-direction stack)."""
    with torch.no_grad():
        y, (h, c) = m(x)
    s = model.stream()
    for t in range(x.shape[0]):
        np.testing.assert_allclose(s.step(x[t, 0].numpy()), y[t, 0].numpy(), rtol=RTOL, atol=ATOL,
                                   err_msg=f"step {t}")
    h2, c2 = s.state
    np.testing.assert_allclose(h2, h[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="final h")
    np.testing.assert_allclose(c2, c[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="final c")


def _compare_run(m, model, x):
    """model.run over the whole sequence vs torch (bidirectional stacks run as a sequence)."""
    with torch.no_grad():
        y, (h, c) = m(x)
    y2, (h2, c2) = model.run(x[:, 0].numpy())
    np.testing.assert_allclose(y2, y[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="y")
    np.testing.assert_allclose(h2, h[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="final h")
    np.testing.assert_allclose(c2, c[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="final c")


def _export(m, path, constant_folding):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (_x(),), path, dynamo=False, do_constant_folding=constant_folding,
                          input_names=["x"], dynamic_axes={"x": {0: "T"}})
    return onnx.load(path)


def _lstm_inputs_are_computed(model_proto):
    """True when every LSTM node's W, R and B come out of a non-Constant node (not initializers)."""
    g = model_proto.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    lstms = [n for n in g.node if n.op_type == "LSTM"]
    return lstms and all(n.input[k] not in inits and producers[n.input[k]].op_type != "Constant"
                         for n in lstms for k in (1, 2, 3))


# ---------------------------------------------------------------------------------------------
# 1. Weights computed from constants (torch.onnx.export without constant folding)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
def test_torch_export_without_constant_folding(tmp_path, num_layers, bidirectional):
    m = _torch_lstm(num_layers, bidirectional)
    proto = _export(m, str(tmp_path / "nofold.onnx"), constant_folding=False)
    assert _lstm_inputs_are_computed(proto), "the export should compute W/R/B with operators"
    model = load_onnx(str(tmp_path / "nofold.onnx"))
    assert (model.num_layers, model.num_directions) == (num_layers, 2 if bidirectional else 1)
    if bidirectional:
        _compare_run(m, model, _x(2))
    else:
        _compare_stream(m, model, _x(2))


def test_constant_arithmetic_on_weights_is_evaluated(tmp_path):
    """W = Mul(W_half, 2) and R = Transpose(Transpose(R)): any operator, not a fixed list."""
    m = _torch_lstm(seed=3)
    proto = _export(m, str(tmp_path / "m.onnx"), constant_folding=True)
    g = proto.graph
    lstm = next(n for n in g.node if n.op_type == "LSTM")
    inits = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(inits[lstm.input[1]])
    inits[lstm.input[1]].CopyFrom(numpy_helper.from_array(w / 2, lstm.input[1] + "_half"))
    g.initializer.append(numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    g.node.insert(0, helper.make_node("Mul", [lstm.input[1] + "_half", "two"], [lstm.input[1]], name="w_times_2"))
    r = lstm.input[2]
    inits[r].name = r + "_t"
    inits[r].CopyFrom(numpy_helper.from_array(np.transpose(numpy_helper.to_array(inits[r]), (0, 2, 1)), r + "_t"))
    g.node.insert(0, helper.make_node("Transpose", [r + "_t"], [r], perm=[0, 2, 1], name="r_back"))
    model = load_onnx(proto)
    _compare_stream(m, model, _x(4))


# ---------------------------------------------------------------------------------------------
# 3. 16- and 64-bit weights, directly or behind Cast
# ---------------------------------------------------------------------------------------------
def _onnx_weights(m):
    """W (1, 4H, I), R (1, 4H, H), B (1, 8H) of a one-layer nn.LSTM in ONNX's gate order (i, o, f,
    c), written here independently of the importer: torch's blocks are (i, f, g, o)."""
    def iofc(a):
        i, f, g, o = np.split(a.detach().double().numpy(), 4)
        return np.concatenate([i, o, f, g])

    W = iofc(m.weight_ih_l0)[None]
    R = iofc(m.weight_hh_l0)[None]
    B = np.concatenate([iofc(m.bias_ih_l0), iofc(m.bias_hh_l0)])[None]
    return W, R, B


def _typed_tensor(name, arr, data_type):
    if data_type == TensorProto.BFLOAT16:  # helper rounds floats to bfloat16 bit patterns
        return helper.make_tensor(name, data_type, arr.shape, arr.astype(np.float32).ravel().tolist())
    np_type = {TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
               TensorProto.FLOAT: np.float32}[data_type]
    return numpy_helper.from_array(arr.astype(np_type), name)


def _typed_model(m, data_type, cast_to=None):
    """One LSTM node whose W/R/B initializers are of ``data_type``; with ``cast_to``, each goes
    through a Cast node to that type first (the fp16-converted-model pattern)."""
    W, R, B = _onnx_weights(m)
    nodes, inits, ins = [], [], ["X"]
    for name, arr in (("W", W), ("R", R), ("B", B)):
        if cast_to is None:
            inits.append(_typed_tensor(name, arr, data_type))
            ins.append(name)
        else:
            inits.append(_typed_tensor(name + "_stored", arr, data_type))
            nodes.append(helper.make_node("Cast", [name + "_stored"], [name], to=cast_to, name=f"cast_{name}"))
            ins.append(name)
    x_type = data_type if cast_to is None else cast_to
    nodes.append(helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], name="lstm", hidden_size=H))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", x_type, ["T", 1, I])],
                              [helper.make_tensor_value_info("Y", x_type, None)], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    return proto


@pytest.mark.parametrize("data_type,round_to", [(TensorProto.FLOAT16, torch.float16),
                                                (TensorProto.BFLOAT16, torch.bfloat16)])
@pytest.mark.parametrize("behind_cast", [False, True])
def test_16_bit_initializers(data_type, round_to, behind_cast):
    """A whole model in fp16/bf16 (initializers and X), or 16-bit initializers Cast to float
    (what a converter writes with keep_io_types): loaded into float32, the same numbers."""
    m = _torch_lstm(seed=5, round_to=round_to)
    proto = _typed_model(m, data_type, cast_to=TensorProto.FLOAT if behind_cast else None)
    model = load_onnx(proto)
    assert model.dtype == np.float32
    _compare_stream(m, model, _x(6))


def test_fp16_converted_torch_export(tmp_path):
    """A torch export converted to fp16 by hand (onnx helper only): every float initializer
    becomes float16 with a Cast back to float in front of its consumers. The oracle is the torch
    module with its weights rounded to fp16, so a wrong conversion cannot hide."""
    m = _torch_lstm(num_layers=2, seed=7)
    proto = _export(m, str(tmp_path / "m.onnx"), constant_folding=True)
    g = proto.graph
    new_inits, casts = [], []
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            new_inits.append(numpy_helper.from_array(a.astype(np.float16), t.name + "_fp16"))
            casts.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT,
                                          name=f"cast_{t.name}"))
        else:
            new_inits.append(t)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    model = load_onnx(proto)
    rounded = _torch_lstm(num_layers=2, seed=7, round_to=None)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.half().float())
    _compare_stream(rounded, model, _x(8))
    # and the rounding is visible: the unrounded module differs by far more than the tolerance
    with torch.no_grad():
        y_full, _ = m(_x(8))
        y_half, _ = rounded(_x(8))
    assert np.abs(y_full.numpy() - y_half.numpy()).max() > 5 * ATOL


@pytest.mark.parametrize("behind_cast", [False, True])
def test_float64_initializers(behind_cast):
    """float64 weights: a float64 model reproduces torch in double precision; behind a Cast to
    float they are rounded to float32 as the graph says."""
    m = _torch_lstm(seed=9).double()
    proto = _typed_model(m, TensorProto.DOUBLE, cast_to=TensorProto.FLOAT if behind_cast else None)
    if not behind_cast:
        model = load_onnx(proto, dtype=np.float64)
        x = _x(10).double()
        with torch.no_grad():
            y, (h, c) = m(x)
        s = model.stream()
        ys = np.stack([s.step(x[t, 0].numpy()) for t in range(T)])
        np.testing.assert_allclose(ys, y[:, 0].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.state[1], c[:, 0].numpy(), rtol=1e-12, atol=1e-12)
    else:
        model = load_onnx(proto)
        _compare_stream(m.float(), model, _x(10))


# ---------------------------------------------------------------------------------------------
# 2. LSTM nodes in nested If branches, reading the enclosing graphs' constants
# ---------------------------------------------------------------------------------------------
def _lstm_node(name, w, r, b):
    return helper.make_node("LSTM", ["X", w, r, b], ["Y_" + name], name=name, hidden_size=H)


def nested_if_model(ma, mb, mc):
    """main: initializers W_a/R_a/B_a (module ma), Constant nodes W_b/R_b/B_b (mb), inputs X,
    c1, c2.  If c1: (If c2: LSTM 'lstm_a' on the main graph's initializers, else LSTM 'lstm_b'
    on the main graph's Constant outputs), else: LSTM 'lstm_c' whose W is Mul(main's W_c_half,
    the branch's own 'two') -- a constant computed across scopes."""
    Wa, Ra, Ba = _onnx_weights(ma)
    Wb, Rb, Bb = _onnx_weights(mb)
    Wc, Rc, Bc = _onnx_weights(mc)
    f32 = lambda a, n: numpy_helper.from_array(a.astype(np.float32), n)  # noqa: E731
    yinfo = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731

    inner_then = helper.make_graph([_lstm_node("lstm_a", "W_a", "R_a", "B_a")], "inner_then", [], [yinfo("Y_lstm_a")])
    inner_else = helper.make_graph([_lstm_node("lstm_b", "W_b", "R_b", "B_b")], "inner_else", [], [yinfo("Y_lstm_b")])
    outer_then = helper.make_graph(
        [helper.make_node("If", ["c2"], ["Y_inner"], then_branch=inner_then, else_branch=inner_else, name="inner_if")],
        "outer_then", [], [yinfo("Y_inner")])
    outer_else = helper.make_graph(
        [helper.make_node("Mul", ["W_c_half", "two"], ["W_c"], name="w_c_times_2"),
         _lstm_node("lstm_c", "W_c", "R_c", "B_c")],
        "outer_else", [], [yinfo("Y_lstm_c")], initializer=[f32(np.array(2.0), "two")])
    main_nodes = [helper.make_node("Constant", [], [n], value=f32(a, n + "_value"), name="const_" + n)
                  for n, a in (("W_b", Wb), ("R_b", Rb), ("B_b", Bb))]
    main_nodes.append(helper.make_node("If", ["c1"], ["Y"], then_branch=outer_then, else_branch=outer_else,
                                       name="outer_if"))
    graph = helper.make_graph(
        main_nodes, "main",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 1, I]),
         helper.make_tensor_value_info("c1", TensorProto.BOOL, []),
         helper.make_tensor_value_info("c2", TensorProto.BOOL, [])],
        [yinfo("Y")],
        initializer=[f32(Wa, "W_a"), f32(Ra, "R_a"), f32(Ba, "B_a"), f32(Wc / 2, "W_c_half"),
                     f32(Rc, "R_c"), f32(Bc, "B_c")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    return proto


def test_nested_if_branches_with_outer_scope_weights():
    ms = {k: _torch_lstm(seed=s) for k, s in (("lstm_a", 11), ("lstm_b", 12), ("lstm_c", 13))}
    proto = nested_if_model(ms["lstm_a"], ms["lstm_b"], ms["lstm_c"])
    for name, m in ms.items():
        model = load_onnx(proto, node=name)
        assert model.info()["source"]["nodes"] == [name]
        _compare_stream(m, model, _x(14))


def test_nested_if_matches_onnxruntime_branch_by_branch():
    """The same file run by onnxruntime with each (c1, c2): the branch taken is the candidate we
    load (checks that the test's own graph means what it says)."""
    ort = pytest.importorskip("onnxruntime")
    ms = [_torch_lstm(seed=s) for s in (11, 12, 13)]
    proto = nested_if_model(*ms)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = _x(15).numpy()
    for (c1, c2), name in (((True, True), "lstm_a"), ((True, False), "lstm_b"), ((False, True), "lstm_c")):
        (Y,) = sess.run(None, {"X": x, "c1": np.array(c1), "c2": np.array(c2)})
        y, _ = load_onnx(proto, node=name).run(x[:, 0])
        np.testing.assert_allclose(y, Y[:, 0, 0], rtol=RTOL, atol=ATOL, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Evaluation is bounded, named, and never reads outside the model's folder
# ---------------------------------------------------------------------------------------------
def _one_lstm_with_w_from(nodes, inits, w_name="W", extra_inputs=()):
    m = _torch_lstm(seed=20)
    W, R, B = _onnx_weights(m)
    f32 = lambda a, n: numpy_helper.from_array(a.astype(np.float32), n)  # noqa: E731
    graph = helper.make_graph(
        list(nodes) + [helper.make_node("LSTM", ["X", w_name, "R", "B"], ["Y"], name="lstm", hidden_size=H)],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 1, I])] + list(extra_inputs),
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[f32(R, "R"), f32(B, "B")] + list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    return proto, W


def test_evaluator_failure_names_the_node_and_tensor():
    _, W = _one_lstm_with_w_from([], [])
    proto, _ = _one_lstm_with_w_from(
        [helper.make_node("Reshape", ["W_flat", "bad_shape"], ["W"], name="bad_reshape")],
        [numpy_helper.from_array(W.astype(np.float32).ravel(), "W_flat"),
         numpy_helper.from_array(np.array([7, -1, 3], np.int64), "bad_shape")])
    with pytest.raises(FormatError, match=r"'lstm': input W \('W'\).*Reshape node 'bad_reshape'"):
        load_onnx(proto)


def test_huge_computed_tensor_is_refused_before_evaluation():
    """Expand of a scalar to 2**40 elements: refused from the inferred shape, never allocated."""
    proto, _ = _one_lstm_with_w_from(
        [helper.make_node("Expand", ["one", "huge"], ["W"], name="blow_up")],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "huge")])
    with pytest.raises(FormatError, match=r"Expand node 'blow_up'.*limit"):
        load_onnx(proto)


def test_random_and_run_time_values_are_never_evaluated():
    proto, _ = _one_lstm_with_w_from(
        [helper.make_node("RandomNormal", [], ["W"], shape=[1, 4 * H, I], name="rand")], [])
    with pytest.raises(UnsupportedModelError, match=r"input W \('W'\) is computed at run time.*RandomNormal"):
        load_onnx(proto)
    proto, _ = _one_lstm_with_w_from(
        [helper.make_node("Concat", ["W0", "W1"], ["W"], axis=1, name="cat")], [],
        extra_inputs=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2 * H, I]) for n in ("W0", "W1")])
    with pytest.raises(UnsupportedModelError, match=r"Concat node 'cat' from graph input 'W[01]'"):
        load_onnx(proto)


def test_external_data_of_a_computed_weight_stays_in_the_folder(tmp_path):
    """An initializer feeding a constant subgraph, stored as external data: read from the model's
    folder (and the result is right), refused when its location leaves the folder."""
    m = _torch_lstm(seed=20)
    W, _, _ = _onnx_weights(m)
    half = (W / 2).astype(np.float32)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(half.tobytes())
    (tmp_path / "outside.bin").write_bytes(half.tobytes())

    def model_with(location):
        t = TensorProto(name="W_half", data_type=TensorProto.FLOAT, dims=list(half.shape),
                        data_location=TensorProto.EXTERNAL)
        t.external_data.add(key="location", value=location)
        proto, _ = _one_lstm_with_w_from(
            [helper.make_node("Add", ["W_half", "W_half"], ["W"], name="double_it")], [t])
        path = folder / f"m_{abs(hash(location))}.onnx"
        path.write_bytes(proto.SerializeToString())
        return str(path)

    _compare_stream(m, load_onnx(model_with("w.bin")), _x(21))
    with pytest.raises(FormatError, match=r"external data location '\.\./outside\.bin'"):
        load_onnx(model_with("../outside.bin"))
    with pytest.raises(FormatError, match="outside the model's folder|relative path"):
        load_onnx(model_with(os.path.join(str(tmp_path), "outside.bin")))
