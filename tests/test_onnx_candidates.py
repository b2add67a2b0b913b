"""lstm_cpu.inspect, ``lstm-cpu info FILE --all``, and load() with several candidates (issue #10).

Every candidate listed must load by its name and give torch's outputs: the listing is checked
against the files' real contents, not against itself.
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import lstm_cpu  # noqa: E402
from lstm_cpu.candidates import Candidate, format_table  # noqa: E402
from lstm_cpu.cli import main as cli_main  # noqa: E402
from lstm_cpu.errors import InputError  # noqa: E402

from test_onnx_constants import _compare_stream, _torch_lstm, _x, nested_if_model  # noqa: E402

I, H = 3, 5


class TwoLSTMs(torch.nn.Module):
    """An encoder (2 layers, bidirectional) and a decoder (1 layer): two candidates."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(30)
        self.enc = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
        self.dec = torch.nn.LSTM(2 * H, 4)

    def forward(self, x):
        y, _ = self.enc(x)
        z, _ = self.dec(y)
        return y, z


def _export_two(path):
    m = TwoLSTMs().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (_x(),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "T"}})
    return m


def test_inspect_onnx_lists_every_chain_and_each_loads(tmp_path):
    path = tmp_path / "two.onnx"
    m = _export_two(path)
    cands = lstm_cpu.inspect(path)
    assert all(isinstance(c, Candidate) and c.kind == "operator" for c in cands)
    sizes = sorted((c.input_size, c.hidden_size, c.num_layers, c.num_directions) for c in cands)
    assert sizes == [(I, H, 2, 2), (2 * H, 4, 1, 1)]
    for c in cands:
        assert c.location.startswith("main: LSTM ")
        model = lstm_cpu.load(path, node=c.name)
        assert (model.input_size, model.hidden_size, model.num_layers) == (c.input_size, c.hidden_size, c.num_layers)
    dec = next(c for c in cands if c.hidden_size == 4)
    x = _x(31)
    with torch.no_grad():
        y_enc, _ = m.enc(x)
    # the decoder alone, streamed over the encoder's outputs, as torch's decoder
    s = lstm_cpu.load(path, node=dec.name).stream()
    with torch.no_grad():
        z, _ = m.dec(y_enc)
    for t in range(x.shape[0]):
        np.testing.assert_allclose(s.step(y_enc[t, 0].numpy()), z[t, 0].numpy(), rtol=2e-5, atol=2e-5)


def test_load_with_several_candidates_lists_them_as_inspect_does(tmp_path):
    path = tmp_path / "two.onnx"
    _export_two(path)
    with pytest.raises(InputError) as ei:
        lstm_cpu.load(path)
    msg = str(ei.value)
    assert "2 independent LSTMs" in msg and "node=" in msg
    assert format_table(lstm_cpu.inspect(path)) in msg
    with pytest.raises(InputError, match=r"no LSTM node named 'nope'; candidates:\nname\s+kind"):
        lstm_cpu.load(path, node="nope")


def test_inspect_nested_if_branches_each_a_candidate(tmp_path):
    ms = [_torch_lstm(seed=s) for s in (11, 12, 13)]
    path = tmp_path / "if.onnx"
    path.write_bytes(nested_if_model(*ms).SerializeToString())
    cands = {c.name: c for c in lstm_cpu.inspect(path)}
    assert set(cands) == {"lstm_a", "lstm_b", "lstm_c"}
    assert "inner_if" in cands["lstm_a"].location and "then_branch" in cands["lstm_a"].location
    assert "outer_if" in cands["lstm_c"].location and "else_branch" in cands["lstm_c"].location
    for m, name in zip(ms, ("lstm_a", "lstm_b", "lstm_c")):
        _compare_stream(m, lstm_cpu.load(path, node=name), _x(32))


def test_node_names_any_node_of_a_chain(tmp_path):
    path = tmp_path / "two.onnx"
    _export_two(path)
    enc = next(c for c in lstm_cpu.inspect(path) if c.num_layers == 2)
    second = lstm_cpu.load(path, node=enc.name).info()["source"]["nodes"][1]
    assert second != enc.name
    assert lstm_cpu.load(path, node=second).info()["source"]["nodes"][0] == enc.name


def test_inspect_state_dicts_and_packed(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = TwoLSTMs()
    sd = {"module." + k: v for k, v in m.state_dict().items()}  # DataParallel keys
    torch.save(sd, tmp_path / "m.pt")
    st.save_file(dict(m.state_dict()), str(tmp_path / "m.safetensors"))
    for f in ("m.pt", "m.safetensors"):
        cands = {c.name: c for c in lstm_cpu.inspect(tmp_path / f)}
        assert set(cands) == {"enc.", "dec."}, f
        assert (cands["enc."].num_layers, cands["enc."].num_directions, cands["enc."].hidden_size) == (2, 2, H)
        assert (cands["dec."].input_size, cands["dec."].hidden_size) == (2 * H, 4)
        model = lstm_cpu.load(tmp_path / f, prefix=cands["dec."].name)
        assert model.hidden_size == 4
    packed = tmp_path / "m.lstm"
    lstm_cpu.load(tmp_path / "m.pt", prefix="enc.").save(str(packed))
    (c,) = lstm_cpu.inspect(packed)
    assert (c.input_size, c.hidden_size, c.num_layers, c.num_directions) == (I, H, 2, 2)


def test_cli_info_all(tmp_path, capsys):
    path = tmp_path / "two.onnx"
    _export_two(path)
    assert cli_main(["info", str(path), "--all"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_table(lstm_cpu.inspect(path))
    assert re.search(r"operator\s+10\s+4\s+1\s+1", out)
    assert cli_main(["info", str(path), "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["hidden_size"] for r in rows) == [4, H]


def test_identical_lstms_in_two_branches_are_one_candidate(tmp_path):
    """The same weights (outer-scope initializers) in both branches of an If: reported once,
    loadable by either node's name, and equal to torch."""
    from onnx import TensorProto, helper, numpy_helper

    from test_onnx_constants import _onnx_weights

    m = _torch_lstm(seed=40)
    W, R, B = _onnx_weights(m)
    yinfo = helper.make_tensor_value_info("Y_b", TensorProto.FLOAT, None)

    def branch(name):
        node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y_b"], name=name, hidden_size=H)
        return helper.make_graph([node], name + "_graph", [], [yinfo])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=branch("lstm_16k"),
                          else_branch=branch("lstm_8k"), name="rate")],
        "main", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", 1, I]),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a.astype(np.float32), n) for n, a in (("W", W), ("R", R), ("B", B))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    proto.ir_version = 8
    path = tmp_path / "same.onnx"
    path.write_bytes(proto.SerializeToString())
    (c,) = lstm_cpu.inspect(path)
    other = ({"lstm_16k", "lstm_8k"} - {c.name}).pop()
    assert c.name in ("lstm_16k", "lstm_8k") and f"LSTM {other!r} (same weights)" in c.location
    for name in ("lstm_16k", "lstm_8k", None):
        _compare_stream(m, lstm_cpu.load(path, node=name), _x(41))
    # different weights in the two branches stay two candidates
    next(a for a in proto.graph.node[0].attribute if a.name == "then_branch").g.node[0].input[1] = "W2"
    proto.graph.initializer.append(numpy_helper.from_array((W * 0.5).astype(np.float32), "W2"))
    path.write_bytes(proto.SerializeToString())
    assert len(lstm_cpu.inspect(path)) == 2


def test_inspect_onnx_imports_no_torch(tmp_path):
    """inspect imports nothing heavier than the importer needs: onnx, never torch."""
    import os
    import subprocess
    import sys

    path = tmp_path / "two.onnx"
    _export_two(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, lstm_cpu\n"
            f"c = lstm_cpu.inspect({str(path)!r})\n"
            "assert len(c) == 2, c\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('OK')\n")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-3000:]
