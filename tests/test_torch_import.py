"""lstm_cpu.importers.torch_lstm: every way a PyTorch LSTM can arrive, and every way a file can be bad.

These tests are about *reading* (keys, prefixes, shapes, files, safety); numerical precision is
tests/test_parity_torch.py's job, so outputs here are compared with a loose 1e-4.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from conftest import torch_cell, torch_lstm, torch_run  # noqa: E402
from lstm_cpu.importers.torch_lstm import from_torch, load_torch_file  # noqa: E402
from lstm_cpu.errors import FormatError, InputError, LSTMError  # noqa: E402

ATOL = 1e-4  # float32 import check, not a precision test


def _x(T, B, I, seed=0):
    return np.random.default_rng(seed).standard_normal((T, B, I)).astype(np.float32)  # (T, B, I)


def _check_against_torch(model, module, T=7, B=2, head=None):
    """Run ``model`` and the torch ``module`` (optionally followed by ``head``) on the same input."""
    x = _x(T, B, module.input_size)
    y_ref, (h_ref, c_ref) = torch_run(module, x)  # (T, B, D*out), (L*D, B, out), (L*D, B, H)
    if head is not None:
        with torch.no_grad():
            y_ref = head(torch.from_numpy(y_ref)).numpy()  # (T, B, O)
    y, (h, c) = model.run(x)
    np.testing.assert_allclose(y, y_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(h, h_ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(c, c_ref, atol=ATOL, rtol=0)


def _sd(module):
    return dict(module.state_dict())


class Encoder(nn.Module):
    def __init__(self, I=6, H=5):
        super().__init__()
        self.rnn = torch_lstm(I, H, num_layers=2, seed=3)


class Net(nn.Module):
    """embed -> encoder.rnn (the LSTM) -> fc: the LSTM sits two modules deep."""

    def __init__(self, I=6, H=5, O=3):
        super().__init__()
        self.embed = nn.Linear(4, I)
        self.encoder = Encoder(I, H)
        self.fc = nn.Linear(H, O)


# ---------------------------------------------------------------------------------------------
# Forms: module, state dict, nested, prefix, DataParallel, auto-detect
# ---------------------------------------------------------------------------------------------
def test_memory_module_lstm():
    m = torch_lstm(4, 6, num_layers=2, seed=1)
    model = from_torch(m)
    assert (model.input_size, model.hidden_size, model.num_layers, model.num_directions) == (4, 6, 2, 1)
    assert model.proj_size == 0
    _check_against_torch(model, m)


def test_state_dict_of_tensors_and_of_numpy():
    m = torch_lstm(3, 5, seed=2)
    _check_against_torch(from_torch(m.state_dict()), m)
    numpy_sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    _check_against_torch(from_torch(numpy_sd), m)


def test_nested_module_auto_detect_and_prefix():
    net = Net()
    lstm = net.encoder.rnn
    _check_against_torch(from_torch(net), lstm)
    _check_against_torch(from_torch(net, prefix="encoder.rnn."), lstm)
    _check_against_torch(from_torch(net.state_dict()), lstm)  # found among embed.* and fc.*
    _check_against_torch(from_torch(net.state_dict(), prefix="encoder.rnn"), lstm)  # dot optional
    model = from_torch(net.state_dict(), prefix="encoder.rnn.")
    assert model.info()["source"]["prefix"] == "encoder.rnn."
    assert model.info()["source"]["format"] == "pytorch"


def test_wrong_prefix_lists_candidates():
    net = Net()
    with pytest.raises(FormatError) as e:
        from_torch(net.state_dict(), prefix="decoder.rnn.")
    msg = str(e.value)
    assert "decoder.rnn.weight_ih_l0" in msg and "encoder.rnn." in msg


def test_dataparallel_module_prefix():
    net = Net()
    lstm = net.encoder.rnn
    dp = nn.DataParallel(net)  # on CPU it only wraps, but its state dict gets "module." keys
    sd = dp.state_dict()
    assert all(k.startswith("module.") for k in sd)
    _check_against_torch(from_torch(sd), lstm)
    _check_against_torch(from_torch(sd, prefix="encoder.rnn."), lstm)
    _check_against_torch(from_torch(sd, prefix="module.encoder.rnn."), lstm)
    _check_against_torch(from_torch(dp), lstm)
    _check_against_torch(from_torch(sd, head="fc"), lstm, head=net.fc)


def test_multiple_lstms_error_lists_prefixes_with_sizes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch_lstm(3, 4, seed=1)
            self.dec = torch_lstm(4, 7, seed=2)

    two = Two()
    for obj in (two, two.state_dict()):
        with pytest.raises(InputError) as e:
            from_torch(obj)
        msg = str(e.value)
        assert "enc." in msg and "dec." in msg, msg
        assert "hidden_size=4" in msg and "hidden_size=7" in msg, msg
        _check_against_torch(from_torch(obj, prefix="dec."), two.dec)
        _check_against_torch(from_torch(obj, prefix="enc"), two.enc)


def test_gru_next_to_lstm_is_not_a_candidate():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 4)
            self.lstm = torch_lstm(3, 4, seed=5)

    mixed = Mixed()
    _check_against_torch(from_torch(mixed), mixed.lstm)  # isinstance
    _check_against_torch(from_torch(mixed.state_dict()), mixed.lstm)  # shapes: GRU's W_hh is (3H, H)


def test_gru_alone_is_a_format_error():
    with pytest.raises(FormatError, match="weight_hh_l0"):
        from_torch(nn.GRU(3, 4).state_dict())


def test_no_lstm_says_what_was_expected():
    with pytest.raises(FormatError, match="weight_ih_l0"):
        from_torch(nn.Linear(3, 4).state_dict())
    with pytest.raises(FormatError, match="weight_ih_l0"):
        from_torch({})


# ---------------------------------------------------------------------------------------------
# Variants: LSTMCell, bias=False, proj_size, bidirectional, head
# ---------------------------------------------------------------------------------------------
def test_lstm_cell_module_and_state_dict():
    cell = torch_cell(5, 6, seed=4)
    x = _x(9, 2, 5)
    h = torch.zeros(2, 6)
    c = torch.zeros(2, 6)
    ys = []
    with torch.no_grad():
        for t in range(9):
            h, c = cell(torch.from_numpy(x[t]), (h, c))
            ys.append(h.numpy())
    for obj in (cell, cell.state_dict(), {"body.cell." + k: v for k, v in cell.state_dict().items()}):
        model = from_torch(obj)
        assert (model.input_size, model.hidden_size, model.num_layers, model.num_directions) == (5, 6, 1, 1)
        y, (hN, cN) = model.run(x)
        np.testing.assert_allclose(y, np.stack(ys), atol=ATOL)
        np.testing.assert_allclose(hN[0], h.numpy(), atol=ATOL)
        np.testing.assert_allclose(cN[0], c.numpy(), atol=ATOL)
    assert from_torch(cell).info()["source"]["module"] == "LSTMCell"


def test_lstm_cell_without_bias():
    cell = torch_cell(3, 2, bias=False, seed=1)
    x = _x(4, 1, 3)
    h = c = torch.zeros(1, 2)
    with torch.no_grad():
        for t in range(4):
            h, c = cell(torch.from_numpy(x[t]), (h, c))
    y, _ = from_torch(cell).run(x)
    np.testing.assert_allclose(y[-1], h.numpy(), atol=ATOL)


def test_no_bias():
    m = torch_lstm(3, 4, num_layers=2, bias=False, seed=6)
    assert not any(k.startswith("bias") for k in m.state_dict())
    _check_against_torch(from_torch(m), m)


def test_proj_size():
    m = torch_lstm(5, 8, num_layers=2, proj_size=3, seed=7)
    model = from_torch(m.state_dict())
    assert (model.hidden_size, model.proj_size) == (8, 3)
    _check_against_torch(model, m)


def test_bidirectional_and_bidirectional_proj():
    for kw in (dict(num_layers=2), dict(num_layers=2, proj_size=2)):
        m = torch_lstm(4, 5, bidirectional=True, seed=8, **kw)
        model = from_torch(m)
        assert model.num_directions == 2
        _check_against_torch(model, m)


def test_head_fc():
    net = Net(I=6, H=5, O=3)
    model = from_torch(net, head="fc")
    _check_against_torch(model, net.encoder.rnn, head=net.fc)
    assert model.output_size == 3
    model = from_torch(net.state_dict(), prefix="encoder.rnn.", head="fc")
    _check_against_torch(model, net.encoder.rnn, head=net.fc)


def test_head_bidirectional_proj():
    m = torch_lstm(4, 6, bidirectional=True, proj_size=2, seed=9)
    fc = nn.Linear(2 * 2, 5)
    sd = {**{"rnn." + k: v for k, v in m.state_dict().items()},
          **{"out." + k: v for k, v in fc.state_dict().items()}}
    _check_against_torch(from_torch(sd, head="out"), m, head=fc)


def test_head_errors():
    net = Net(I=6, H=5, O=3)
    with pytest.raises(FormatError, match="classifier.weight"):
        from_torch(net, head="classifier")
    sd = net.state_dict()
    sd["fc.weight"] = torch.zeros(3, 7)  # wrong in_features: the LSTM gives 5
    with pytest.raises(FormatError, match=r"fc\.weight.*\(\?, 5\).*\(3, 7\)"):
        from_torch(sd, head="fc")
    sd = net.state_dict()
    sd["fc.bias"] = torch.zeros(4)
    with pytest.raises(FormatError, match=r"fc\.bias"):
        from_torch(sd, head="fc")


# ---------------------------------------------------------------------------------------------
# Files: .pt / .pth (weights-only) and .safetensors
# ---------------------------------------------------------------------------------------------
def test_pt_file_plain_and_nested(tmp_path):
    net = Net()
    lstm = net.encoder.rnn
    sd = net.state_dict()
    forms = {
        "plain.pt": sd,
        "nested.pth": {"state_dict": sd, "epoch": 3},
        "model.pt": {"model": sd, "optimizer_name": "adam"},
        "msd.pt": {"model_state_dict": sd, "step": 10},
    }
    for name, obj in forms.items():
        path = tmp_path / name
        torch.save(obj, path)
        model = load_torch_file(path)
        _check_against_torch(model, lstm)
        src = model.info()["source"]
        assert src["format"] == "pytorch" and src["path"] == str(path) and src["prefix"] == "encoder.rnn."
    model = load_torch_file(tmp_path / "plain.pt", prefix="encoder.rnn.", head="fc")
    _check_against_torch(model, lstm, head=net.fc)


def test_safetensors_file(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    net = Net()
    path = tmp_path / "net.safetensors"
    st.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = load_torch_file(path, head="fc")
    _check_against_torch(model, net.encoder.rnn, head=net.fc)
    src = model.info()["source"]
    assert src["format"] == "safetensors" and src["path"] == str(path)


def test_safetensors_proj_bidirectional(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = torch_lstm(3, 6, num_layers=2, proj_size=4, bidirectional=True, seed=11)
    path = tmp_path / "p.safetensors"
    st.save_file(dict(m.state_dict()), str(path))
    _check_against_torch(load_torch_file(path), m)


def test_full_module_pickle_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(Net(), path)  # pickles the classes: needs full unpickling
    with pytest.raises(FormatError, match="weights-only"):
        load_torch_file(path)


def test_zip_with_unsupported_version_field_is_not_an_escape(tmp_path):
    """Fuzz case (seed 1, case 6754): a central-directory 'version needed' byte of 0x7f makes
    Python's zipfile raise NotImplementedError; the TorchScript sniff must not let it escape."""
    m = torch_lstm(3, 4)
    good = tmp_path / "good.pt"
    torch.save(m.state_dict(), good)
    data = bytearray(good.read_bytes())
    cd = data.find(b"PK\x01\x02")
    assert cd > 0
    data[cd + 6] = 0x7F  # version needed to extract: 12.7
    bad = tmp_path / "version.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(bad)  # what the sniff has to survive
    try:
        model = load_torch_file(bad)  # torch's reader may accept it ...
    except LSTMError:
        return  # ... or refuse it with our error type: both are fine, an escape is not
    _check_against_torch(model, m)


class _Hostile:
    """Unpickling this would run os.system(touch MARKER) under full unpickling."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    sd = dict(torch_lstm(2, 3).state_dict())
    sd["payload"] = _Hostile(str(marker))
    path = tmp_path / "evil.pt"
    torch.save(sd, path)
    assert not marker.exists()
    with pytest.raises(FormatError, match="weights-only"):
        load_torch_file(path)
    assert not marker.exists()
    # The same payload as a legacy (non-zip) pickle stream.
    legacy = tmp_path / "evil_legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(_Hostile(str(marker)), f, protocol=2)
    with pytest.raises(FormatError):
        load_torch_file(legacy)
    assert not marker.exists()


def test_bad_pt_files(tmp_path):
    sd = torch_lstm(3, 4).state_dict()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    cases = {
        "empty.pt": b"",
        "truncated.pt": data[: len(data) // 2],
        "header_only.pt": data[:40],
        "random.pt": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "random_zip_magic.pt": b"PK\x03\x04" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "text.pth": b"hello, I am not a checkpoint\n",
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(FormatError):
            load_torch_file(path)


def test_pt_holding_non_dict_or_no_tensors(tmp_path):
    for name, obj in {"list.pt": [torch.zeros(2)], "tensor.pt": torch.zeros(3),
                      "nothing.pt": {"epoch": 1, "lr": 0.1}}.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(FormatError):
            load_torch_file(path)


def test_pt_with_corrupted_zip_entry(tmp_path):
    """Flip bytes inside a stored tensor record: torch's zip reader must fail, we must wrap it."""
    path = tmp_path / "c.pt"
    torch.save(torch_lstm(3, 4).state_dict(), path)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert any("data.pkl" in n for n in names)
    blob = bytearray(path.read_bytes())
    i = blob.find(b"data.pkl")
    blob[i + 30 : i + 60] = b"\xff" * 30  # inside the pickle record
    path.write_bytes(bytes(blob))
    with pytest.raises(LSTMError):
        load_torch_file(path)


def test_bad_safetensors_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    good = tmp_path / "good.safetensors"
    st.save_file(dict(torch_lstm(3, 4).state_dict()), str(good))
    data = good.read_bytes()
    rng = np.random.default_rng(1)
    header_len = int.from_bytes(data[:8], "little")
    cases = {
        "empty.safetensors": b"",
        "short.safetensors": data[:5],
        "truncated.safetensors": data[: len(data) - 17],
        "header_cut.safetensors": data[: 8 + header_len // 2],
        "random.safetensors": rng.integers(0, 256, 2048, dtype=np.uint8).tobytes(),
        "huge_header_len.safetensors": (1 << 62).to_bytes(8, "little") + b"{}",
        "bad_json.safetensors": (10).to_bytes(8, "little") + b"{not json}",
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(FormatError):
            load_torch_file(path)


def test_safetensors_absurd_shape_refused_before_reading(tmp_path):
    """A header may claim any shape; the size bound must trip before data is touched."""
    import json

    H, I = 1 << 22, 1 << 22  # (4H, I) = 2**46 elements
    header = {
        "weight_ih_l0": {"dtype": "F32", "shape": [4 * H, I], "data_offsets": [0, 0]},
        "weight_hh_l0": {"dtype": "F32", "shape": [4 * H, H], "data_offsets": [0, 0]},
    }
    hb = json.dumps(header).encode()
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(len(hb).to_bytes(8, "little") + hb)
    with pytest.raises(FormatError):  # safetensors itself or our bound: never MemoryError
        load_torch_file(path)


def test_size_bound_on_state_dict_shapes():
    """Shapes are bounded by reading only .shape: a huge expanded (stride-0) tensor is never copied."""
    big = torch.zeros(1).expand(4 << 20, 1 << 12)  # (4H, I): 2**34 elements, no memory behind it
    sd = {"weight_ih_l0": big, "weight_hh_l0": torch.zeros(1).expand(4 << 20, 1 << 20)}
    with pytest.raises(FormatError, match="limit"):
        from_torch(sd)


def test_missing_file_is_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------
# Inconsistent state dicts: FormatError naming the key, expected vs got; never KeyError
# ---------------------------------------------------------------------------------------------
def _base(**kw):
    return dict(torch_lstm(3, 4, num_layers=2, **kw).state_dict())


def _raises_format(sd, *needles):
    try:
        from_torch(sd)
    except FormatError as e:
        msg = str(e)
        for n in needles:
            assert n in msg, f"{n!r} not in {msg!r}"
        return msg
    except Exception as e:  # pragma: no cover - the point of the test
        pytest.fail(f"expected FormatError, got {type(e).__name__}: {e}")
    pytest.fail("expected FormatError, got a model")


def test_missing_weight_hh_in_layer_1():
    sd = _base()
    del sd["weight_hh_l1"]
    _raises_format(sd, "weight_hh_l1", "(16, 4)")


def test_missing_weight_ih_in_layer_1():
    sd = _base()
    del sd["weight_ih_l1"]
    _raises_format(sd, "weight_ih_l1")


def test_missing_one_bias():
    sd = _base()
    del sd["bias_hh_l1"]
    _raises_format(sd, "bias_hh_l1")
    sd = _base()
    del sd["bias_ih_l0"]
    _raises_format(sd, "bias_ih_l0")


def test_reverse_in_only_some_layers():
    sd = _base(bidirectional=True)
    for k in [k for k in sd if k.endswith("l1_reverse")]:
        del sd[k]
    _raises_format(sd, "weight_ih_l1_reverse")


def test_rows_not_multiple_of_four():
    sd = _base()
    sd["weight_ih_l0"] = torch.zeros(10, 3)
    _raises_format(sd, "weight_ih_l0", "10")


def test_weight_hh_columns_wrong():
    sd = _base()
    sd["weight_hh_l0"] = torch.zeros(16, 5)
    _raises_format(sd, "weight_hh_l0", "(16, 4)", "(16, 5)")


def test_layer_input_size_wrong():
    sd = _base()
    sd["weight_ih_l1"] = torch.zeros(16, 3)  # layer 1 reads layer 0's 4 outputs
    _raises_format(sd, "weight_ih_l1", "(16, 4)", "(16, 3)")


def test_proj_columns_must_be_p():
    sd = _base(proj_size=2)
    sd["weight_hh_l0"] = torch.zeros(16, 4)  # with proj_size=2, W_hh is (4H, P) = (16, 2)
    _raises_format(sd, "weight_hh_l0", "(16, 2)")
    sd = _base(proj_size=2)
    del sd["weight_hr_l1"]
    _raises_format(sd, "weight_hr_l1")


def test_bias_wrong_length_and_rank():
    sd = _base()
    sd["bias_ih_l0"] = torch.zeros(15)
    _raises_format(sd, "bias_ih_l0", "(16,)", "(15,)")
    sd = _base()
    sd["weight_ih_l0"] = torch.zeros(16, 3, 1)
    _raises_format(sd, "weight_ih_l0")


def test_layer_gap():
    sd = _base()
    for k in list(sd):
        if "_l1" in k:
            sd[k.replace("_l1", "_l2")] = sd.pop(k)
    _raises_format(sd, "weight_ih_l1")


def test_non_float_and_non_finite_weights():
    sd = _base()
    sd["weight_ih_l0"] = torch.zeros(16, 3, dtype=torch.int32)
    _raises_format(sd, "weight_ih_l0", "int32")
    sd = _base()
    sd["weight_hh_l1"][0, 0] = float("nan")
    _raises_format(sd, "weight_hh_l1", "NaN")


def test_bfloat16_and_float16_weights_are_read():
    m = torch_lstm(3, 4, seed=12)
    for dt in (torch.float16, torch.bfloat16):
        sd = {k: v.to(dt) for k, v in m.state_dict().items()}
        model = from_torch(sd)
        ref = torch_lstm(3, 4, seed=12)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(dt).float())
        _check_against_torch(model, ref)


def test_not_a_state_dict_type():
    with pytest.raises(TypeError):
        from_torch(42)
    with pytest.raises(TypeError):
        from_torch(nn.Linear(2, 2).state_dict(), prefix=3)


# ---------------------------------------------------------------------------------------------
# Through the package entry points (lstm_cpu.load / lstm_cpu.from_torch) and the packed format
# ---------------------------------------------------------------------------------------------
def test_package_entry_points(tmp_path):
    import lstm_cpu

    net = Net()
    torch.save(net.state_dict(), tmp_path / "n.pt")
    _check_against_torch(lstm_cpu.load(tmp_path / "n.pt", head="fc"), net.encoder.rnn, head=net.fc)
    st = pytest.importorskip("safetensors.torch")
    st.save_file(dict(net.state_dict()), str(tmp_path / "n.safetensors"))
    _check_against_torch(lstm_cpu.load(tmp_path / "n.safetensors", prefix="encoder.rnn."), net.encoder.rnn)
    _check_against_torch(lstm_cpu.from_torch(net, head="fc"), net.encoder.rnn, head=net.fc)


def test_packed_round_trip_of_imported_model(tmp_path):
    import lstm_cpu

    m = torch_lstm(4, 9, num_layers=2, proj_size=3, seed=13)
    fc = nn.Linear(3, 2)
    sd = {**{"lstm." + k: v for k, v in m.state_dict().items()},
          **{"fc." + k: v for k, v in fc.state_dict().items()}}
    model = from_torch(sd, head="fc")
    model.save(tmp_path / "m.lstm")
    back = lstm_cpu.load(tmp_path / "m.lstm")
    x = _x(11, 2, 4)
    np.testing.assert_array_equal(back.run(x)[0], model.run(x)[0])
    _check_against_torch(back, m, head=fc)
    assert back.info()["source"]["prefix"] == "lstm."


def test_safetensors_bfloat16_and_float16(tmp_path):
    """numpy has no bfloat16: the importer widens BF16 itself (no torch needed for it)."""
    st = pytest.importorskip("safetensors.torch")
    m = torch_lstm(3, 4, num_layers=2, seed=14)
    for dt in (torch.bfloat16, torch.float16):
        path = tmp_path / f"{dt}.safetensors".replace("torch.", "")
        st.save_file({k: v.to(dt).contiguous() for k, v in m.state_dict().items()}, str(path))
        ref = torch_lstm(3, 4, num_layers=2, seed=14)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(dt).float())
        _check_against_torch(load_torch_file(path), ref)
