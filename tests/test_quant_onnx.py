"""DynamicQuantizeLSTM import (importers/onnx_quant.py) against onnxruntime, on models written
by ``onnxruntime.quantization.quantize_dynamic`` from torch exports (1-2 layers, one or two
directions, per-tensor and per-channel scales), and hostile variants of them.

onnxruntime quantizes activations per step (uint8) and we do not reproduce its rounding: its
outputs differ from the float64 run of the *same dequantized weights* by that rounding alone.
Measured here (H = 16, 20 steps): up to ~1e-3; the tests allow 5e-3, while a misread gate,
scale or direction gives errors of order 0.1.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization import quantize_dynamic

from conftest import torch_lstm
from lstm_cpu import LSTMModel
from lstm_cpu import kernels_quant as KQ
from lstm_cpu import quant as Q
from lstm_cpu.errors import FormatError, UnsupportedModelError
from lstm_cpu.importers.onnx_quant import read_quantized

I, H, T = 10, 16, 20
ORT_TOL = 5e-3


def _quantized(tmp_path, L, bidirectional, per_channel, seed=0):
    """(torch nn.LSTM, path of its quantize_dynamic'd ONNX export)."""
    m = torch_lstm(I, H, num_layers=L, bidirectional=bidirectional, seed=seed)
    f32, q8 = tmp_path / "f32.onnx", tmp_path / "q8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(T, 1, I),), str(f32), input_names=["x"], output_names=["y"],
                          dynamo=False)
        quantize_dynamic(str(f32), str(q8), per_channel=per_channel)
    ops = [n.op_type for n in onnx.load(str(q8)).graph.node]
    assert ops.count("DynamicQuantizeLSTM") == L
    return m, q8


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


CASES = [(1, False, False), (2, False, True), (1, True, True), (2, True, False)]


@pytest.mark.parametrize("L, bidi, per_channel", CASES)
def test_dequantized_weights_are_torch_weights_to_half_a_step(tmp_path, L, bidi, per_channel):
    m, path = _quantized(tmp_path, L, bidi, per_channel)
    qm = read_quantized(str(path))
    D = 2 if bidi else 1
    assert len(qm.layers) == L and all(len(row) == D for row in qm.layers)
    assert qm.source["per_channel"] == [per_channel] * L
    for l in range(L):
        for d in range(D):
            sfx = f"_l{l}" + ("_reverse" if d else "")
            q = qm.layers[l][d]
            for w, s, name in ((q.w_ih, q.s_ih, "weight_ih"), (q.w_hh, q.s_hh, "weight_hh")):
                ref = getattr(m, name + sfx).detach().double().numpy()  # (4H, in), gates i, f, g, o
                assert w.dtype == np.int8 and w.shape == ref.shape
                if not per_channel:
                    assert np.all(s == s[0])
                assert np.all(np.abs(s[:, None].astype(np.float64) * w - ref) <= 0.5 * s[:, None] * (1 + 1e-5))
            b = (getattr(m, "bias_ih" + sfx) + getattr(m, "bias_hh" + sfx)).detach().numpy()
            np.testing.assert_allclose(q.bias, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("L, bidi, per_channel", CASES)
def test_matches_onnxruntime_int8_to_its_activation_rounding(tmp_path, L, bidi, per_channel):
    _, path = _quantized(tmp_path, L, bidi, per_channel)
    x = np.random.default_rng(3).standard_normal((T, 1, I)).astype(np.float32)
    y_ort = _ort(path, x)  # (T, 1, D*H) after torch's Transpose/Reshape
    model = LSTMModel(read_quantized(str(path)).dequantized(), dtype=np.float64)
    y, _ = model.run(x)
    assert y_ort.shape == y.shape
    assert np.abs(y - y_ort).max() < ORT_TOL


def _int8_stack(qm):
    return [Q.pack_int8(q.w_ih, q.w_hh, q.s_ih, q.s_hh, q.bias) for q in (row[0] for row in qm.layers)]


@pytest.mark.parametrize("L", [1, 2])
def test_int8_kernels_run_the_imported_weights(tmp_path, L):
    """The node run in int8 by our kernels (16-bit activations; W and R keep their own scales)."""
    _, path = _quantized(tmp_path, L, False, True)
    qm = read_quantized(str(path))
    x = np.random.default_rng(4).standard_normal((T, 1, I)).astype(np.float32)
    ref, _ = LSTMModel(qm.dequantized(), dtype=np.float64).run(x)
    packed = _int8_stack(qm)
    kern = KQ.i8a16_vnni if KQ.has_vnni512() else KQ.i8a16_portable
    Hp = Q.padded_units(H)
    C = 4 * Hp
    K4 = max(int(p["qrows"][-1]) for p in packed)
    h, c = np.zeros((L, H), np.float32), np.zeros((L, Hp), np.float32)
    ys = []
    for t in range(T):
        KQ.i8a16_stack_step(kern, x[t, 0], tuple(p["Wq4"] for p in packed),
                            np.stack([p["krows"] for p in packed]), np.stack([p["qrows"] for p in packed]),
                            tuple(p["sw"] for p in packed), tuple(p["colsum"] for p in packed),
                            tuple(p["bias"] for p in packed), h, c, np.zeros(2 * H, np.float32),
                            np.full(4 * K4, 128, np.uint8), np.zeros(4 * K4, np.uint8),
                            np.zeros((2, C), np.int32), np.zeros((2, C), np.int32), np.zeros(C, np.float32))
        ys.append(h[-1].copy())
    ys = np.stack(ys)
    assert np.abs(ys - ref[:, 0]).max() < 2e-4  # our 16-bit activation rounding only
    assert np.abs(ys - _ort(path, x)[:, 0]).max() < ORT_TOL


def test_uint8_weights_with_zero_point_128_read_exactly(tmp_path):
    _, path = _quantized(tmp_path, 1, False, True)
    mp = onnx.load(str(path))
    node = next(n for n in mp.graph.node if n.op_type == "DynamicQuantizeLSTM")
    inits = {t.name: t for t in mp.graph.initializer}
    for k in (1, 2, 9, 11):  # W, R, W_zero_point, R_zero_point -> uint8 = int8 + 128
        t = inits[node.input[k]]
        t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t).astype(np.int16) + 128).astype(np.uint8), t.name))
    a, b = read_quantized(str(path)), read_quantized(mp.SerializeToString())
    assert b.source["weight_type"] == ["uint8"]
    np.testing.assert_array_equal(a.layers[0][0].w_ih, b.layers[0][0].w_ih)
    np.testing.assert_array_equal(a.layers[0][0].w_hh, b.layers[0][0].w_hh)


# ---------------------------------------------------------------------------------------------
# Hostile files
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_proto(tmp_path_factory):
    _, path = _quantized(tmp_path_factory.mktemp("q"), 1, True, True)
    return onnx.load(str(path))


def _edit(proto, k, fn):
    """A copy of proto with input k of its DynamicQuantizeLSTM node's initializer replaced by
    fn(array, tensor) (a new TensorProto, or None after editing the tensor in place)."""
    mp = copy.deepcopy(proto)
    node = next(n for n in mp.graph.node if n.op_type == "DynamicQuantizeLSTM")
    t = next(t for t in mp.graph.initializer if t.name == node.input[k])
    new = fn(numpy_helper.to_array(t), t)
    if new is not None:
        new.name = t.name
        t.CopyFrom(new)
    return mp.SerializeToString()


def _arr(a):
    return lambda _a, _t: numpy_helper.from_array(np.asarray(a))


@pytest.mark.parametrize("k, value, match", [
    (8, "zero", "scales must be > 0"),
    (10, "negative", "scales must be > 0"),
    (8, "nan", "NaN or Inf"),
    (10, "inf", "NaN or Inf"),
])
def test_bad_scales_are_refused(quant_proto, k, value, match):
    def fn(a, t):
        a = a.copy()
        a.flat[3] = {"zero": 0.0, "negative": -a.flat[3], "nan": np.nan, "inf": np.inf}[value]
        return numpy_helper.from_array(a)

    with pytest.raises(FormatError, match=match):
        read_quantized(_edit(quant_proto, k, fn))


def test_mismatched_scale_shapes_are_refused(quant_proto):
    D4H = (2, 4 * H)
    with pytest.raises(FormatError, match="W_scale has shape"):
        read_quantized(_edit(quant_proto, 8, _arr(np.ones((2, 4 * H + 1), np.float32))))
    with pytest.raises(FormatError, match="R_zero_point has shape"):  # per tensor vs per channel
        read_quantized(_edit(quant_proto, 11, _arr(np.zeros(2, np.int8))))
    with pytest.raises(FormatError, match="W_scale has shape"):
        read_quantized(_edit(quant_proto, 8, _arr(np.ones(D4H[::-1], np.float32))))


def test_truncated_and_mistyped_blobs_are_refused(quant_proto):
    def truncate(a, t):
        t.raw_data = t.raw_data[:-5]

    with pytest.raises(FormatError, match="raw_data"):
        read_quantized(_edit(quant_proto, 1, truncate))
    with pytest.raises(FormatError, match="int8 or uint8"):
        read_quantized(_edit(quant_proto, 2, lambda a, t: numpy_helper.from_array(a.astype(np.float32))))
    with pytest.raises(FormatError, match="zero_point is uint8"):
        read_quantized(_edit(quant_proto, 9, lambda a, t: numpy_helper.from_array(a.astype(np.uint8))))


def test_zero_point_that_leaves_int8_is_refused(quant_proto):
    with pytest.raises(UnsupportedModelError, match="outside int8"):
        read_quantized(_edit(quant_proto, 9, lambda a, t: numpy_helper.from_array(np.full_like(a, 100))))


def test_model_without_quantized_nodes(tmp_path):
    m = torch_lstm(I, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.zeros(T, 1, I),), str(tmp_path / "f.onnx"), dynamo=False)
    with pytest.raises(UnsupportedModelError, match="no com.microsoft DynamicQuantizeLSTM"):
        read_quantized(str(tmp_path / "f.onnx"))
