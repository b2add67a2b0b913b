"""lstm_cpu.importers.torchscript: TorchScript archives (torch.jit.save) read without running them.

Real archives are written here by torch.jit.script / torch.jit.trace + torch.jit.save, and torch
(the module that was saved) is the oracle: streamed outputs over >= 50 steps and the final state.
Hostile archives are written by hand (a tiny pickle-opcode writer below): code-running pickles
must be refused with FormatError with nothing run (a marker file is never created; a control
shows the same payload does create it under a normal unpickler), and corrupt records, storage
views past their record, and zip bombs must be refused before anything is allocated.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

import lstm_cpu
from lstm_cpu.errors import FormatError
from lstm_cpu.importers.torch_lstm import candidates, load_torch_file
from lstm_cpu.importers.torchscript import MAX_EXPANSION, load_torchscript, read_state
from lstm_cpu.loader import sniff

torch = pytest.importorskip("torch")  # the oracle and the writer of the archives: a test extra
nn = torch.nn

from conftest import torch_cell, torch_lstm  # noqa: E402

ATOL = 2e-5  # float32 against torch's float32, 60 steps of small LSTMs
STEPS = 60


# ---------------------------------------------------------------------------------------------
# Modules to script / trace (torch.jit.script needs their source: module level)
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, I, H, layers, bidirectional, seed):
        super().__init__()
        self.rnn = torch_lstm(I, H, num_layers=layers, bidirectional=bidirectional, seed=seed)

    def forward(self, x):
        y, _ = self.rnn(x)
        return y


class Net(nn.Module):
    """embed -> encoder.rnn (the LSTM) -> fc: the LSTM sits two attribute levels deep."""

    def __init__(self, I=5, H=6, layers=2, bidirectional=False, O=3, seed=0):
        super().__init__()
        torch.manual_seed(seed + 100)
        self.embed = nn.Linear(4, I)
        self.encoder = Encoder(I, H, layers, bidirectional, seed)
        self.fc = nn.Linear(H * (2 if bidirectional else 1), O)

    def forward(self, x):
        return self.fc(self.encoder(self.embed(x)))


class Vad(nn.Module):
    """Shaped like a voice-activity detector: convolutions, a BatchNorm (an int64 buffer), a
    ModuleList, a Sequential, a plain buffer, a list and a None attribute, and an LSTMCell."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.stft = nn.Conv1d(1, 8, 4)
        self.register_buffer("window", torch.hann_window(4))
        self.bn = nn.BatchNorm1d(8)
        self.blocks = nn.ModuleList([nn.Conv1d(8, 8, 1) for _ in range(2)])
        self.rnn = torch_cell(8, 8, seed=13)
        self.out = nn.Sequential(nn.ReLU(), nn.Conv1d(8, 1, 1), nn.Sigmoid())
        self.sample_rates = [8000, 16000]
        self.unused = None

    def forward(self, x, h, c):
        y = self.bn(self.stft(x))
        for b in self.blocks:
            y = b(y)
        h, c = self.rnn(y.mean(-1), (h, c))
        return self.out(h.unsqueeze(-1)), h, c


def _save(module, path, trace_input=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; the files it wrote remain
        sm = torch.jit.trace(module, trace_input) if trace_input is not None else torch.jit.script(module)
        torch.jit.save(sm, str(path))
    return path


def _x(T, I, seed=0):
    return np.random.default_rng(seed).standard_normal((T, I)).astype(np.float32)  # (T, I)


def _torch_lstm_head(net, x):
    """What the saved LSTM + fc compute on x (T, I) (the embed layer is not part of the LSTM):
    y (T, O), h (L*D, H), c (L*D, H)."""
    with torch.no_grad():
        y, (h, c) = net.encoder.rnn(torch.from_numpy(x)[:, None, :])  # (T, 1, D*H), (L*D, 1, H)
        return net.fc(y[:, 0]).numpy(), h[:, 0].numpy(), c[:, 0].numpy()


def _check_stream(model, net):
    """STEPS streamed steps and the state after them, against torch."""
    x = _x(STEPS, net.encoder.rnn.input_size)
    y_ref, h_ref, c_ref = _torch_lstm_head(net, x)
    s = model.stream()
    y = np.stack([s.step(x[t]) for t in range(STEPS)])  # (T, O)
    h, c = s.state  # (L, H) each
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(h, h_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(c, c_ref, atol=ATOL, rtol=0)


def _check_cell_stream(model, cell):
    """STEPS streamed steps of ``model`` against the torch ``nn.LSTMCell`` stepped by hand."""
    x = _x(STEPS, cell.input_size, seed=2)
    h = c = torch.zeros(1, cell.hidden_size)
    s = model.stream()
    with torch.no_grad():
        for t in range(STEPS):
            h, c = cell(torch.from_numpy(x[t:t + 1]), (h, c))
            np.testing.assert_allclose(s.step(x[t]), h[0].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(s.state[0][0], h[0].numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(s.state[1][0], c[0].numpy(), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Real archives
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_scripted_module_streams_like_torch(tmp_path, layers):
    net = Net(layers=layers, seed=layers).eval()
    path = _save(net, tmp_path / "net.jit")
    model = lstm_cpu.load(path, prefix="encoder.rnn", head="fc")
    assert model.info()["source"]["format"] == "torchscript"
    assert (model.input_size, model.hidden_size, model.num_layers, model.output_size) == (5, 6, layers, 3)
    _check_stream(model, net)


def test_traced_module_streams_like_torch(tmp_path):
    net = Net(layers=2, seed=5).eval()
    path = _save(net, tmp_path / "traced.pt", trace_input=torch.zeros(3, 1, 4))
    model = lstm_cpu.load(path, prefix="encoder.rnn.", head="fc")
    _check_stream(model, net)


@pytest.mark.parametrize("layers", [1, 2])
def test_bidirectional_scripted_module_runs_like_torch(tmp_path, layers):
    net = Net(layers=layers, bidirectional=True, seed=10 + layers).eval()
    path = _save(net, tmp_path / "bi.pt")
    model = load_torch_file(path, prefix="encoder.rnn", head="fc")
    assert model.num_directions == 2
    x = _x(STEPS, 5, seed=1)
    y_ref, h_ref, c_ref = _torch_lstm_head(net, x)
    y, (h, c) = model.run(x)  # (T, O), (L*D, H)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(h, h_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(c, c_ref, atol=ATOL, rtol=0)


def test_lstm_cell_inside_a_vad_like_module(tmp_path):
    net = Vad().eval()
    path = _save(net, tmp_path / "vad.jit")
    model = lstm_cpu.load(path)  # no prefix: the one LSTM among convolutions and a BatchNorm
    assert model.info()["source"]["prefix"] == "rnn."
    _check_cell_stream(model, net.rnn)


@pytest.mark.parametrize("make", [lambda: Net(layers=2, bidirectional=True, seed=3), Vad],
                         ids=["bidirectional", "vad"])
def test_state_dict_is_read_bit_exactly(tmp_path, make):
    """The flattened module tree has exactly state_dict()'s names and values (no copies of
    nn.LSTM's _flat_weights list, nothing missing; int64 buffers too)."""
    net = make().eval()
    path = _save(net, tmp_path / "net.pt")
    archive, refs = read_state(str(path))
    with archive:
        got = {n: archive.tensor(n, r) for n, r in refs.items()}
    ref = {k: v.numpy() for k, v in net.state_dict().items()}
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_parameters(tmp_path, dtype):
    net = Net(layers=2, seed=4).eval().to(getattr(torch, dtype))
    path = _save(net, tmp_path / f"{dtype}.pt")
    archive, refs = read_state(str(path))
    with archive:
        w = archive.tensor("encoder.rnn.weight_hh_l1", refs["encoder.rnn.weight_hh_l1"])
    assert w.dtype == (np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_array_equal(w.astype(np.float32), net.encoder.rnn.weight_hh_l1.detach().float().numpy())
    model = lstm_cpu.load(path, prefix="encoder.rnn", head="fc")
    _check_stream(model, net.float())  # the same rounded weights, computed in float32


def test_candidates_of_torchscript_pt_and_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    net = Net(layers=2, bidirectional=True, seed=6).eval()
    files = [_save(net, tmp_path / "net.jit"), tmp_path / "net.pt", tmp_path / "net.safetensors"]
    torch.save(net.state_dict(), files[1])
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files[2]))
    for f in files:
        (c,) = candidates(f)
        assert (c.name, c.kind, c.input_size, c.hidden_size, c.num_layers, c.num_directions) == (
            "encoder.rnn.", "operator", 5, 6, 2, 2), f
        assert "encoder.rnn.weight_ih_l0" in c.location
        lstm_cpu.load(f, prefix=c.name)  # the name is what prefix= takes


def test_loading_needs_no_torch(tmp_path):
    """The reader is numpy-only: a fresh process loads the archive and never imports torch."""
    net = Net(layers=1, seed=8).eval()
    path = _save(net, tmp_path / "net.jit")
    x = _x(3, 5)
    y_ref, _, _ = _torch_lstm_head(net, x)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, lstm_cpu\n"
            f"m = lstm_cpu.load({str(path)!r}, prefix='encoder.rnn', head='fc')\n"
            f"y, _ = m.run(np.load({str(tmp_path / 'x.npy')!r}))\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), y_ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Hand-written archives: a minimal pickle-opcode writer (protocol 2, what torch's C++ pickler uses)
# ---------------------------------------------------------------------------------------------
def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"  # GLOBAL


def _s(text):
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _i(v):
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)  # BININT
    b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b  # LONG1


def _tup(vals):
    return b"(" + b"".join(_i(v) for v in vals) + b"t"  # MARK ... TUPLE


def _tensor(key, numel, offset, size, stride, storage="FloatStorage"):
    """torch._utils._rebuild_tensor_v2(<storage pid>, offset, size, stride, False, OrderedDict())."""
    pid = b"(" + _s("storage") + _g("torch", storage) + _s(key) + _s("cpu") + _i(numel) + b"tQ"
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _i(offset) + _tup(size)
            + _tup(stride) + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")


def _module(attrs: dict, cls="__torch__.Net"):
    """A __torch__ record (NEWOBJ) whose state (BUILD) is a dict of attributes."""
    mod, name = cls.rsplit(".", 1)
    body = b"".join(_s(k) + v for k, v in attrs.items())
    return _g(mod, name) + b")\x81" + b"}(" + body + b"u" + b"b"


def _archive(path, data_pkl, records: dict, constants_pkl=b"\x80\x02).", compress=(), byteorder=None):
    """A zip laid out as torch.jit.save writes it; ``records``: key -> bytes of data/<key>."""
    with zipfile.ZipFile(path, "w") as z:
        if byteorder is not None:
            z.writestr("m/byteorder", byteorder)
        z.writestr("m/data.pkl", data_pkl)
        z.writestr("m/constants.pkl", constants_pkl)
        z.writestr("m/code/__torch__.py", "class Net(Module):\n  pass\n")
        z.writestr("m/version", "3\n")
        for key, raw in records.items():
            z.writestr(f"m/data/{key}", raw,
                       compress_type=zipfile.ZIP_DEFLATED if key in compress else zipfile.ZIP_STORED)
    return path


def _cell_archive(path, H=2, I=3, seed=0, overrides=None, big_endian=False, **kw):
    """An nn.LSTMCell at "cell." written by hand: (archive path, weights by name).
    ``overrides``: name -> replacement opcodes for that tensor."""
    rng = np.random.default_rng(seed)
    shapes = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
    weights, attrs, records = {}, {}, {}
    for k, (name, shp) in enumerate(shapes.items()):
        w = rng.standard_normal(shp).astype(np.float32)
        weights[name] = w
        stride = (shp[1], 1) if len(shp) == 2 else (1,)
        attrs[name] = (overrides or {}).get(name) or _tensor(str(k), w.size, 0, shp, stride)
        records[str(k)] = w.astype(">f4" if big_endian else "<f4").tobytes()
    data = b"\x80\x02" + _module({"training": b"\x89", "cell": _module(attrs, "__torch__.torch.nn.LSTMCell")}) + b"."
    return _archive(path, data, records, byteorder="big" if big_endian else None, **kw), weights


@pytest.mark.parametrize("variant", ["plain", "parameter", "big-endian"])
def test_hand_written_archive_loads(tmp_path, variant):
    """The writer above produces what the reader expects (the hostile cases below edit it); a
    tensor wrapped in _rebuild_parameter and big-endian records read the same."""
    param = (_g("torch._utils", "_rebuild_parameter") + b"(" + _tensor("1", 16, 0, (8, 2), (2, 1))
             + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")
    path, w = _cell_archive(tmp_path / "cell.pt", overrides={"weight_hh": param} if variant == "parameter" else None,
                            big_endian=variant == "big-endian")
    assert sniff(str(path)) == "torchscript"
    model = lstm_cpu.load(path, prefix="cell")
    ref = torch.nn.LSTMCell(3, 2)
    with torch.no_grad():
        for name, arr in w.items():
            getattr(ref, name).copy_(torch.from_numpy(arr))
    _check_cell_stream(model, ref)


# ---------------------------------------------------------------------------------------------
# Hostile archives: code-running pickles
# ---------------------------------------------------------------------------------------------
def _payloads(marker):
    """(global, argument opcodes) that create ``marker`` when a normal unpickler REDUCEs them."""
    m = str(marker)
    return {
        "os.system": (_g("os", "system"), b"(" + _s(f"touch '{m}'") + b"t"),
        "builtins.eval": (_g("builtins", "eval"), b"(" + _s(f"open({m!r}, 'w').close()") + b"t"),
        "builtins.exec": (_g("builtins", "exec"), b"(" + _s(f"open({m!r}, 'w').close()") + b"t"),
        "subprocess.Popen": (_g("subprocess", "Popen"),
                             b"(" + b"](" + _s("touch") + _s(m) + b"e" + b"t"),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["data.pkl top", "data.pkl attribute", "constants.pkl"])
def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, name, where):
    control, marker = tmp_path / "control", tmp_path / "marker"
    fn, args = _payloads(control)[name]
    call = fn + args + b"R"
    # Control: the payload is live -- a normal unpickler runs it and creates the marker.
    pickle.loads(b"\x80\x02" + call + b".")
    if name == "subprocess.Popen":
        import time
        for _ in range(100):
            if control.exists():
                break
            time.sleep(0.05)
    assert control.exists(), "the payload must be able to run, or this test proves nothing"

    fn, args = _payloads(marker)[name]
    call = fn + args + b"R"
    good, _ = _cell_archive(tmp_path / "good.pt")
    with zipfile.ZipFile(good) as z:
        data, records = z.read("m/data.pkl"), {n[len("m/data/"):]: z.read(n) for n in z.namelist()
                                               if n.startswith("m/data/")}
    kw = {}
    if where == "data.pkl top":
        data = b"\x80\x02" + call + b"."
    elif where == "data.pkl attribute":
        data = b"\x80\x02" + _module({"training": b"\x89", "evil": call}) + b"."
    else:
        kw["constants_pkl"] = b"\x80\x02" + call + b"\x85."  # a 1-tuple holding the call
    path = _archive(tmp_path / "evil.jit", data, records, **kw)
    for load in (lstm_cpu.load, load_torch_file, load_torchscript, candidates):
        with pytest.raises(FormatError, match=name.split(".")[0]):
            load(path)
    if name == "subprocess.Popen":
        import time
        time.sleep(0.3)  # a wrongly started process would have touched it by now
    assert not marker.exists()


def test_record_class_called_by_reduce_is_refused(tmp_path):
    """A __torch__ class is an inert record: only NEWOBJ may create it, a REDUCE call is refused."""
    data = b"\x80\x02" + _g("__torch__", "Net") + b"(" + _s("x") + b"tR."
    path = _archive(tmp_path / "call.jit", data, {})
    with pytest.raises(FormatError, match="REDUCE"):
        lstm_cpu.load(path)


def test_storage_type_is_not_callable(tmp_path):
    data = b"\x80\x02" + _g("torch", "FloatStorage") + b"(" + _i(3) + b"tR."
    path = _archive(tmp_path / "storage.jit", data, {})
    with pytest.raises(FormatError, match="not a valid TorchScript pickle"):
        lstm_cpu.load(path)


# ---------------------------------------------------------------------------------------------
# Hostile archives: records, views, sizes
# ---------------------------------------------------------------------------------------------
def test_truncated_data_record(tmp_path):
    path, w = _cell_archive(tmp_path / "t.pt")
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries["m/data/1"] = entries["m/data/1"][:-4]  # weight_hh: one float short
    with zipfile.ZipFile(path, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    with pytest.raises(FormatError, match=r"data/1 holds 60 bytes.*needs 64"):
        lstm_cpu.load(path)


def test_corrupt_data_record_fails_its_crc(tmp_path):
    path, _ = _cell_archive(tmp_path / "c.pt")
    raw = bytearray(path.read_bytes())
    at = raw.find(b"m/data/1") + len(b"m/data/1")  # the local header's name, then the data
    raw[at + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="unreadable"):
        lstm_cpu.load(path)


def test_truncated_archive(tmp_path):
    path, _ = _cell_archive(tmp_path / "cut.pt")
    raw = path.read_bytes()
    for n in (len(raw) // 2, len(raw) - 30):
        path.write_bytes(raw[:n])
        with pytest.raises(lstm_cpu.LSTMError):
            load_torchscript(path)


@pytest.mark.parametrize("numel, offset, stride, match", [
    (16, 5, (2, 1), "reach past its storage"),   # offset beyond the record's end
    (16, 0, (3, 1), "reach past its storage"),   # rows spaced wider than the record allows
    (4, 0, (0, 0), "broadcast"),                 # stride 0: 16 elements out of a storage of 4
])
def test_tensor_view_outside_its_storage(tmp_path, numel, offset, stride, match):
    # weight_hh (8, 2) of storage "1" (16 floats), re-described with a bad view.
    path, _ = _cell_archive(tmp_path / "v.pt", overrides={
        "weight_hh": _tensor("1", numel, offset, (8, 2), stride)})
    with pytest.raises(FormatError, match=match):
        lstm_cpu.load(path)


def test_storage_larger_than_its_record(tmp_path):
    path, _ = _cell_archive(tmp_path / "n.pt", overrides={
        "weight_hh": _tensor("1", 1 << 40, 0, (8, 2), (2, 1))})
    with pytest.raises(FormatError, match="needs"):
        lstm_cpu.load(path)


def test_unknown_storage_type(tmp_path):
    path, _ = _cell_archive(tmp_path / "q.pt", overrides={
        "weight_hh": _tensor("1", 16, 0, (8, 2), (2, 1), storage="ComplexFloatStorage")})
    with pytest.raises(FormatError, match="ComplexFloatStorage"):
        lstm_cpu.load(path)


def test_zip_bomb_entry_is_refused_before_reading(tmp_path):
    n = (MAX_EXPANSION * 2) * 64 * 1024  # zeros deflate ~1000x: far beyond MAX_EXPANSION
    path, _ = _cell_archive(tmp_path / "bomb.pt")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("m/data/99", bytes(n), compress_type=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < n // MAX_EXPANSION
    with pytest.raises(FormatError, match="zip bomb"):
        lstm_cpu.load(path)


def test_pickle_global_outside_the_allowlist_names_it(tmp_path):
    data = b"\x80\x02" + _g("torch._utils", "_rebuild_device_tensor_from_numpy") + b"."
    path = _archive(tmp_path / "g.jit", data, {})
    with pytest.raises(FormatError, match="_rebuild_device_tensor_from_numpy"):
        lstm_cpu.load(path)


def test_build_on_an_allowlisted_global_is_refused(tmp_path):
    """BUILD on a stand-in (setting attributes of 'our' function, e.g. its __defaults__) must
    fail: the stand-ins are shared by every load, so that would outlive this file."""
    from lstm_cpu.importers import torchscript as ts

    before = ts._ALLOWED[("builtins", "complex")].fn
    state = b"N}(" + _s("fn") + _g("torch.jit._pickle", "restore_type_tag") + b"u\x86"  # (None, slots)
    data = b"\x80\x02" + _g("builtins", "complex") + state + b"b."
    path = _archive(tmp_path / "build.jit", data, {})
    with pytest.raises(FormatError, match="set the state"):
        lstm_cpu.load(path)
    assert ts._ALLOWED[("builtins", "complex")].fn is before


def test_memo_index_bomb_is_refused_before_unpickling(tmp_path):
    """LONG_BINPUT 0x08000000 makes the stdlib unpickler allocate a 2 GB memo (measured)."""
    data = b"\x80\x02N" + b"r" + struct.pack("<I", 0x08000000) + b"."
    path = _archive(tmp_path / "memo.jit", data, {})
    with pytest.raises(FormatError, match="memo index"):
        lstm_cpu.load(path)


def test_frozen_module_constants_are_read_and_the_refusal_says_why(tmp_path):
    """torch.jit.freeze moves the weights into constants.pkl, whose storages live in
    constants/<key> (not data/<key>); they are read bit-exactly but carry no names."""
    net = Encoder(3, 4, 1, False, seed=9).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen = torch.jit.freeze(torch.jit.script(net))
        torch.jit.save(frozen, str(tmp_path / "frozen.jit"))
    archive, refs = read_state(str(tmp_path / "frozen.jit"))
    with archive:
        consts = [archive.tensor(n, r) for n, r in refs.items()]
    assert refs and all(n.startswith("CONSTANTS.c") for n in refs)
    for k, v in net.state_dict().items():
        assert any(c.shape == v.shape and np.array_equal(c, v.numpy()) for c in consts), k
    with pytest.raises(FormatError, match="freeze"):
        lstm_cpu.load(tmp_path / "frozen.jit")


def test_class_and_entry_counts_are_bounded(tmp_path, monkeypatch):
    from lstm_cpu.importers import torchscript as ts

    monkeypatch.setattr(ts, "MAX_CLASSES", 10)
    data = b"\x80\x02" + b"".join(_g("__torch__", f"C{i}") + b"0" for i in range(11)) + b"N."  # 0: POP
    path = _archive(tmp_path / "classes.jit", data, {})
    with pytest.raises(FormatError, match="more than 10 distinct TorchScript classes"):
        lstm_cpu.load(path)
    monkeypatch.setattr(ts, "MAX_ENTRIES", 5)
    path, _ = _cell_archive(tmp_path / "entries.jit")  # 4 files + 4 records
    with pytest.raises(FormatError, match="more than the limit 5"):
        lstm_cpu.load(path)
