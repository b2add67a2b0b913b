"""lstm_cpu.bench.runners and models: the peers run our weights, fed through known names, with
their threads pinned while timed; checked against the peers themselves and by hand."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu import LSTMModel
from lstm_cpu.bench import BenchConfig, run_bench
from lstm_cpu.bench.models import describe_model, embedded_layers, float32_layers, matmul_flops
from lstm_cpu.bench.runners import PeerUnavailable
from lstm_cpu.bench.runners.base import initial_state
from lstm_cpu.spec import LayerParams

I, H, L = 3, 5, 2


def _model(initial=True, **kw):
    rng = np.random.default_rng(7)
    init = None
    if initial:  # (h0 (L, H), c0 (L, H)): a non-zero start the peers must be fed
        init = (rng.uniform(-1, 1, (L, H)).astype(np.float32),
                rng.uniform(-1, 1, (L, H)).astype(np.float32))
    return LSTMModel(embedded_layers(I, H, L, seed=3), initial_state=init, **kw)


def _xs(T=6, B=2):
    return np.random.default_rng(11).uniform(-1, 1, (T, B, I)).astype(np.float32)  # (T, B, I)


def _ours(model, xs):
    """Our outputs for xs (T, B, I) through a batched stream: (T, B, out)."""
    s = model.stream(batch=xs.shape[1])
    return np.stack([np.array(s.step(x), copy=True) for x in xs])


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def test_matmul_flops_and_describe_by_hand():
    rng = np.random.default_rng(0)
    head = (rng.standard_normal((2, H)).astype(np.float32), np.zeros(2, np.float32))
    m = LSTMModel(embedded_layers(I, H, L), head=head)
    # Per step: layer 0 (4H, I + H), layer 1 (4H, H + H), head (2, H); 2 flops per weight.
    assert matmul_flops(m, float32_layers(m)) == 2 * (4 * H * (I + H) + 4 * H * 2 * H + 2 * H)
    d = describe_model(m, "test")
    assert (d["input_size"], d["hidden_size"], d["num_layers"], d["output_size"]) == (I, H, L, 2)
    n_params = 4 * H * (I + H + 1) + 4 * H * (2 * H + 1) + 2 * (H + 1)
    assert d["parameter_count"] == n_params and d["source"] == "test"
    assert d["weight_bytes"] >= 4 * n_params


def test_initial_state_is_the_models_batch_expanded():
    m = _model()
    h0, c0 = initial_state(m, 3)
    assert h0.shape == (L, 3, H) and c0.shape == (L, 3, H)
    for b in range(3):
        assert np.array_equal(h0[:, b], m.initial_state[0])
        assert np.array_equal(c0[:, b], m.initial_state[1])
    z = initial_state(_model(initial=False), 1)
    assert not z[0].any() and not z[1].any()


# ---------------------------------------------------------------------------------------------
# The exported graph: names from onnx_export, state split per layer
# ---------------------------------------------------------------------------------------------
def test_exported_graph_names_are_the_graphs():
    onnx = pytest.importorskip("onnx")
    from lstm_cpu.bench.runners.onnx_graph import ExportedGraph

    g = ExportedGraph(_model())
    proto = onnx.load_from_string(g.onnx_bytes)
    assert [i.name for i in proto.graph.input] == [g.x_name] + [
        n for hc in zip(g.h_names, g.c_names) for n in hc]
    assert [o.name for o in proto.graph.output] == g.output_names
    xs = _xs()
    f = g.feeds(xs)
    h0, c0 = initial_state(g.model, xs.shape[1])
    for l in range(L):
        assert np.array_equal(f[g.h_names[l]], h0[l : l + 1])  # (D=1, B, H)
        assert np.array_equal(f[g.c_names[l]], c0[l : l + 1])


def test_a_model_onnx_cannot_express_is_a_clear_skip():
    pytest.importorskip("onnx")
    from lstm_cpu.bench.runners.onnx_graph import ExportedGraph

    rng = np.random.default_rng(0)
    P = 2
    p = LayerParams(rng.standard_normal((4 * H, I)), rng.standard_normal((4 * H, P)),
                    rng.standard_normal(4 * H), w_hr=rng.standard_normal((P, H)))
    with pytest.raises(PeerUnavailable, match="projection"):
        ExportedGraph(LSTMModel([[p]]))


# ---------------------------------------------------------------------------------------------
# Peers against ours, from a non-zero initial state, with the state fed back
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["streams", "sequence"])
def test_onnxruntime_runner_matches_ours(mode):
    pytest.importorskip("onnxruntime")
    from lstm_cpu.bench.runners.onnx_graph import ExportedGraph
    from lstm_cpu.bench.runners.onnxruntime import OnnxRuntimeRunner

    m, xs = _model(), _xs()
    cfg = BenchConfig(mode=mode, batch=2, seq_len=xs.shape[0]).resolved()
    got = OnnxRuntimeRunner(cfg, ExportedGraph(m)).outputs(xs)
    ref = _ours(m, xs) if mode == "streams" else m.run(xs)[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["streams", "sequence"])
def test_openvino_runner_computes_float32(mode):
    """OpenVINO's CPU default is bfloat16 on avx512_bf16/AMX hosts (~1e-3 off): pinned to f32."""
    pytest.importorskip("openvino")
    from lstm_cpu.bench.runners.onnx_graph import ExportedGraph
    from lstm_cpu.bench.runners.openvino import OpenVINORunner

    m, xs = _model(), _xs()
    cfg = BenchConfig(mode=mode, batch=2, seq_len=xs.shape[0]).resolved()
    shape = xs.shape if mode == "sequence" else (1,) + xs.shape[1:]
    got = OpenVINORunner(cfg, ExportedGraph(m), shape).outputs(xs)
    ref = _ours(m, xs) if mode == "streams" else m.run(xs)[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_torch_runner_matches_ours_and_refuses_what_nn_lstm_lacks():
    pytest.importorskip("torch")
    from lstm_cpu.bench.runners.torch import TorchRunner

    m, xs = _model(), _xs()
    cfg = BenchConfig(mode="streams", batch=2).resolved()
    got = TorchRunner(m, float32_layers(m), cfg).outputs(xs)
    np.testing.assert_allclose(got, _ours(m, xs), atol=1e-5)
    clipped = _model(clip=0.5)
    with pytest.raises(PeerUnavailable, match="clip"):
        TorchRunner(clipped, float32_layers(clipped), cfg)


# ---------------------------------------------------------------------------------------------
# Threads pinned while timed, restored after
# ---------------------------------------------------------------------------------------------
def test_torch_threads_pinned_during_its_timing_and_restored(monkeypatch):
    torch = pytest.importorskip("torch")
    from lstm_cpu.bench.runners import torch as torch_runner

    seen = []
    real = torch_runner.TorchRunner.make_call

    def recording(self):
        call = real(self)

        def wrapped():
            seen.append(torch.get_num_threads())
            return call()

        return wrapped

    monkeypatch.setattr(torch_runner.TorchRunner, "make_call", recording)
    before = torch.get_num_threads()
    host = 2 if before != 2 else 3  # a count the host chose, different from the bench's 1
    torch.set_num_threads(host)
    try:
        res = run_bench(BenchConfig(mode="step", steps=6, warmup=1, rounds=2, threads=1,
                                    size=(I, H, 1), compare=["torch"], membw_mb=0))
        assert res["checks"]["torch"]["ok"]
        assert seen and set(seen) == {1}, seen
        assert torch.get_num_threads() == host
    finally:
        torch.set_num_threads(before)


def test_onnxruntime_int8_peer_runs_dynamic_quantize_lstm():
    """The int8 peer is onnxruntime on quantize_dynamic of the same export: its graph holds
    DynamicQuantizeLSTM, it differs from the float peer (it really is quantized) by about the
    quantization error, and it stays within the check's reduced tolerance of our int8 model."""
    import onnx

    from lstm_cpu.bench.config import REDUCED_TOLERANCE
    from lstm_cpu.bench.runners.onnx_graph import ExportedGraph
    from lstm_cpu.bench.runners.onnxruntime import OnnxRuntimeInt8Runner, OnnxRuntimeRunner

    m, xs = _model(), _xs()
    cfg = BenchConfig(mode="streams", batch=2).resolved()
    graph = ExportedGraph(m)
    ops = {n.op_type for n in onnx.load_from_string(OnnxRuntimeInt8Runner._model_bytes(graph)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    q = OnnxRuntimeInt8Runner(cfg, graph).outputs(xs)
    f = OnnxRuntimeRunner(cfg, graph).outputs(xs)
    assert 0 < np.abs(q - f).max() < REDUCED_TOLERANCE
    ours_int8 = _ours(m.with_weights("int8"), xs)
    assert np.abs(q - ours_int8).max() < REDUCED_TOLERANCE


def test_bench_config_checks_the_weights_format():
    from lstm_cpu import LSTMError

    assert BenchConfig(weights="int8").resolved().weights == "int8"
    with pytest.raises(LSTMError):
        BenchConfig(weights="int4").resolved()
