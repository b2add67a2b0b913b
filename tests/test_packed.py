"""lstm_cpu/packed.py: the checksum covers every byte read, and mmap uses what it checked."""

from __future__ import annotations

import json
import mmap
import struct

import numpy as np
import pytest

import lstm_cpu
from lstm_cpu import FormatError, LayerParams, LSTMModel, UnsupportedModelError
from lstm_cpu.packed import resign


def _model(rng, **kw):
    H, I = 24, 5
    return LSTMModel([[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H)),
                                   rng.normal(size=4 * H))]], **kw)


def _split(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body):
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    return struct.pack("<Q", len(hb)) + hb + body


def test_swapped_header_offsets_fail_the_checksum(tmp_path):
    """Two tensors of one dtype and size (init_h and init_c when out == H) swap their offsets in
    the header: every value still passes every plan check, so only the checksum can catch it."""
    rng = np.random.default_rng(0)
    m = _model(rng, initial_state=(rng.normal(size=(1, 24)), rng.normal(size=(1, 24))))
    path = tmp_path / "m.lstm"
    m.save(path)
    h, body = _split(path.read_bytes())
    h["init_h"]["data_offsets"], h["init_c"]["data_offsets"] = (h["init_c"]["data_offsets"],
                                                                h["init_h"]["data_offsets"])
    forged = _join(h, body)
    path.write_bytes(forged)
    with pytest.raises(FormatError, match="checksum"):
        lstm_cpu.load(path)
    # the same forgery re-signed loads, and really has the states swapped: the check is what
    # stood between the forgery and a silently wrong model
    path.write_bytes(resign(forged))
    swapped = lstm_cpu.load(path)
    np.testing.assert_array_equal(swapped.initial_state[0], m.initial_state[1])


def test_header_byte_flip_fails_the_checksum(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "m.lstm"
    _model(rng).save(path)
    data = bytearray(path.read_bytes())
    i = data.index(b'"source"')
    data[i + 3] ^= 0x20  # "source" -> "soUrce": valid JSON, an unknown key would be ignored
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        lstm_cpu.load(path)


def test_mmap_uses_the_mapping_it_checked(tmp_path):
    rng = np.random.default_rng(2)
    m = _model(rng)
    path = tmp_path / "m.lstm"
    m.save(path)
    mm = lstm_cpu.load(path, mmap=True)
    base = mm._wbuf
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, mmap.mmap), f"weights view {type(base).__name__}, not the checked map"
    x = rng.normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_array_equal(mm.run(x)[0], m.run(x)[0])


def test_old_format_version_is_refused_with_advice(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "m.lstm"
    _model(rng).save(path)
    h, body = _split(path.read_bytes())
    h["__metadata__"]["version"] = "1"
    path.write_bytes(resign(_join(h, body)))
    with pytest.raises(UnsupportedModelError, match="convert"):
        lstm_cpu.load(path)


def _as_format_2(path, model):
    """Rewrite a saved float file as format 2 wrote it: gate matrices row-major (K, C), version
    "2", re-signed. Built from the model's own plan (no old code needed)."""
    from lstm_cpu.packed import _gate_regions

    h, body = _split(path.read_bytes())
    e = h["wbuf"]
    b0, b1 = e["data_offsets"]
    wbuf = np.frombuffer(body[b0:b1], np.float32).copy()
    plan = model._plan
    for l in range(plan.L):
        for d in range(plan.D):
            (a, b) = _gate_regions(plan)[l * plan.D + d]
            wbuf[a:b] = plan.gate_matrix(wbuf, l, d).ravel()  # panels -> (K, C) row-major
    body = body[:b0] + wbuf.tobytes() + body[b1:]
    h["__metadata__"]["version"] = "2"
    return h, body


@pytest.mark.parametrize("mmap_", [False, True])
def test_format_2_files_load_with_their_row_major_gates_converted(tmp_path, mmap_):
    """Format 2 stored each float gate matrix row-major; layout 7 reads panels. A format-2 file
    must compute exactly what it computed (its gates converted on load), and the same bytes
    read as panels (the file claiming format 3) must not: the conversion is what makes it right."""
    rng = np.random.default_rng(5)
    H, I = 40, 7  # C = 4 * 48 = 192: three panels, so row-major and panel order differ
    m = LSTMModel([[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H)),
                                rng.normal(size=4 * H))] for _ in range(1)])
    path = tmp_path / "m.lstm"
    m.save(path)
    h, body = _as_format_2(path, m)
    old = tmp_path / "old.lstm"
    old.write_bytes(resign(_join(h, body)))
    x = rng.normal(size=(6, I)).astype(np.float32)
    back = lstm_cpu.load(old, mmap=mmap_)
    np.testing.assert_array_equal(back.run(x)[0], m.run(x)[0])
    h["__metadata__"]["version"] = "3"
    wrong = tmp_path / "wrong.lstm"
    wrong.write_bytes(resign(_join(h, body)))
    assert not np.allclose(lstm_cpu.load(wrong).run(x)[0], m.run(x)[0], atol=1e-3)


def test_format_2_reduced_files_load_unchanged(tmp_path):
    """A reduced file keeps no float gate matrix in wbuf: format 2 and 3 read the same."""
    rng = np.random.default_rng(6)
    m = _model(rng, weights="int8")
    path = tmp_path / "m.lstm"
    m.save(path)
    h, body = _split(path.read_bytes())
    h["__metadata__"]["version"] = "2"
    old = tmp_path / "old.lstm"
    old.write_bytes(resign(_join(h, body)))
    x = rng.normal(size=(6, 5)).astype(np.float32)
    np.testing.assert_array_equal(lstm_cpu.load(old).run(x)[0], m.run(x)[0])
