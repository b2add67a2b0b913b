"""Reduced weights in the engine: ``weights=`` on LSTMModel / load / from_torch, the packed
format keeping int8 and bfloat16 gate matrices, ``lstm-cpu convert --weights`` and ``info``.

References: tests/naive.py (float64) with the weights the reduced ones stand for, the float32
model itself, and onnxruntime for an imported DynamicQuantizeLSTM.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

import naive
import lstm_cpu
from lstm_cpu import LayerParams, LSTMModel, cli
from lstm_cpu import quant as Q
from lstm_cpu.errors import FormatError, InputError


def _layers(rng, I, H, L, scale=0.3):
    return [[LayerParams(rng.uniform(-scale, scale, (4 * H, I if l == 0 else H)),
                         rng.uniform(-scale, scale, (4 * H, H)), rng.uniform(-0.5, 0.5, 4 * H))]
            for l in range(L)]


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(11)
    layers = _layers(rng, 20, 48, 2)
    return {w: LSTMModel(layers, weights=w) for w in Q.FORMATS}


def test_weights_are_reported_with_the_conversion_error(models):
    assert models["float32"].weights == "float32" and models["float32"].weight_error is None
    for w in ("int8", "bfloat16"):
        m = models[w]
        info = m.info()
        assert m.weights == info["weights"] == w
        assert 0 < m.weight_error == info["weight_error"] < 2e-2
        assert m.weight_bytes < (0.3 if w == "int8" else 0.55) * models["float32"].weight_bytes
    assert models["bfloat16"].weight_error < models["int8"].weight_error


@pytest.mark.parametrize("w, tol", [("int8", 2e-4), ("bfloat16", 1e-4)])
def test_reduced_stream_follows_the_weights_it_stands_for(models, w, tol):
    m = models[w]
    xs = np.random.default_rng(1).standard_normal((60, m.input_size)).astype(np.float32)
    s = m.stream()
    ys = np.stack([s.step(x) for x in xs])
    ref, _ = naive.run(m.layer_params(), xs[:, None, :].astype(np.float64))
    assert np.abs(ys - ref[:, 0]).max() < tol
    # run, a chunk and batched streams run the same reduced kernels: the same bits
    y_run, _ = m.run(xs)
    np.testing.assert_array_equal(y_run, ys)
    s.reset()
    np.testing.assert_array_equal(s.run(xs), ys)
    sb = m.stream(batch=3)
    yb = np.stack([sb.step(np.repeat(x[None], 3, axis=0)) for x in xs])
    np.testing.assert_array_equal(yb[:, 1], ys)
    # "parallel" runs the float kernels over the same weights: no activation rounding
    y_f, _ = m.run(xs, kernel="parallel")
    assert np.abs(y_f - ref[:, 0]).max() < 1e-5
    # snapshots restore exactly
    s.reset()
    s.step(xs[0])
    snap = s.state
    a = s.step(xs[1])
    s.state = snap
    np.testing.assert_array_equal(s.step(xs[1]), a)


def test_bad_weights_requests(models):
    layers = models["float32"].layer_params()
    with pytest.raises(InputError, match="weights must be one of"):
        LSTMModel(layers, weights="int4")
    with pytest.raises(InputError, match="float32"):
        LSTMModel(layers, weights="int8", dtype=np.float64)


@pytest.mark.parametrize("w", ["int8", "bfloat16"])
@pytest.mark.parametrize("mmap", [False, True])
def test_packed_round_trip_keeps_the_reduced_weights(models, tmp_path, w, mmap):
    m = models[w]
    path = tmp_path / f"{w}.lstm"
    m.save(path)
    back = lstm_cpu.load(path, mmap=mmap)
    assert back.weights == w and back.weight_error == m.weight_error
    xs = np.random.default_rng(2).standard_normal((30, m.input_size)).astype(np.float32)
    s1, s2 = m.stream(), back.stream()
    for x in xs:
        np.testing.assert_array_equal(s1.step(x), s2.step(x))
    np.testing.assert_array_equal(back.run(xs)[0], m.run(xs)[0])


def test_int8_file_is_under_three_tenths(tmp_path):
    m = LSTMModel(_layers(np.random.default_rng(3), 64, 128, 2))
    m.save(tmp_path / "f.lstm")
    m.with_weights("int8").save(tmp_path / "q.lstm")
    m.with_weights("bfloat16").save(tmp_path / "b.lstm")
    f = os.path.getsize(tmp_path / "f.lstm")
    assert os.path.getsize(tmp_path / "q.lstm") <= 0.3 * f
    assert os.path.getsize(tmp_path / "b.lstm") <= 0.55 * f


@pytest.mark.parametrize("what", ["zero scale", "bad shape"])
def test_hostile_reduced_files_are_refused(models, tmp_path, what):
    m = LSTMModel(models["float32"].layer_params(), weights="int8")
    q = m._reduced[1][0]
    if what == "zero scale":
        q.s_hh = q.s_hh.copy()
        q.s_hh[5] = 0.0
    else:
        q.w_ih = q.w_ih[:, :-1].copy()
    m.save(tmp_path / "bad.lstm")  # a well-formed, checksummed file with a bad tensor inside
    with pytest.raises(FormatError, match="scales|gates_ih_1_0"):
        lstm_cpu.load(tmp_path / "bad.lstm")


def test_truncated_reduced_file_is_refused(models, tmp_path):
    models["int8"].save(tmp_path / "q.lstm")
    data = (tmp_path / "q.lstm").read_bytes()
    (tmp_path / "t.lstm").write_bytes(data[:-100])
    with pytest.raises(FormatError):
        lstm_cpu.load(tmp_path / "t.lstm")


def test_load_and_from_torch_convert(tmp_path):
    import torch

    torch.manual_seed(0)
    t = torch.nn.LSTM(12, 32, num_layers=2)
    m8 = lstm_cpu.from_torch(t, weights="int8")
    assert m8.weights == "int8" and m8.weight_error > 0
    torch.save(t.state_dict(), tmp_path / "t.pt")
    assert lstm_cpu.load(tmp_path / "t.pt", weights="bfloat16").weights == "bfloat16"
    m8.save(tmp_path / "q.lstm")
    f = lstm_cpu.load(tmp_path / "q.lstm", weights="float32")
    assert f.weights == "float32"
    np.testing.assert_array_equal(f.layer_params()[0][0].w_ih, m8.layer_params()[0][0].w_ih)


def test_dynamic_quantize_lstm_file_stays_int8(tmp_path):
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import quantize_dynamic

    torch.manual_seed(0)
    t = torch.nn.LSTM(10, 16, num_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(t, (torch.zeros(20, 1, 10),), str(tmp_path / "f.onnx"), input_names=["x"],
                          dynamo=False)
        quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True)
    (cand,) = lstm_cpu.inspect(tmp_path / "q.onnx")  # the quantized finder: one 2-layer chain
    assert (cand.kind, cand.num_layers, cand.hidden_size) == ("quantized", 2, 16)
    m = lstm_cpu.load(tmp_path / "q.onnx")
    assert m.weights == "int8" and m.weight_error is None
    x = np.random.default_rng(5).standard_normal((20, 10)).astype(np.float32)
    y_ort = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[:, None, :]})[0]
    s = m.stream()
    ys = np.stack([s.step(xt) for xt in x])
    assert np.abs(ys - y_ort[:, 0]).max() < 5e-3  # onnxruntime's own activation rounding
    assert lstm_cpu.load(tmp_path / "q.onnx", weights="float32").weights == "float32"


def test_cli_convert_weights_and_info(models, tmp_path, capsys):
    models["float32"].save(tmp_path / "f.lstm")
    assert cli.main(["convert", str(tmp_path / "f.lstm"), str(tmp_path / "q.lstm"), "--weights", "int8"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "q.lstm"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "int8" and 0 < info["weight_error"] < 2e-2
    assert cli.main(["info", str(tmp_path / "q.lstm")]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "max abs output vs float32" in out


def test_bidirectional_model_accepts_reduced_weights(tmp_path):
    """run goes through the reduced kernels, both directions (no stream: it needs run)."""
    rng = np.random.default_rng(7)
    layers = [[LayerParams(rng.uniform(-0.3, 0.3, (64, 6)), rng.uniform(-0.3, 0.3, (64, 16)),
                           rng.uniform(-0.5, 0.5, 64)) for _ in range(2)]]
    m = LSTMModel(layers, weights="int8")
    assert m.weights == "int8" and not m._rstack.streamable and 0 < m.weight_error < 2e-2
    x = rng.standard_normal((25, 2, 6)).astype(np.float32)
    y, _ = m.run(x)
    ref, _ = naive.run(m.layer_params(), x.astype(np.float64))
    assert np.abs(y - ref).max() < 2e-4  # the per-step 16-bit activations
    assert np.abs(m.run(x, kernel="parallel")[0] - ref).max() < 1e-5  # the float kernels
    m.save(tmp_path / "b.lstm")
    np.testing.assert_array_equal(lstm_cpu.load(tmp_path / "b.lstm").run(x)[0], y)
