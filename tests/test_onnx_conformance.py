"""ONNX's own LSTM conformance cases (onnx.backend.test.case.node, op_type "LSTM") through lstm-cpu.

The node tests feed W, R, B and P as graph inputs; lstm-cpu needs constant weights, so they are
bound as initializers with the case's data. X / initial_h / initial_c / sequence_lens stay inputs
and become ``model.run(x, state, lengths)`` arguments (transposed for ``layout=1``). Each case is
also checked at the parameter level (``onnx_to_params`` -> tests/naive.py).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import helper, numpy_helper  # noqa: E402

from lstm_cpu.importers.onnx_lstm import load_onnx, onnx_to_params  # noqa: E402

try:
    from tests import onnx_helpers as oh
except ImportError:  # tests/ itself on sys.path
    import onnx_helpers as oh

ATOL = RTOL = 1e-5

#: The cases onnx 1.23 ships; test_every_collected_case_is_covered notices new ones.
CASE_NAMES = [
    "test_lstm_defaults",
    "test_lstm_with_initial_bias",
    "test_lstm_with_peepholes",
    "test_lstm_batchwise",
    "test_lstm_reverse",
    "test_lstm_bidirectional",
]
_WEIGHT_POSITIONS = (1, 2, 3, 7)  # W, R, B, P


@pytest.fixture(scope="module")
def cases():
    """name -> TestCase. collect_testcases runs every node exporter (~15 s), so once per module."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other ops' exporters overflow casts on purpose
        return {c.name: c for c in collect_testcases("LSTM")}


def test_every_collected_case_is_covered(cases):
    assert sorted(cases) == sorted(CASE_NAMES), "onnx ships new LSTM cases: add them to CASE_NAMES"


def bind_weights(model, inputs):
    """Copy of ``model`` with the LSTM's W/R/B/P graph inputs turned into initializers.

    inputs: the case's input arrays, in graph-input order. Returns (model, remaining feeds dict).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    (node,) = [n for n in m.graph.node if n.op_type == "LSTM"]
    weight_names = {node.input[k] for k in _WEIGHT_POSITIONS if len(node.input) > k and node.input[k]}
    feeds = {}
    keep = []
    for vi, arr in zip(list(m.graph.input), inputs):
        if vi.name in weight_names:
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), vi.name))
        else:
            keep.append(vi)
            feeds[vi.name] = np.asarray(arr)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m, node, feeds


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@pytest.mark.parametrize("name", CASE_NAMES)
def test_conformance_case(cases, name):
    case = cases[name]
    ((inputs, expected),) = case.data_sets
    model, node, feeds = bind_weights(case.model, inputs)
    layout = _attr(node, "layout", 0)
    tm = (lambda a: np.transpose(a, (1, 0, 2))) if layout else (lambda a: a)  # noqa: E731

    x = tm(feeds[node.input[0]]).astype(np.float32)  # (T, N, I)
    opt_in = lambda k: feeds.get(node.input[k]) if len(node.input) > k and node.input[k] else None  # noqa: E731
    lengths = opt_in(4)
    h0, c0 = opt_in(5), opt_in(6)
    state = None
    if h0 is not None or c0 is not None:
        D = 2 if _attr(node, "direction", b"forward") == b"bidirectional" else 1
        Hs = _attr(node, "hidden_size", None)
        N = x.shape[1]
        h0 = np.zeros((D, N, Hs), np.float32) if h0 is None else tm(h0)
        c0 = np.zeros((D, N, Hs), np.float32) if c0 is None else tm(c0)
        state = (h0.astype(np.float32), c0.astype(np.float32))

    # The expected outputs name node outputs in order, skipping the empty ones.
    outs = dict(zip([o for o in node.output if o], expected))
    names = dict(zip(("Y", "Y_h", "Y_c"), list(node.output) + ["", "", ""]))
    want = {}
    if names["Y"] in outs:
        Y = outs[names["Y"]]
        want["y"] = oh.y_to_time_major(np.transpose(Y, (1, 2, 0, 3)) if layout else Y)
    if names["Y_h"] in outs:
        want["h"] = tm(outs[names["Y_h"]])
    if names["Y_c"] in outs:
        want["c"] = tm(outs[names["Y_c"]])
    assert want, "the case checks no output"

    def compare(got, who):
        for k, v in want.items():
            np.testing.assert_allclose(np.asarray(got[k], np.float64), v, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name}: {who} {k}")

    # 1. importer semantics: canonical params through the float64 reference
    layers, opt = onnx_to_params(model)
    y, (h, c) = oh.naive_single(layers[0], x, None if state is None else state[0],
                                None if state is None else state[1], opt["clip"], opt["input_forget"],
                                lengths, reverse=opt["reverse"])
    compare({"y": y, "h": h, "c": c}, "naive(onnx_to_params)")

    # 2. the runtime model
    m = load_onnx(model)
    assert m.reverse == opt["reverse"]
    y, (h, c) = m.run(x, state, lengths)
    compare({"y": y, "h": h, "c": c}, "LSTMModel.run")
