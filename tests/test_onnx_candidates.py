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
