"""Decomposed and unrolled LSTM cells in ONNX graphs (issue 10 items 4-5), torch as the oracle.

Every model is generated here from torch and exported with both exporters (``dynamo=False`` and
``dynamo=True``); the recovered model (``find_cells`` -> ``LSTMModel(layers, **options)``) is
compared with the torch module over a stream of STEPS steps, outputs and final state. Hand-built
graphs (``onnx.helper``) check the refusals: something shaped like a cell that is not an LSTM the
engine can run is refused with UnsupportedModelError naming the node, never returned.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lstm_cpu  # noqa: E402
from lstm_cpu.errors import LSTMError, UnsupportedModelError  # noqa: E402
from lstm_cpu.importers import onnx_cells_affine, onnx_cells_graph  # noqa: E402
from lstm_cpu.importers.onnx_cells import find_cells  # noqa: E402
from lstm_cpu.spec import LayerParams  # noqa: E402

import naive  # noqa: E402  (tests/naive.py, float64 reference)

I, H, STEPS, T_EXPORT = 3, 5, 60, 6
ATOL = RTOL = 1e-5
EXPORTERS = [pytest.param(False, id="legacy"), pytest.param(True, id="dynamo")]


def _export(module, args, dynamo, names=None):
    """torch.onnx.export -> onnx.ModelProto, in memory."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, args, dynamo=True, input_names=names).model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, args, buf, dynamo=False, input_names=names)
        return onnx.load_from_string(buf.getvalue())


def _randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # biases away from 0 so every gate matters
            p.uniform_(-0.6, 0.6)
    return module.eval()


def _recover(proto, kind):
    found = find_cells(proto, None, "<test>")
    assert len(found) == 1, [f.candidate for f in found]
    assert found[0].candidate.kind == kind
    layers, options = found[0].build()
    return found[0].candidate, lstm_cpu.LSTMModel(layers, **options), options


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------
class TorchCell(torch.nn.Module):
    def __init__(self, i=I):
        super().__init__()
        self.cell = torch.nn.LSTMCell(i, H)

    def forward(self, x, h, c):
        return self.cell(x, (h, c))


class HandCell(torch.nn.Module):
    """A hand-written cell: Linear on cat([x, h]) (or one Linear per side), gates in ``order``."""

    def __init__(self, order, separate=False, split=False, i=I):
        super().__init__()
        self.order, self.separate, self.split = order, separate, split
        if separate:
            self.lx, self.lh = torch.nn.Linear(i, 4 * H), torch.nn.Linear(H, 4 * H)
        else:
            self.lin = torch.nn.Linear(i + H, 4 * H)

    def forward(self, x, h, c):
        z = self.lx(x) + self.lh(h) if self.separate else self.lin(torch.cat([x, h], 1))
        parts = torch.split(z, H, dim=1) if self.split else z.chunk(4, 1)
        gate = dict(zip(self.order, parts))
        c2 = torch.sigmoid(gate["f"]) * c + torch.sigmoid(gate["i"]) * torch.tanh(gate["g"])
        return torch.sigmoid(gate["o"]) * torch.tanh(c2), c2


def _stream_vs_torch(module, model, i=I, seed=1):
    """STEPS streamed steps from a random state: every output and the final state vs torch."""
    g = torch.Generator().manual_seed(seed)
    h, c = torch.randn(1, H, generator=g), torch.randn(1, H, generator=g)
    xs = torch.randn(STEPS, 1, i, generator=g)
    s = model.stream()
    s.state = (h.numpy(), c.numpy())
    with torch.no_grad():
        for t in range(STEPS):
            h, c = module(xs[t], h, c)
            y = s.step(xs[t, 0].numpy())
            np.testing.assert_allclose(y, h[0].numpy(), rtol=RTOL, atol=ATOL, err_msg=f"h at step {t}")
    h2, c2 = s.state
    np.testing.assert_allclose(h2, h.numpy(), rtol=RTOL, atol=ATOL, err_msg="final h")
    np.testing.assert_allclose(c2, c.numpy(), rtol=RTOL, atol=ATOL, err_msg="final c")


def _cell_case(module, dynamo, i=I):
    module = _randomize(module, 0)
    args = (torch.randn(1, i), torch.randn(1, H), torch.randn(1, H))
    proto = _export(module, args, dynamo, names=["x", "h", "c"])
    cand, model, options = _recover(proto, "cell")
    assert (cand.input_size, cand.hidden_size, cand.num_layers, cand.num_directions) == (i, H, 1, 1)
    assert options["source"]["inputs"] == {"x": "x", "h": "h", "c": "c"}
    assert "x 'x', h 'h', c 'c'" in cand.location
    _stream_vs_torch(module, model, i)
    return cand


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_lstmcell(dynamo):
    _cell_case(TorchCell(), dynamo)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("order,separate,split", [("ifgo", False, False), ("ogif", False, True),
                                                  ("gofi", True, False)])
def test_hand_written_cell_any_gate_order(dynamo, order, separate, split):
    """The gate order comes from the structure: any order of the four chunks is recovered."""
    _cell_case(HandCell(order, separate, split), dynamo)


def test_cell_with_input_size_equal_to_hidden():
    """I == H: x and h have the same size; the graph-input order (x, h, c) tells them apart."""
    cand = _cell_case(HandCell("fiog", i=H), False, i=H)
    assert "graph-input order" in cand.location


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_unbatched_cell(dynamo):
    """nn.LSTMCell on 1-D x, h, c: the exporters add Unsqueeze/Squeeze around the cell."""
    module = _randomize(TorchCell(), 10)
    proto = _export(module, (torch.randn(I), torch.randn(H), torch.randn(H)), dynamo, names=["x", "h", "c"])
    cand, model, options = _recover(proto, "cell")
    assert options["source"]["inputs"] == {"x": "x", "h": "h", "c": "c"}
    _stream_vs_torch(lambda x, h, c: tuple(v[None] for v in module(x[0], h[0], c[0])), model)


def test_cell_batch_of_two_rows():
    """A batch-2 export: the self-check runs both rows; the weights are per sample."""
    module = _randomize(TorchCell(), 3)
    args = (torch.randn(2, I), torch.randn(2, H), torch.randn(2, H))
    _, model, _ = _recover(_export(module, args, False, names=["x", "h", "c"]), "cell")
    _stream_vs_torch(module, model)


def test_recovered_weights_are_the_files():
    """The weights are read, not probed: they equal torch's parameters in canonical order."""
    module = _randomize(TorchCell(), 4)
    args = (torch.randn(1, I), torch.randn(1, H), torch.randn(1, H))
    found = find_cells(_export(module, args, False), None, "<test>")
    (layer,), = found[0].build()[0]
    cell = module.cell
    np.testing.assert_array_equal(layer.w_ih, cell.weight_ih.detach().numpy())
    np.testing.assert_array_equal(layer.w_hh, cell.weight_hh.detach().numpy())
    np.testing.assert_allclose(layer.bias, (cell.bias_ih + cell.bias_hh).detach().numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Unrolled loops
# ---------------------------------------------------------------------------------------------
class Loop(torch.nn.Module):
    """A Python-loop LSTM over LSTMCells: L layers, one or two directions; zero initial state,
    or (h0, c0) (L*D, N, H) given as inputs. Returns y (T, N, D*H), h_n, c_n (L*D, N, H)."""

    def __init__(self, layers, bidirectional):
        super().__init__()
        self.L, self.D = layers, 2 if bidirectional else 1
        self.cells = torch.nn.ModuleList(
            [torch.nn.LSTMCell(I if j // self.D == 0 else H * self.D, H) for j in range(layers * self.D)])

    def forward(self, x, h0=None, c0=None):
        T, N = x.shape[0], x.shape[1]
        inp = [x[t] for t in range(T)]
        hs, cs = [], []
        for l in range(self.L):
            outs = []
            for d in range(self.D):
                j = l * self.D + d
                h = torch.zeros(N, H) if h0 is None else h0[j]
                c = torch.zeros(N, H) if c0 is None else c0[j]
                ys = [None] * T
                for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                    h, c = self.cells[j](inp[t], (h, c))
                    ys[t] = h
                outs.append(ys)
                hs.append(h)
                cs.append(c)
            inp = [torch.cat([o[t] for o in outs], 1) for t in range(T)]
        return torch.stack(inp), torch.stack(hs), torch.stack(cs)


# Every shape through the legacy exporter; the dynamo one (seconds per export) on the 2-layer ones.
LOOPS = [(1, False, False), (2, False, False), (1, True, False), (2, True, False), (2, False, True),
         (2, True, True)]


@pytest.mark.parametrize("layers,bidirectional,dynamo", LOOPS)
def test_unrolled_loop(dynamo, layers, bidirectional):
    module = _randomize(Loop(layers, bidirectional), 5)
    proto = _export(module, (torch.randn(T_EXPORT, 1, I),), dynamo, names=["x"])
    cand, model, options = _recover(proto, "unrolled")
    D = 2 if bidirectional else 1
    assert (cand.input_size, cand.hidden_size, cand.num_layers, cand.num_directions) == (I, H, layers, D)
    assert options["source"]["steps"] == T_EXPORT and options["source"]["inputs"]["X"] == "x"
    # The recovered LSTM runs any length: STEPS steps against the same torch loop.
    x = torch.randn(STEPS, 1, I, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, h, c = module(x)
    y2, (h2, c2) = model.run(x.numpy())
    np.testing.assert_allclose(y2, y.numpy(), rtol=RTOL, atol=ATOL, err_msg="y")
    np.testing.assert_allclose(h2, h.numpy(), rtol=RTOL, atol=ATOL, err_msg="h_n")
    np.testing.assert_allclose(c2, c.numpy(), rtol=RTOL, atol=ATOL, err_msg="c_n")
    if not bidirectional:  # and as a stream, one step per call
        s = model.stream()
        ys = np.stack([s.step(x[t, 0].numpy()) for t in range(STEPS)])
        np.testing.assert_allclose(ys, y[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="streamed y")
        np.testing.assert_allclose(s.state[1], c[:, 0].numpy(), rtol=RTOL, atol=ATOL, err_msg="streamed c_n")


def test_unrolled_loop_with_dynamic_batch():
    """A dynamic batch axis: the zero state is ConstantOfShape(Shape(x)...), zeros shaped at run
    time; recovered as a zero initial state, and the model runs any batch."""
    module = _randomize(Loop(2, True), 13)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(T_EXPORT, 2, I),), buf, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {1: "N"}})
    proto = onnx.load_from_string(buf.getvalue())
    cand, model, options = _recover(proto, "unrolled")
    assert (cand.num_layers, cand.num_directions) == (2, 2) and options["initial_state"] is None
    # node= may name any of its 2 x 2 x T cells: the candidate's name and its aliases
    (found,) = find_cells(proto, None, "<test>")
    names = {found.candidate.name, *found.aliases}
    assert len(names) == 4 * T_EXPORT and names == set(options["source"]["nodes"])
    x = torch.randn(STEPS, 3, I, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y, h, c = module(x)
    y2, (h2, c2) = model.run(x.numpy())
    np.testing.assert_allclose(y2, y.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h2, h.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(c2, c.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_unrolled_loop_with_state_inputs(dynamo):
    """(h0, c0) are graph inputs: recorded as inputs, passed to ``run`` by the caller."""
    module = _randomize(Loop(2, False), 6)
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(T_EXPORT, 1, I, generator=g), torch.randn(2, 1, H, generator=g),
            torch.randn(2, 1, H, generator=g))
    proto = _export(module, args, dynamo, names=["x", "h0", "c0"])
    cand, model, options = _recover(proto, "unrolled")
    assert cand.num_layers == 2 and options["initial_state"] is None
    src = options["source"]["inputs"]  # row j of h0 / c0 feeds layer j: what run(x, state) expects
    assert (src["initial_h"], src["initial_c"]) == (["h0[0]", "h0[1]"], ["c0[0]", "c0[1]"])
    x = torch.randn(STEPS, 1, I, generator=g)
    with torch.no_grad():
        y, h, c = module(x, args[1], args[2])
    y2, (h2, c2) = model.run(x.numpy(), (args[1].numpy(), args[2].numpy()))
    np.testing.assert_allclose(y2, y.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(h2, h.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(c2, c.numpy(), rtol=RTOL, atol=ATOL)


def test_unrolled_loop_with_constant_nonzero_state():
    """A constant non-zero initial state is folded into step 0 by the exporter: recovered as
    the model's initial state (h0 solved from the bias difference, c0 read)."""
    module = _randomize(Loop(1, False), 7)
    g = torch.Generator().manual_seed(4)
    h0, c0 = torch.randn(1, 1, H, generator=g), torch.randn(1, 1, H, generator=g)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x, h0, c0)

    proto = _export(Fixed(), (torch.randn(T_EXPORT, 1, I),), False, names=["x"])
    _, model, options = _recover(proto, "unrolled")
    assert options["initial_state"] is not None
    x = torch.randn(STEPS, 1, I, generator=g)
    with torch.no_grad():
        y, h, c = module(x, h0, c0)
    y2, (h2, c2) = model.run(x.numpy())
    np.testing.assert_allclose(y2, y.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c2, c.numpy(), rtol=1e-4, atol=1e-5)


def test_unrolled_backwards_loop_is_a_reverse_model():
    """One direction reading x from the last step to the first: a ``reverse=True`` model."""

    class Backwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = torch.nn.LSTMCell(I, H)

        def forward(self, x):
            h = c = torch.zeros(1, H)
            ys = [None] * x.shape[0]
            for t in range(x.shape[0] - 1, -1, -1):
                h, c = self.cell(x[t], (h, c))
                ys[t] = h
            return torch.stack(ys), h, c

    module = _randomize(Backwards(), 11)
    cand, model, options = _recover(_export(module, (torch.randn(T_EXPORT, 1, I),), False), "unrolled")
    assert options["reverse"] and "(reverse)" in cand.location
    x = torch.randn(STEPS, 1, I, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y, h, c = module(x)
    y2, (h2, c2) = model.run(x.numpy())
    np.testing.assert_allclose(y2, y.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(c2[0], c.numpy(), rtol=RTOL, atol=ATOL)


def test_unrolled_weights_not_shared_is_refused():
    """A different LSTMCell per step is not one LSTM: refused, naming the step."""

    class Unshared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cells = torch.nn.ModuleList([torch.nn.LSTMCell(I, H) for _ in range(3)])

        def forward(self, x):
            h = c = torch.zeros(1, H)
            for t in range(3):
                h, c = self.cells[t](x[t], (h, c))
            return h, c

    proto = _export(_randomize(Unshared(), 8), (torch.randn(3, 1, I),), False)
    with pytest.raises(UnsupportedModelError, match=r"step \d .*(differ|not shared)"):
        find_cells(proto, None, "<test>")


# ---------------------------------------------------------------------------------------------
# Hand-built graphs: refusals, and a naive-reference check of the structure reading
# ---------------------------------------------------------------------------------------------
F = TensorProto.FLOAT


def _cell_graph(rng, variant="ok", order="oifg"):
    """x (1, I), h (1, H), c (1, H) -> h_new, c_new: Concat -> Gemm(transB) -> Split in ``order``.

    Returns (model, canonical LayerParams). Variants break one thing each.
    """
    W = rng.uniform(-0.6, 0.6, (4 * H, I + H)).astype(np.float32)  # (4H, I+H), blocks in ``order``
    b = rng.uniform(-0.6, 0.6, 4 * H).astype(np.float32)
    blk = {g: slice(k * H, (k + 1) * H) for k, g in enumerate(order)}
    canon = LayerParams(w_ih=np.concatenate([W[blk[g], :I] for g in "ifgo"]),
                        w_hh=np.concatenate([W[blk[g], I:] for g in "ifgo"]),
                        bias=np.concatenate([b[blk[g]] for g in "ifgo"]))
    n = helper.make_node
    nodes = [n("Concat", ["x", "h"], ["xh"], axis=1),
             n("Gemm", ["xh", "W", "b"], ["z"], transB=1),
             n("Split", ["z"], [f"a_{g}" for g in order], axis=1, num_outputs=4)]
    g_act = "Relu" if variant == "relu_g" else "Tanh"
    h_act = "Relu" if variant == "relu_h" else "Tanh"
    c_in = "c"
    if variant == "scaled_c":  # the state is scaled before the cell reads it
        nodes.append(n("Mul", ["c", "two"], ["c2"]))
        c_in = "c2"
    a_f = "a_f"
    if variant == "peephole":  # the forget gate reads the old c
        nodes.append(n("Add", ["a_f", "c"], ["a_fp"]))
        a_f = "a_fp"
    nodes += [n("Sigmoid", ["a_i"], ["s_i"]), n("Sigmoid", [a_f], ["s_f"]), n("Sigmoid", ["a_o"], ["s_o"]),
              n(g_act, ["a_g"], ["t_g"]),
              n("Mul", ["s_f", c_in], ["fc"]), n("Mul", ["s_i", "t_g"], ["ig"]), n("Add", ["fc", "ig"], ["c_new"]),
              n(h_act, ["c_new"], ["t_c"]), n("Mul", ["s_o", "t_c"], ["h_cell"])]
    h_out = "h_cell"
    if variant == "scaled_h":  # an extra scale between the cell's h and the graph output
        nodes.append(n("Mul", ["h_cell", "two"], ["h_new"]))
        h_out = "h_new"
    graph = helper.make_graph(
        nodes, "cell",
        [helper.make_tensor_value_info(v, F, [1, k]) for v, k in (("x", I), ("h", H), ("c", H))],
        [helper.make_tensor_value_info(h_out, F, [1, H]), helper.make_tensor_value_info("c_new", F, [1, H])],
        initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(np.float32(2.0), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), canon


@pytest.mark.parametrize("order", ["oifg", "gfoi"])
def test_hand_built_cell_matches_naive_reference(rng, order):
    """The structure reading alone, against tests/naive.py with the weights written down."""
    proto, canon = _cell_graph(rng, order=order)
    (found,) = find_cells(proto, None, "<test>")
    (layer,), = found.build()[0]
    np.testing.assert_array_equal(layer.w_ih, canon.w_ih)
    np.testing.assert_array_equal(layer.w_hh, canon.w_hh)
    x, h, c = rng.standard_normal(I), rng.standard_normal(H), rng.standard_normal(H)
    s = lstm_cpu.LSTMModel(found.build()[0], dtype=np.float64).stream()
    s.state = (h[None], c[None])
    for t in range(STEPS):
        h, c = naive.cell(canon, x * np.sin(t), h, c)
        y = s.step(x * np.sin(t))
        np.testing.assert_allclose(y, h, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.state[1][0], c, rtol=1e-9, atol=1e-12)


def _linear_styles_graph(rng, order, style):
    """The same cell with its linear part written the other ways exporters and converters do.

    ``matmul``: weights on the left of a MatMul through Transposes for x, on the right (a
    Transpose node of an initializer, folded) for h, biases as separate Adds, gates by Slice.
    ``gemm_scaled``: Gemm(transA=1 on a transposed input, alpha, beta) with the bias in C.
    """
    Wx = rng.uniform(-0.6, 0.6, (4 * H, I)).astype(np.float32)  # (4H, I), blocks in ``order``
    Wh = rng.uniform(-0.6, 0.6, (4 * H, H)).astype(np.float32)
    bx, bh = (rng.uniform(-0.6, 0.6, 4 * H).astype(np.float32) for _ in range(2))
    n = helper.make_node
    inits = {"Wx": Wx, "Wh": Wh, "bx": bx, "bh": bh}
    alpha, beta = 1.0, 1.0
    if style == "matmul":
        nodes = [n("Transpose", ["x"], ["xT"], perm=[1, 0]), n("MatMul", ["Wx", "xT"], ["zxT"]),
                 n("Transpose", ["zxT"], ["zx"], perm=[1, 0]), n("Add", ["zx", "bx"], ["zxb"]),
                 n("Transpose", ["Wh"], ["WhT"], perm=[1, 0]), n("MatMul", ["h", "WhT"], ["zh"]),
                 n("Add", ["bh", "zh"], ["zhb"]), n("Add", ["zxb", "zhb"], ["z"])]
        for k, g in enumerate(order):
            inits[f"s{g}"], inits[f"e{g}"] = np.array([k * H], np.int64), np.array([(k + 1) * H], np.int64)
            nodes.append(n("Slice", ["z", f"s{g}", f"e{g}", "ax"], [f"a_{g}"]))
        inits["ax"] = np.array([1], np.int64)
    else:
        alpha, beta = 0.5, 2.0
        inits["W"] = np.concatenate([Wx, Wh], axis=1) / alpha  # (4H, I+H)
        inits["b"] = (bx + bh) / beta
        nodes = [n("Concat", ["x", "h"], ["xh"], axis=1), n("Transpose", ["xh"], ["xhT"], perm=[1, 0]),
                 n("Gemm", ["xhT", "W", "b"], ["z"], transA=1, transB=1, alpha=alpha, beta=beta),
                 n("Split", ["z"], [f"a_{g}" for g in order], axis=1, num_outputs=4)]
    nodes += [n("Sigmoid", ["a_i"], ["s_i"]), n("Sigmoid", ["a_f"], ["s_f"]), n("Sigmoid", ["a_o"], ["s_o"]),
              n("Tanh", ["a_g"], ["t_g"]), n("Mul", ["c", "s_f"], ["fc"]), n("Mul", ["t_g", "s_i"], ["ig"]),
              n("Add", ["ig", "fc"], ["c_new"]), n("Tanh", ["c_new"], ["t_c"]), n("Mul", ["t_c", "s_o"], ["h_new"])]
    graph = helper.make_graph(
        nodes, "cell", [helper.make_tensor_value_info(v, F, [1, k]) for v, k in (("x", I), ("h", H), ("c", H))],
        [helper.make_tensor_value_info("h_new", F, [1, H]), helper.make_tensor_value_info("c_new", F, [1, H])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    blk = {g: slice(k * H, (k + 1) * H) for k, g in enumerate(order)}
    canon = LayerParams(w_ih=np.concatenate([Wx[blk[g]] for g in "ifgo"]),
                        w_hh=np.concatenate([Wh[blk[g]] for g in "ifgo"]),
                        bias=np.concatenate([(bx + bh)[blk[g]] for g in "ifgo"]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), canon


@pytest.mark.parametrize("style,order", [("matmul", "giof"), ("gemm_scaled", "fogi")])
def test_linear_part_written_other_ways(rng, style, order):
    """MatMul with weights on either side, Transposes, folded constant subgraphs, separate bias
    Adds, Slice gates, Gemm transA/alpha/beta: same weights, and the stream matches naive."""
    proto, canon = _linear_styles_graph(rng, order, style)
    (found,) = find_cells(proto, None, "<test>")
    (layer,), = found.build()[0]
    np.testing.assert_allclose(layer.w_ih, canon.w_ih, rtol=1e-6)
    np.testing.assert_allclose(layer.w_hh, canon.w_hh, rtol=1e-6)
    np.testing.assert_allclose(layer.bias, canon.bias, rtol=1e-6, atol=1e-7)
    s = lstm_cpu.LSTMModel(found.build()[0], dtype=np.float64).stream()
    h, c = rng.standard_normal(H), rng.standard_normal(H)
    s.state = (h[None], c[None])
    for t in range(STEPS):
        x = rng.standard_normal(I)
        h, c = naive.cell(canon, x, h, c)  # the weights as written down, float32 -> float64
        np.testing.assert_allclose(s.step(x), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.state[1][0], c, rtol=1e-5, atol=1e-6)


def test_float16_cell(rng):
    """A cell converted to float16 (weights, inputs, outputs): the weights are read as their
    float16 values; the self-check runs the graph in float16 at a float16 tolerance."""
    proto, canon = _cell_graph(rng)
    for t in proto.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16), t.name))
    for vi in list(proto.graph.input) + list(proto.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    (found,) = find_cells(proto, None, "<test>")
    (layer,), = found.build()[0]
    half = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(layer.w_ih, half(canon.w_ih))
    np.testing.assert_array_equal(layer.w_hh, half(canon.w_hh))


@pytest.mark.parametrize("variant,reason", [
    ("relu_g", r"cell candidate g goes through Relu.*expected Tanh"),
    ("relu_h", r"output activation of c goes through Relu.*expected Tanh"),
    ("scaled_h", r"new h 'h_cell' does not reach a graph output unchanged"),
    ("scaled_c", r"old cell state 'c2' is computed by Mul node.*not a graph input"),
    ("peephole", r"reads the old cell state 'c'"),
])
def test_cell_like_graph_that_is_not_an_lstm_is_refused(rng, variant, reason):
    proto, _ = _cell_graph(rng, variant)
    with pytest.raises(UnsupportedModelError, match=reason):
        find_cells(proto, None, "<test>")


def test_self_check_refuses_a_wrong_recovery(monkeypatch):
    """If the weight reading were wrong (simulated: every MatMul/Gemm weight scaled by 1.01),
    the evaluation of the subgraph disagrees and the cell is refused, naming node and tensor."""
    module = _randomize(TorchCell(), 9)
    args = (torch.randn(1, I), torch.randn(1, H), torch.randn(1, H))
    proto = _export(module, args, False, names=["x", "h", "c"])
    right = onnx_cells_affine.Term.right
    monkeypatch.setattr(onnx_cells_affine.Term, "right", lambda self, B: right(self, B * 1.01))
    with pytest.raises(UnsupportedModelError, match=r"node '.*': the recovered LSTM does not reproduce "
                                                    r"the graph: '.*' \(layer 0, direction 0, step 0\) differs by up to"):
        find_cells(proto, None, "<test>")


def test_self_check_without_onnxruntime(monkeypatch, rng):
    """onnxruntime is optional: the check then runs onnx's ReferenceEvaluator, and still
    catches a wrong recovery."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    proto, canon = _cell_graph(rng)
    (found,) = find_cells(proto, None, "<test>")
    np.testing.assert_array_equal(found.build()[0][0][0].w_hh, canon.w_hh)
    right = onnx_cells_affine.Term.right
    monkeypatch.setattr(onnx_cells_affine.Term, "right", lambda self, B: right(self, B * 1.01))
    with pytest.raises(UnsupportedModelError, match="does not reproduce the graph"):
        find_cells(proto, None, "<test>")


def test_no_cell_no_candidate(rng):
    """A graph without the skeleton gives nothing (and no error)."""
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F, [1, 3])],
                              [helper.make_tensor_value_info("y", F, [1, 3])])
    assert find_cells(helper.make_model(graph), None, "<test>") == []


def test_state_cycle_is_refused_not_hung(rng):
    """Invalid ONNX with the cell state feeding itself: a typed error, promptly."""
    proto, _ = _cell_graph(rng)
    for node in proto.graph.node:
        if node.op_type == "Mul" and "c" in node.input:
            node.input[list(node.input).index("c")] = "c_new"
    with pytest.raises(LSTMError, match="cycle"):
        find_cells(proto, None, "<test>")


def test_node_cap(monkeypatch, rng):
    """A graph over the cap is refused when it holds cells; one without cells still gives []."""
    proto, _ = _cell_graph(rng)
    monkeypatch.setattr(onnx_cells_graph, "MAX_NODES", 5)
    with pytest.raises(UnsupportedModelError, match="at most 5"):
        find_cells(proto, None, "<test>")
    for node in proto.graph.node:  # break the skeleton: no cell any more
        if node.op_type == "Add" and node.output[0] == "c_new":
            node.op_type = "Sub"
    assert find_cells(proto, None, "<test>") == []


# ---------------------------------------------------------------------------------------------
# Fuzz: mutated cell graphs give a verified model, nothing, or an LSTMError
# ---------------------------------------------------------------------------------------------
FUZZ_CASES = 120
_BINARY, _UNARY = ["Add", "Sub", "Mul", "Div"], ["Tanh", "Sigmoid", "Relu", "Identity", "Neg"]


def _mutate(rng, proto):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
    kind = str(rng.choice(["rewire", "rewire", "op", "op", "value", "dims", "attr", "delete", "dtype"]))
    node = g.node[int(rng.integers(len(g.node)))]
    if kind == "rewire" and node.input:
        node.input[int(rng.integers(len(node.input)))] = str(rng.choice(names))
    elif kind == "op" and node.op_type in _BINARY + _UNARY:
        node.op_type = str(rng.choice(_BINARY if node.op_type in _BINARY else _UNARY))
    elif kind in ("value", "dims", "dtype") and g.initializer:
        t = g.initializer[int(rng.integers(len(g.initializer)))]
        if kind == "value" and t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t).copy()
            a.flat[int(rng.integers(a.size))] *= float(rng.choice([0.0, -1.0, 1.5, np.nan]))
            t.CopyFrom(numpy_helper.from_array(a, t.name))
        elif kind == "dims" and t.dims:
            t.dims[int(rng.integers(len(t.dims)))] = int(rng.choice([0, 1, 2, 7, 2**40]))
        else:
            t.data_type = int(rng.choice([2, 7, 10, 16, 999]))
    elif kind == "attr" and node.attribute:
        a = node.attribute[int(rng.integers(len(node.attribute)))]
        if a.type == onnx.AttributeProto.INT:
            a.i = int(rng.choice([-2, -1, 0, 1, 2, 4]))
        elif a.type == onnx.AttributeProto.FLOAT:
            a.f = float(rng.choice([0.0, 0.5, -1.0, 2.0]))
    elif kind == "delete":
        g.node.remove(node)
    return m, f"{kind} at node {node.name or node.op_type!r}"


def _oracle_check(m, found) -> bool:
    """A returned cell must step like the mutated graph itself, run by onnxruntime (True when
    that comparison could be made)."""
    import onnxruntime as ort

    cand = found.candidate
    layers, options = found.build()
    model = lstm_cpu.LSTMModel(layers, **options)
    if cand.kind != "cell":
        return False
    ins, outs = options["source"]["inputs"], options["source"]["outputs"]
    if sorted(ins.values()) != sorted(i.name for i in m.graph.input):
        return False  # x is an inner tensor: the whole graph cannot be fed with it
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False  # the mutated graph is not runnable as a whole; the self-check ran its subgraph
    r = np.random.default_rng(0)
    x, h, c = r.standard_normal((1, cand.input_size)), r.standard_normal((1, H)), r.standard_normal((1, H))
    feeds = {}
    feeds.update({ins["x"]: x.astype(np.float32), ins["h"]: h.astype(np.float32), ins["c"]: c.astype(np.float32)})
    got = dict(zip([outs["h"], outs["c"]], sess.run([outs["h"], outs["c"]], feeds)))
    s = model.stream()
    s.state = (h, c)
    np.testing.assert_allclose(s.step(x[0]), got[outs["h"]].reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s.state[1][0], got[outs["c"]].reshape(-1), rtol=1e-4, atol=1e-5)
    return True


def test_fuzz_mutated_cells():
    rng = np.random.default_rng(20240611)
    seeds = [_cell_graph(rng)[0], _cell_graph(rng, order="gfoi")[0],
             _export(_randomize(Loop(1, True), 12), (torch.randn(3, 1, I),), False, names=["x"])]
    outcomes, checked = [], 0
    for case in range(FUZZ_CASES):
        seed = seeds[case % len(seeds)]
        m, what = _mutate(rng, seed)
        try:
            found = find_cells(m, None, "<fuzz>")
        except LSTMError as exc:
            outcomes.append(type(exc).__name__)
            continue
        except Exception as exc:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"case {case} ({what}): {type(exc).__name__} escaped: {exc}")
        outcomes.append(f"found {len(found)}")
        checked += sum(_oracle_check(m, f) for f in found)
    # The mutations must reach every outcome: refusals, and recoveries checked against onnxruntime.
    assert checked >= 10 and "UnsupportedModelError" in outcomes, (checked, Counter(outcomes))


def test_cells_are_found_by_inspect_and_load(tmp_path):
    """The cell finder is one of the ONNX importer's FINDERS: lstm_cpu.inspect lists the cell and
    lstm_cpu.load (by path, and by node=name) streams it like torch's nn.LSTMCell."""
    import torch

    import lstm_cpu

    torch.manual_seed(3)
    cell = torch.nn.LSTMCell(5, 7)
    path = tmp_path / "cell.onnx"
    torch.onnx.export(cell, (torch.randn(1, 5), (torch.zeros(1, 7), torch.zeros(1, 7))), str(path),
                      dynamo=False, input_names=["x", "h", "c"])
    (cand,) = lstm_cpu.inspect(path)
    assert (cand.kind, cand.input_size, cand.hidden_size) == ("cell", 5, 7)
    xs = torch.randn(50, 5)
    h, c = torch.zeros(1, 7), torch.zeros(1, 7)
    want = []
    with torch.no_grad():
        for t in range(50):
            h, c = cell(xs[t:t + 1], (h, c))
            want.append(h[0].numpy())
    for m in (lstm_cpu.load(path), lstm_cpu.load(path, node=cand.name)):
        s = m.stream()
        got = np.stack([s.step(xs[t].numpy()) for t in range(50)])
        np.testing.assert_allclose(got, np.stack(want), atol=2e-6, rtol=0)
        np.testing.assert_allclose(s.state[1][0], c[0].numpy(), atol=2e-6, rtol=0)
