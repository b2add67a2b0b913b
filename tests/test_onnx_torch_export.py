"""torch.onnx.export of nn.LSTM stacks -> load_onnx / lstm_cpu.load -> the same outputs as torch.

Both exporters: the TorchScript one (``dynamo=False``: Squeeze or Transpose+Reshape between layers,
zero states from ConstantOfShape, ``lstm(x, (h0, c0))`` as Slices of graph inputs) and the dynamo
one (static shapes: Reshape to constant sizes and zero states baked in as batch-N constants;
dynamic shapes: Reshape targets computed with Shape/Slice/Mul/Concat). Files go to tmp_path.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from lstm_cpu.importers.onnx_lstm import load_onnx  # noqa: E402

ATOL = RTOL = 1e-5
I, H, T, N = 3, 5, 6, 2


def _lstm(num_layers, bidirectional, batch_first, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    with torch.no_grad():
        for p in m.parameters():  # biases away from 0 so every gate matters
            p.uniform_(-0.6, 0.6)
    return m.eval()


def _inputs(m, with_state, seed=1):
    g = torch.Generator().manual_seed(seed)
    D = 2 if m.bidirectional else 1
    x = torch.randn((N, T, I) if m.batch_first else (T, N, I), generator=g)
    if not with_state:
        return (x,)
    h0 = torch.randn(m.num_layers * D, N, H, generator=g)
    c0 = torch.randn(m.num_layers * D, N, H, generator=g)
    return (x, (h0, c0))


def _compare(m, args, model):
    """model.run on time-major x (and state) vs the torch module."""
    with torch.no_grad():
        y, (h, c) = m(*args)
    x = args[0].numpy()
    y = y.numpy()
    if m.batch_first:
        x, y = x.transpose(1, 0, 2), y.transpose(1, 0, 2)
    state = None if len(args) == 1 else (args[1][0].numpy(), args[1][1].numpy())
    y2, (h2, c2) = model.run(x, state)
    np.testing.assert_allclose(y2, y, rtol=RTOL, atol=ATOL, err_msg="y")
    np.testing.assert_allclose(h2, h.numpy(), rtol=RTOL, atol=ATOL, err_msg="h_n")
    np.testing.assert_allclose(c2, c.numpy(), rtol=RTOL, atol=ATOL, err_msg="c_n")
    D = 2 if m.bidirectional else 1
    assert (model.num_layers, model.num_directions, model.input_size, model.hidden_size) == (m.num_layers, D, I, H)


STACKS = [(1, False, False), (2, False, True), (3, False, False), (1, True, False), (2, True, True),
          (3, True, False)]


@pytest.mark.parametrize("num_layers,bidirectional,batch_first", STACKS)
@pytest.mark.parametrize("with_state", [False, True])
def test_legacy_exporter(tmp_path, num_layers, bidirectional, batch_first, with_state):
    m = _lstm(num_layers, bidirectional, batch_first)
    args = _inputs(m, with_state)
    path = str(tmp_path / "lstm.onnx")
    names = ["x", "h0", "c0"] if with_state else ["x"]
    axes = {"x": {0: "d0", 1: "d1"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, path, dynamo=False, input_names=names, dynamic_axes=axes)
    model = load_onnx(path)
    assert model.info()["source"]["nodes"] == ["/LSTM"] + [f"/LSTM_{k}" for k in range(1, num_layers)]
    src_in = model.info()["source"]["inputs"]
    assert src_in["batch_first"] == batch_first and src_in["X_graph_input"] == "x"
    if with_state:  # per-layer Slices of the graph inputs h0 / c0: the caller passes the state
        assert model.initial_state is None
        assert [s["graph_input"] for s in src_in["initial_h"]] == ["h0"] * num_layers
    _compare(m, args, model)


class _Wrapped(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)


@pytest.mark.parametrize("num_layers,bidirectional,batch_first", [(2, False, False), (2, True, True)])
def test_legacy_exporter_modules_as_functions(tmp_path, num_layers, bidirectional, batch_first):
    """export_modules_as_functions puts nn.LSTM's LSTM nodes in a model-local function (called
    from the main graph as op "LSTM" in domain torch.nn.modules.rnn): they are inlined and found."""
    m = _lstm(num_layers, bidirectional, batch_first)
    args = _inputs(m, False)
    path = str(tmp_path / "fn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Wrapped(m), args, path, dynamo=False, opset_version=17,
                          export_modules_as_functions={torch.nn.LSTM})
    proto = onnx.load(path)
    assert proto.functions and not any(n.op_type == "LSTM" and n.domain == "" for n in proto.graph.node)
    model = load_onnx(path)
    assert model.info()["source"]["inlined_functions"] is True
    _compare(m, args, model)


def test_legacy_exporter_through_lstm_cpu_load(tmp_path):
    import lstm_cpu

    m = _lstm(2, True, False)
    args = _inputs(m, False)
    path = str(tmp_path / "stack.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args, path, dynamo=False)
    model = lstm_cpu.load(path)
    assert model.info()["source"]["format"] == "onnx"
    _compare(m, args, model)


def _dynamo_export(m, args, path, dynamic):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    kw = {}
    if dynamic:
        b, t = torch.export.Dim("batch"), torch.export.Dim("time")
        kw["dynamic_shapes"] = ({0: b, 1: t} if m.batch_first else {0: t, 1: b},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(m, args, dynamo=True, verbose=False, **kw)
        except Exception as exc:  # the dynamo exporter is still evolving
            pytest.skip(f"torch.onnx.export(dynamo=True) failed here: {type(exc).__name__}: {exc}")
    prog.save(path)
    proto = onnx.load(path, load_external_data=False)
    if not any(n.op_type == "LSTM" for n in proto.graph.node):
        pytest.skip("the dynamo exporter did not emit ONNX LSTM nodes for this module")


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,dynamic", [
    (2, True, True, False),
    (2, True, True, True),
    (3, False, False, True),
])
def test_dynamo_exporter(tmp_path, num_layers, bidirectional, batch_first, dynamic):
    m = _lstm(num_layers, bidirectional, batch_first)
    args = _inputs(m, False)
    path = str(tmp_path / "lstm_dynamo.onnx")
    _dynamo_export(m, args, path, dynamic)
    model = load_onnx(path)
    assert model.num_layers == num_layers
    # static exports bake zero states in as (D, N, H) constants: identical rows -> no initial state
    assert model.initial_state is None
    _compare(m, args, model)
    if dynamic:  # a different T and batch than at export time
        g = torch.Generator().manual_seed(7)
        x = torch.randn((3, 9, I) if batch_first else (9, 3, I), generator=g)
        _compare(m, (x,), model)
