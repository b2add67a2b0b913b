"""lstm_cpu/aligned.py: every gate matrix a kernel reads starts on a 64-byte boundary, whichever
way the model was made (constructor, torch, reduced formats, packed files read or mapped), and
files written before the alignment still load and compute the same."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import lstm_cpu
from lstm_cpu import LayerParams, LSTMModel, aligned
from lstm_cpu import layout as lay
from lstm_cpu.packed import resign

LINE = aligned.WEIGHT_ALIGN


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.uint16])
@pytest.mark.parametrize("lead", [0, 1, 4, 7])
def test_empty_places_the_lead_element_on_a_boundary(dtype, lead):
    for n in (lead + 1, 100, 4099):
        a = aligned.empty(n, dtype, lead)
        assert a.shape == (n,) and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert (a.ctypes.data + lead * a.itemsize) % LINE == 0
        assert aligned.is_aligned(a, lead)


def test_aligned_copies_only_what_is_misaligned():
    a = aligned.empty(64, np.float32)
    a[:] = np.arange(64)
    assert aligned.aligned(a) is a
    off = a[4:]  # 16 bytes past a boundary
    assert not aligned.is_aligned(off)
    b = aligned.aligned(off)
    assert b is not off and aligned.is_aligned(b)
    np.testing.assert_array_equal(b, off)
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    c = aligned.aligned(t)
    assert c.flags.c_contiguous and aligned.is_aligned(c)
    np.testing.assert_array_equal(c, t)


def _gate_addresses(model):
    """Byte addresses mod 64 of every gate matrix the model's kernels read."""
    if model._rstack is not None:
        return [w.ctypes.data % LINE for w in model._rstack.W]
    plan, wbuf = model._plan, model._wbuf
    return [plan.gate_panels(wbuf, l, d).ctypes.data % LINE
            for l in range(plan.L) for d in range(plan.D)]


def _layers(rng, I, H, L, D=1):
    return [[LayerParams(rng.normal(size=(4 * H, I if l == 0 else D * H)) * 0.3,
                         rng.normal(size=(4 * H, H)) * 0.3, rng.normal(size=4 * H) * 0.1)
             for _ in range(D)] for l in range(L)]


@pytest.mark.parametrize("weights, dtype", [("float32", np.float32), ("float32", np.float64),
                                            ("int8", np.float32), ("bfloat16", np.float32)])
def test_every_way_of_making_a_model_aligns_its_gates(tmp_path, weights, dtype):
    rng = np.random.default_rng(1)
    m = LSTMModel(_layers(rng, 5, 40, 2), dtype=dtype, weights=weights)
    assert _gate_addresses(m) == [0, 0]
    path = tmp_path / "m.lstm"
    m.save(path)
    for mmap_ in (False, True):
        back = lstm_cpu.load(path, mmap=mmap_)
        assert _gate_addresses(back) == [0, 0], mmap_
    if weights != "float32":  # the float copy a reduced model builds for a float path
        assert all(m._plan.gate_panels(m._wbuf, l, 0).ctypes.data % LINE == 0 for l in range(2))


def test_saved_tensors_start_on_boundaries(tmp_path):
    rng = np.random.default_rng(2)
    m = LSTMModel(_layers(rng, 3, 20, 1), initial_state=(rng.normal(size=(1, 20)), rng.normal(size=(1, 20))))
    path = tmp_path / "m.lstm"
    m.save(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert (8 + n) % LINE == 0
    header = json.loads(data[8 : 8 + n])
    for name, e in header.items():
        if name == "__metadata__":
            continue
        lead = lay.W_CONSTS * 4 if name == "wbuf" else 0
        assert (e["data_offsets"][0] + lead) % LINE == 0, name


def _repack_8(data: bytes) -> bytes:
    """The same tensors as an older save() wrote them: back to back, each padded to 8 bytes,
    the header padded to 8 (so nothing is 64-byte aligned), re-signed."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out, offset = [], 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b0, b1 = e["data_offsets"]
        raw = body[b0:b1]
        e["data_offsets"] = [offset, offset + len(raw)]
        pad = (-len(raw)) % 8
        out.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    if (8 + len(hb)) % LINE == 0:  # keep the data section off a boundary
        hb += b" " * 8
    return resign(struct.pack("<Q", len(hb)) + hb + b"".join(out))


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_files_written_before_the_alignment_load_and_compute_the_same(tmp_path, weights):
    rng = np.random.default_rng(3)
    m = LSTMModel(_layers(rng, 6, 48, 2), weights=weights)
    path = tmp_path / "new.lstm"
    m.save(path)
    old = tmp_path / "old.lstm"
    old.write_bytes(_repack_8(path.read_bytes()))
    n = struct.unpack("<Q", old.read_bytes()[:8])[0]
    assert (8 + n) % LINE != 0  # the data section is off a boundary, so its tensors are too
    x = rng.normal(size=(9, 1, 6)).astype(np.float32)
    want = m.run(x)[0]
    for mmap_ in (False, True):
        back = lstm_cpu.load(old, mmap=mmap_)
        np.testing.assert_array_equal(back.run(x)[0], want)
        s, s0 = back.stream(), m.stream()
        for t in range(9):
            np.testing.assert_array_equal(s.step(x[t, 0]), s0.step(x[t, 0]))
        if not mmap_:  # read into memory: placed on boundaries (a copy where needed)
            assert _gate_addresses(back) == [0, 0]
        elif weights == "float32":  # mapped: stays a view of the file (shared pages), unaligned
            from lstm_cpu.model import _maps_a_file

            assert _maps_a_file(back._wbuf) and _gate_addresses(back) != [0, 0]
