"""Reliability and security cases a long-lived edge service depends on.

lstm-cpu loads model files from anywhere and runs for months: a hostile file must be refused
without running its code, reading outside its folder, or allocating what it claims; a crash
mid-save must not damage the model on disk; extreme and non-finite inputs must follow the
README's NaN policy; many threads must share one model with bit-identical results; and a stream
must step for a long time in flat memory, close to a float64 reference.

The fuzzer (tests/test_fuzz.py) covers random corruption; these are the targeted cases. Cases that
could hang or kill the process (a FIFO, a file truncated under a live model) run in a child.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import types

import numpy as np
import pytest

import lstm_cpu
from lstm_cpu import FormatError, LayerParams, LSTMError, LSTMModel
from lstm_cpu.packed import resign
from conftest import MANY

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_layers(I, H, L, seed=0, scale=None, proj=0, peephole=False):
    """Random canonical float64 weights, U(-1/sqrt(H), 1/sqrt(H)) like PyTorch's init."""
    rng = np.random.default_rng(seed)
    s = 1 / np.sqrt(H) if scale is None else scale
    out = proj or H
    u = lambda *shape: rng.uniform(-s, s, size=shape)  # noqa: E731
    return [[LayerParams(u(4 * H, I if l == 0 else out), u(4 * H, out), u(4 * H),
                         u(proj, H) if proj else None, u(3 * H) if peephole else None)]
            for l in range(L)]


@pytest.fixture(scope="module")
def small_model():
    return LSTMModel(make_layers(3, 5, 2, seed=1))


def run_child(code: str, timeout: float, mem_limit: int = 0):
    """Run ``code`` in a fresh interpreter (repo on sys.path); returns CompletedProcess or None on timeout."""
    prelude = "import sys; sys.path.insert(0, %r)\n" % _ROOT
    if mem_limit:
        prelude += f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({mem_limit}, {mem_limit}))\n"
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, cwd=_ROOT)
    except subprocess.TimeoutExpired:
        return None


def onnx_lstm_model(I=3, H=5, seed=0, hidden_size=None):
    """A one-node ONNX LSTM ModelProto (W, R, B initializers, ONNX gate order)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    u = lambda *s: rng.uniform(-0.5, 0.5, size=s).astype(np.float32)  # noqa: E731
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], name="lstm",
                            hidden_size=H if hidden_size is None else hidden_size)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "N", I])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, "N", H])],
                          initializer=[numpy_helper.from_array(u(1, 4 * H, I), "W"),
                                       numpy_helper.from_array(u(1, 4 * H, H), "R"),
                                       numpy_helper.from_array(u(1, 8 * H), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def split_st(data):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:], n


def join_st(header, body):
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    return struct.pack("<Q", len(hb)) + hb + body


# ---------------------------------------------------------------------------------------------
# Code in files is never run
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this would call ``fn(*args)``: a file that creates ``marker``."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "legacy"])
@pytest.mark.parametrize("call", ["open", "system"])
def test_pt_pickle_payload_refused_and_never_run(tmp_path, how, call):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "marker"
    payload = (_Payload(open, (str(marker), "w")) if call == "open"
               else _Payload(os.system, (f"touch {marker}",)))
    obj = {"weight_ih_l0": torch.zeros(20, 3), "weight_hh_l0": torch.zeros(20, 5), "extra": payload}
    path = tmp_path / "model.pt"
    if how == "torch.save":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    assert not marker.exists()  # saving must not have run it either
    with pytest.raises(FormatError) as ei:
        lstm_cpu.load(path)
    assert not marker.exists(), "the pickle payload ran while loading"
    # The refusal says what happened and does not advise weights_only=False.
    assert "weights_only=False" not in str(ei.value)


def test_pt_payload_as_whole_module_refused(tmp_path):
    """A whole pickled nn.Module (what torch.save(model) writes) is refused, not unpickled."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "module.pt"
    torch.save(torch.nn.LSTM(3, 5), path)
    with pytest.raises(FormatError, match="weights-only|state_dict"):
        lstm_cpu.load(path)


# ---------------------------------------------------------------------------------------------
# ONNX external data stays inside the model's folder
# ---------------------------------------------------------------------------------------------
def _external_model(folder, location, blob_path):
    """Write model.onnx in ``folder`` whose W points at ``location``; write W's bytes to ``blob_path``.

    The bytes at ``blob_path`` are exactly W, so the file *would* load if the path were followed:
    a refusal is the path check, not a size mismatch."""
    from onnx import TensorProto

    m = onnx_lstm_model()
    w = m.graph.initializer[0]
    blob = bytes(w.raw_data)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(blob)))):
        e = w.external_data.add()
        e.key, e.value = k, v
    os.makedirs(folder, exist_ok=True)
    if blob_path is not None:
        os.makedirs(os.path.dirname(blob_path), exist_ok=True)
        with open(blob_path, "wb") as f:
            f.write(blob)
    path = os.path.join(folder, "model.onnx")
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return path


def test_onnx_external_data_inside_folder_loads(tmp_path):
    pytest.importorskip("onnx")
    d = tmp_path / "m"
    path = _external_model(str(d), "weights/w.bin", str(d / "weights" / "w.bin"))
    m = lstm_cpu.load(path)
    assert m.input_size == 3 and m.hidden_size == 5


@pytest.mark.parametrize("case", ["dotdot", "dotdot_nested", "absolute", "symlink_file", "symlink_dir"])
def test_onnx_external_data_outside_folder_refused(tmp_path, case):
    pytest.importorskip("onnx")
    d = tmp_path / "models" / "m"
    secret = tmp_path / "secret.bin"
    if case == "dotdot":
        path = _external_model(str(d), "../../secret.bin", str(secret))
    elif case == "dotdot_nested":
        path = _external_model(str(d), "sub/../../../secret.bin", str(secret))
    elif case == "absolute":
        path = _external_model(str(d), str(secret), str(secret))
    elif case == "symlink_file":
        path = _external_model(str(d), "w.bin", str(secret))
        os.symlink(secret, d / "w.bin")
    else:
        path = _external_model(str(d), "data/secret.bin", str(secret))
        os.symlink(tmp_path, d / "data")
    with pytest.raises(FormatError, match="outside|relative|inside"):
        lstm_cpu.load(path)


# ---------------------------------------------------------------------------------------------
# Sizes a file claims are checked before anything is allocated
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".safetensors", ".lstm", ".bin"])
@pytest.mark.parametrize("n", [10**12, 2**63, 2**64 - 1])
def test_huge_safetensors_header_length_refused_fast(tmp_path, ext, n):
    path = tmp_path / ("model" + ext)
    path.write_bytes(struct.pack("<Q", n) + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4)
    with pytest.raises(FormatError):  # once untraced: first-use imports are not the file's doing
        lstm_cpu.load(path)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(FormatError):
            lstm_cpu.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 1.0
    assert peak < 1 << 20, f"refusing a {path.stat().st_size}-byte file allocated {peak} bytes"


def test_hidden_size_2_31_refused_onnx(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_lstm_model(hidden_size=2**31).SerializeToString())
    with pytest.raises(FormatError, match="hidden_size"):
        lstm_cpu.load(path)


def test_hidden_size_2_31_refused_safetensors(tmp_path):
    """A header claiming weight_ih_l0 of (4 * 2**31, 3): refused from the header alone."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import save

    data = save({"weight_ih_l0": np.zeros((20, 3), np.float32), "weight_hh_l0": np.zeros((20, 5), np.float32)})
    h, body, _ = split_st(data)
    h["weight_ih_l0"]["shape"] = [4 * 2**31, 3]
    h["weight_hh_l0"]["shape"] = [4 * 2**31, 2**31]
    path = tmp_path / "m.safetensors"
    path.write_bytes(join_st(h, body))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            lstm_cpu.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_hidden_size_2_31_refused_packed(tmp_path, small_model):
    """The packed meta says H = 2**31 and the file is re-signed: the layout check refuses it."""
    from lstm_cpu import layout

    path = tmp_path / "m.lstm"
    small_model.save(path)
    h, body, _ = split_st(path.read_bytes())
    b0 = h["meta"]["data_offsets"][0]
    body = bytearray(body)
    body[b0 + 8 * layout.M_H:b0 + 8 * layout.M_H + 8] = struct.pack("<q", 2**31)
    path.write_bytes(resign(join_st(h, bytes(body))))
    with pytest.raises(FormatError, match="hidden size"):
        lstm_cpu.load(path)


def test_pt_stride0_tensors_not_materialised(tmp_path):
    """A 2 KB .pt whose tensors are broadcast (stride-0) views claiming H = 2048 must be refused
    (or at least not expanded to hundreds of MB): a file may not claim more than it holds.
    (Regression: found by tests/test_fuzz.py, it used to load with ~460 MB of peak RSS.)"""
    torch = pytest.importorskip("torch")
    H, I = 2048, 3
    sd = {"weight_ih_l0": torch.zeros(1).expand(4 * H, I), "weight_hh_l0": torch.zeros(1).expand(4 * H, H),
          "bias_ih_l0": torch.zeros(1).expand(4 * H), "bias_hh_l0": torch.zeros(1).expand(4 * H)}
    path = tmp_path / "bomb.pt"
    torch.save(sd, path)
    assert path.stat().st_size < 4096
    tracemalloc.start()
    try:
        try:
            lstm_cpu.load(path)
        except LSTMError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"a {path.stat().st_size}-byte file made the loader allocate {peak >> 20} MB"


# ---------------------------------------------------------------------------------------------
# Packed files: checksum, atomic save
# ---------------------------------------------------------------------------------------------
def test_packed_roundtrip_and_checksum(tmp_path, small_model):
    path = tmp_path / "m.lstm"
    small_model.save(path)
    data = path.read_bytes()
    m = lstm_cpu.load(path)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(m.run(x)[0], small_model.run(x)[0])
    h, body, n = split_st(data)
    wb = h["wbuf"]["data_offsets"]
    # truncated anywhere in the data section, or by one byte
    for cut in (len(data) - 1, len(data) - 4, 8 + n + wb[0] + 10, 8 + n + 1):
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            lstm_cpu.load(path)
    # one flipped bit / byte in the weights
    for k, bit in ((0, 0), ((wb[1] - wb[0]) // 2, 5), (wb[1] - wb[0] - 1, 7)):
        b = bytearray(data)
        b[8 + n + wb[0] + k] ^= 1 << bit
        path.write_bytes(bytes(b))
        with pytest.raises(FormatError, match="checksum"):
            lstm_cpu.load(path)


def test_packed_weights_nan_refused_even_when_resigned(tmp_path, small_model):
    path = tmp_path / "m.lstm"
    small_model.save(path)
    h, body, _ = split_st(path.read_bytes())
    b0 = h["wbuf"]["data_offsets"][0]
    body = bytearray(body)
    body[b0 + 40:b0 + 44] = np.float32(np.nan).tobytes()
    path.write_bytes(resign(join_st(h, bytes(body))))
    with pytest.raises(FormatError, match="NaN"):
        lstm_cpu.load(path)


@pytest.mark.parametrize("fail", ["os.replace", "os.fsync", "write"])
def test_save_is_atomic(tmp_path, small_model, monkeypatch, fail):
    """A failure mid-save leaves the previous file byte-identical and no temporary file behind."""
    path = tmp_path / "m.lstm"
    old = LSTMModel(make_layers(3, 5, 2, seed=99))
    old.save(path)
    before = path.read_bytes()
    listing = sorted(os.listdir(tmp_path))

    class Boom(RuntimeError):
        pass

    def boom(*a, **k):
        raise Boom(fail)

    if fail == "os.replace":
        monkeypatch.setattr(os, "replace", boom)
    elif fail == "os.fsync":
        monkeypatch.setattr(os, "fsync", boom)
    else:
        # the disk fills up half-way through the data section
        real_fdopen = os.fdopen

        def fdopen(fd, *a, **k):
            f = real_fdopen(fd, *a, **k)
            real_write, calls = f.write, []

            def write(b):
                calls.append(len(b))
                if len(calls) == 3:
                    real_write(b[: len(b) // 2])
                    raise OSError(28, "No space left on device")
                return real_write(b)

            f.write = write
            return f

        monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises((Boom, OSError)):
        small_model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before, "the old model file was modified by a failed save"
    assert sorted(os.listdir(tmp_path)) == listing, "a temporary file was left behind"
    lstm_cpu.load(path)  # still a valid model
    small_model.save(path)  # and a later save succeeds
    assert lstm_cpu.load(path).run(np.zeros((1, 3)))[0].shape == (1, 5)


def test_packed_file_overwritten_in_place_does_not_crash_live_model(tmp_path):
    """A service keeps its model while an operator copies a new file over the old one in place
    (``cp`` truncates, then writes). The live model must keep working, not die of SIGBUS.
    (Regression: packed.load used to memory-map the weights; it now reads them once, and the
    bytes it checksums are the bytes it runs.)"""
    path = tmp_path / "m.lstm"
    LSTMModel(make_layers(16, 64, 1, seed=3)).save(path)
    r = run_child(f"""
        import numpy as np, lstm_cpu
        m = lstm_cpu.load({str(path)!r})
        s = m.stream()
        s.step(np.ones(16, np.float32))
        with open({str(path)!r}, "r+b") as f:
            f.truncate(64)
        s.step(np.ones(16, np.float32))
        print("ok")
    """, timeout=120)
    assert r is not None, "timed out"
    assert r.returncode == 0 and "ok" in r.stdout, (
        f"exit status {r.returncode} (-7 is SIGBUS: the weights are memory-mapped from the file)\n{r.stderr[-800:]}")


def test_load_fifo_does_not_hang(tmp_path):
    """A named pipe where a model file should be: refused, not an open() that blocks forever
    (regression: lstm_cpu.load used to hang here)."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    r = run_child(f"""
        import faulthandler, lstm_cpu
        print("imported", flush=True)
        faulthandler.dump_traceback_later(5, exit=True)  # a hang ends the child after 5 s
        try:
            lstm_cpu.load({str(fifo)!r})
        except lstm_cpu.LSTMError as e:
            print("refused", type(e).__name__)
    """, timeout=120)
    assert r is not None and "imported" in r.stdout, "the child did not start"
    assert "refused" in r.stdout, ("lstm_cpu.load blocked on a FIFO (open() waits for a writer forever)\n"
                                   + r.stderr[-800:])


def test_packed_trailing_bytes_refused_before_hashing(tmp_path, small_model):
    """A valid 1 KB model followed by 512 MiB of (sparse) zeros: refused from the header alone
    (regression: it used to be hashed in full, ~4.5 s per GiB, before the checksum refused it)."""
    path = tmp_path / "m.lstm"
    small_model.save(path)
    with open(path, "r+b") as f:
        f.truncate(512 << 20)  # sparse: no disk used
    t = time.perf_counter()
    with pytest.raises(FormatError):
        lstm_cpu.load(path)
    assert time.perf_counter() - t < 0.5, f"refusing took {time.perf_counter() - t:.1f} s (hashed the padding)"


def test_onnx_file_over_protobuf_limit_refused_without_reading(tmp_path):
    """A (sparse) 2.5 GiB .onnx under a 2 GiB address-space limit: refused from its size
    (regression: the importer used to read the whole file, MemoryError escaped)."""
    pytest.importorskip("onnx")
    path = tmp_path / "big.onnx"
    with open(path, "wb") as f:
        f.write(b"\x08\x08")  # ir_version = 8, then zeros
        f.truncate((5 << 30) // 2)  # sparse 2.5 GiB
    r = run_child(f"""
        import lstm_cpu
        try:
            lstm_cpu.load({str(path)!r})
        except lstm_cpu.LSTMError as e:
            print("refused", type(e).__name__)
    """, timeout=120, mem_limit=2 << 30)
    assert r is not None, "timed out"
    assert "refused" in r.stdout, r.stderr[-600:]


def test_mmap_option_and_atomic_save_over_a_live_mapped_model(tmp_path):
    """With mmap=True the weights are shared pages of the file; model.save over the same path
    writes a new file and renames it, so the live mapping keeps the old inode: no SIGBUS, and
    the live model keeps its old weights while a reload sees the new ones."""
    path = tmp_path / "m.lstm"
    LSTMModel(make_layers(16, 64, 1, seed=3)).save(path)
    r = run_child(f"""
        import numpy as np, lstm_cpu
        from lstm_cpu import LSTMModel, LayerParams
        m = lstm_cpu.load({str(path)!r}, mmap=True)
        x = np.ones((3, 16), np.float32)
        before = m.run(x)[0]
        rng = np.random.default_rng(9)
        LSTMModel([[LayerParams(rng.normal(size=(256, 16)), rng.normal(size=(256, 64)), None)]]).save({str(path)!r})
        assert np.array_equal(m.run(x)[0], before), "the live model's weights changed"
        assert not np.array_equal(lstm_cpu.load({str(path)!r}).run(x)[0], before)
        print("ok")
    """, timeout=120)
    assert r is not None and r.returncode == 0 and "ok" in r.stdout, (r and r.stderr[-800:])


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom", "/proc/self/status"])
def test_special_files_refused(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with pytest.raises(FormatError):
        lstm_cpu.load(path)


# ---------------------------------------------------------------------------------------------
# Extreme inputs and the NaN policy (README: propagate; +-1e30 stays finite)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_huge_inputs_give_finite_outputs(dtype, kernel):
    layers = make_layers(8, 128, 2, seed=5, scale=1.0, peephole=True)
    for kw in ({}, {"clip": 5.0}, {"head": (np.ones((3, 128)), np.zeros(3))}):
        m = LSTMModel(layers, dtype=dtype, **kw)
        s = m.stream(kernel=kernel)
        # +-1e30 is the README's promise; beyond ~1e37 a float32 sum of +-w*x can overflow to
        # +-inf and inf - inf is NaN: that is the NaN policy (propagate), not a crash.
        for v in (1e30, -1e30, 1e30 if dtype == np.float32 else 1e300):
            x = np.full(8, v, dtype)
            x[::2] *= -1
            x[1] = 0.5
            for _ in range(3):
                y = s.step(x)
                assert np.all(np.isfinite(y)), (v, y)
            assert all(np.all(np.isfinite(a)) for a in s.state)
        xs = np.random.default_rng(0).choice([1e30, -1e30], size=(5, 2, 8)).astype(dtype)
        y, (h, c) = m.run(xs, kernel=kernel)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(h)) and np.all(np.isfinite(c))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
@pytest.mark.parametrize("N", [3, 6, MANY])  # remainder only; a group of 4 + 2; many
def test_nan_policy_propagate_isolate_reset(bad, kernel, N):
    """A NaN input poisons its own stream's outputs and state (no silent repair, no exception),
    leaves the other streams of a batch bit-identical, and reset() recovers.

    An Inf input is the limit of a huge input: gates saturate, so the outputs may stay finite
    (or become NaN where inf - inf or 0 * inf occurs); either way no exception, other streams
    untouched, and reset() recovers."""
    m = LSTMModel(make_layers(8, 128, 2, seed=6))
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((6, N, 8)).astype(np.float32)  # (T, N, I)
    clean = m.stream(batch=N, kernel=kernel)
    ref = np.stack([clean.step(xs[t]) for t in range(6)])
    s = m.stream(batch=N, kernel=kernel)
    out = []
    for t in range(6):
        x = xs[t].copy()
        if t == 2:
            x[1, 4] = bad
        out.append(s.step(x))
    out = np.stack(out)  # (T, N, out)
    others = [k for k in range(N) if k != 1]  # stream 1 shares its group of four with 0, 2, 3
    np.testing.assert_array_equal(out[:, others], ref[:, others])  # other streams untouched
    np.testing.assert_array_equal(out[:2, 1], ref[:2, 1])
    h, c = s.state
    assert not np.any(np.isnan(h[:, others])) and not np.any(np.isnan(c[:, others]))
    if np.isnan(bad):
        assert np.all(np.isnan(out[2:, 1])), "NaN did not propagate through the poisoned stream's state"
        assert np.all(np.isnan(h[:, 1])) and np.all(np.isnan(c[:, 1]))
    s.reset()
    np.testing.assert_array_equal(np.stack([s.step(xs[t]) for t in range(6)]), ref)
    # single stream: step() and run() agree on the policy
    one = m.stream(kernel=kernel)
    x = xs[:, 0].copy()
    x[1, 0] = bad
    ys = one.run(x)
    assert np.all(np.isfinite(ys[0]))
    if np.isnan(bad):
        assert np.all(np.isnan(ys[1:]))
    one.reset()
    fresh = m.stream(kernel=kernel).run(xs[:, 0])
    np.testing.assert_array_equal(one.run(xs[:, 0]), fresh)
    np.testing.assert_array_equal(fresh, ref[:, 0])  # a batched stream: a lone stream's bits


def test_nonfinite_weights_refused():
    layers = make_layers(3, 5, 1)
    layers[0][0].w_hh[3, 2] = np.nan
    with pytest.raises(LSTMError, match="NaN or Inf"):
        LSTMModel(layers)


# ---------------------------------------------------------------------------------------------
# Threads: 8 threads x 16 streams each, both kernels, bit-identical to sequential stepping
# ---------------------------------------------------------------------------------------------
N_THREADS, PER_THREAD, T_STEPS = 8, 16, 24


@pytest.fixture(scope="module")
def shared_model():
    # kernel="parallel" packs one column chunk per thread (2 here), so "parallel" really is parallel.
    return LSTMModel(make_layers(32, 256, 2, seed=11), kernel="parallel")


def _xs(k):
    return np.random.default_rng(5000 + k).standard_normal((T_STEPS, 32)).astype(np.float32)  # (T, I)


@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_threads_bit_identical_to_sequential(shared_model, kernel):
    m = shared_model
    n = N_THREADS * PER_THREAD
    xs = [_xs(k) for k in range(n)]
    # sequential reference: one stream at a time
    ref = []
    for k in range(n):
        s = m.stream(kernel=kernel)
        ref.append(np.stack([s.step(xs[k][t]) for t in range(T_STEPS)]))
    results = [None] * n
    errors = []
    barrier = threading.Barrier(N_THREADS)

    def worker(w):
        try:
            ks = range(w * PER_THREAD, (w + 1) * PER_THREAD)
            streams = {k: m.stream(kernel=kernel) for k in ks}
            ys = {k: np.empty((T_STEPS, m.output_size), np.float32) for k in ks}
            barrier.wait()
            for t in range(T_STEPS):  # interleaved: every thread steps all its streams each tick
                for k in ks:
                    streams[k].step(xs[k][t], out=ys[k][t])
            for k in ks:
                results[k] = ys[k]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    for k in range(n):
        np.testing.assert_array_equal(results[k], ref[k], err_msg=f"stream {k}")


def test_streams_created_and_dropped_from_many_threads(shared_model):
    m = shared_model
    x = _xs(0)[:3]
    ref_s = m.stream()
    ref = np.stack([ref_s.step(x[t]) for t in range(3)])
    errors, done = [], []

    def worker(w):
        try:
            for i in range(24):
                s = m.stream(kernel="parallel" if (w + i) % 2 else "serial")
                y = np.stack([s.step(x[t]) for t in range(3)])
                if not np.array_equal(y, ref):
                    errors.append(f"thread {w} stream {i} differs")
                if i % 7 == 0:
                    sb = m.stream(batch=4)
                    sb.step(np.repeat(x[:1], 4, axis=0))
                del s
                if i % 20 == 0:
                    gc.collect()
            done.append(w)
        except BaseException as e:  # pragma: no cover
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:5]
    assert sorted(done) == list(range(N_THREADS))


# ---------------------------------------------------------------------------------------------
# Long runs: flat memory, bounded drift from float64
# ---------------------------------------------------------------------------------------------
def test_no_memory_growth_over_20000_steps_with_out():
    m = LSTMModel(make_layers(16, 64, 2, seed=12))
    s = m.stream()
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    y = np.empty(m.output_size, np.float32)
    for t in range(500):  # warm-up: compile, first-call caches
        s.step(x[t % 64], out=y)
    gc.collect()
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        cur0, _ = tracemalloc.get_traced_memory()
        for t in range(20000):
            s.step(x[t & 63], out=y)
        gc.collect()
        cur1, _ = tracemalloc.get_traced_memory()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = cur1 - cur0
    top = snap1.compare_to(snap0, "lineno")[:3]
    assert growth < 4096, f"traced memory grew by {growth} bytes over 20,000 steps: {top}"


# ---------------------------------------------------------------------------------------------
# A step with out= allocates nothing: an exact peak bound that one output array exceeds
# ---------------------------------------------------------------------------------------------
# tracemalloc sees numpy's buffers and, since Numba's runtime allocates through CPython's raw
# allocator (numba.core.runtime.nrt: memsys_use_cpython_allocator), every array a kernel
# allocates too (test_allocation_detector_sees_numba_allocations checks that premise). What a
# step with out= may allocate transiently is the call's small objects and the runtime's
# per-argument wrappers: measured 0.6-1.5 KB peak (a single stream to 40 streams on the BLAS
# path). The model's head has ALLOC_O outputs, so one output array is 16 KB per stream: far
# above the slack, and any per-step output allocation fails the bound.
ALLOC_SLACK = 4096  # bytes a step may hold at its peak (call objects, argument wrappers)
ALLOC_O = 4096  # head outputs: one float32 output row = 16 KB = 4 x ALLOC_SLACK


@pytest.fixture(scope="module")
def wide_model():
    """(I=16, H=64, L=2) with a linear head to ALLOC_O outputs: small weights, a large output."""
    rng = np.random.default_rng(15)
    head = (rng.uniform(-0.1, 0.1, (ALLOC_O, 64)), rng.uniform(-0.1, 0.1, ALLOC_O))
    return LSTMModel(make_layers(16, 64, 2, seed=15), head=head)


def _step_peak_bytes(step, steps=30):
    """Peak traced bytes above the starting level over ``steps`` calls of ``step()``."""
    for _ in range(3):  # compile and first-call caches outside the measurement
        step()
    gc.collect()
    tracemalloc.start()
    try:
        cur0, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for _ in range(steps):
            step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - cur0


def _assert_step_allocates_nothing(stream, batch):
    shape = (16,) if batch is None else (batch, 16)
    x = np.random.default_rng(16).standard_normal(shape).astype(np.float32)
    y = np.empty(shape[:-1] + (ALLOC_O,), np.float32)  # (O,) or (N, O)
    assert y.nbytes >= 4 * ALLOC_SLACK  # one output array must not fit in the slack
    peak = _step_peak_bytes(lambda: stream.step(x, out=y))
    assert peak <= ALLOC_SLACK, (
        f"a step with out= reached {peak} bytes (allowed {ALLOC_SLACK}; one output is {y.nbytes})")


@pytest.mark.parametrize("batch", [None, 5, MANY], ids=["single", "batch5", "batch40"])
@pytest.mark.parametrize("kernel", ["serial", "parallel"])
def test_step_with_out_allocates_nothing(wide_model, kernel, batch):
    _assert_step_allocates_nothing(wide_model.stream(batch=batch, kernel=kernel), batch)


def test_allocation_detector_fires_on_one_output_per_step(wide_model, monkeypatch):
    """The bound above fails for a step that allocates one output array (numpy, in Python)."""
    real = lstm_cpu.Stream.step

    def leaky_step(self, x, out=None):
        y = real(self, x)  # a fresh output array every step
        if out is not None:
            out[...] = y
        return y

    s = wide_model.stream(kernel="serial")
    # on the instance: a single float stream's step is its own closure (Stream._one_stream_step)
    monkeypatch.setattr(s, "step", types.MethodType(leaky_step, s))
    with pytest.raises(AssertionError, match="a step with out= reached"):
        _assert_step_allocates_nothing(s, None)


def test_allocation_detector_sees_numba_allocations(wide_model, monkeypatch):
    """...and for a kernel that allocates its output inside Numba (NRT, not numpy)."""
    from numba import njit

    @njit(cache=False)
    def fresh_copy(y):  # y (O,) -> a new (O,) array, allocated by Numba's runtime
        t = np.empty_like(y)
        t[:] = y
        return t

    real = lstm_cpu.Stream.step

    def step_then_numba_alloc(self, x, out=None):
        real(self, x, out=out)
        return fresh_copy(out)

    s = wide_model.stream(kernel="serial")
    monkeypatch.setattr(s, "step", types.MethodType(step_then_numba_alloc, s))
    with pytest.raises(AssertionError, match="a step with out= reached"):
        _assert_step_allocates_nothing(s, None)


def test_long_run_float32_tracks_float64():
    """20,000 steps of a (I=64, H=128, L=2) float32 stream stay within 1e-4 of the same weights
    in float64: the rational tanh's error (~2e-7) must not accumulate through the recurrence."""
    I, H, L, T = 64, 128, 2, 20000
    layers = make_layers(I, H, L, seed=13)
    # serial: the float64 model is over the 1 MB parallel threshold, and on a shared 2-core
    # machine waking a second thread per step costs more than it saves
    m32 = LSTMModel(layers, kernel="serial")
    m64 = LSTMModel(layers, dtype=np.float64, kernel="serial")
    rng = np.random.default_rng(14)
    s32, s64 = m32.stream(), m64.stream()
    worst = 0.0
    chunk = 1000
    for start in range(0, T, chunk):
        x = rng.standard_normal((chunk, I))
        y32 = np.stack([s32.step(x[t].astype(np.float32)) for t in range(chunk)])
        y64 = s64.run(x)
        worst = max(worst, float(np.max(np.abs(y32 - y64))))
    h32, c32 = s32.state
    h64, c64 = s64.state
    worst_state = float(np.max(np.abs(c32 - c64)))
    assert worst < 1e-4, f"max |y32 - y64| over {T} steps = {worst:.3g}"
    assert worst_state < 1e-3, worst_state


def test_state_snapshot_restore_resumes_bit_identically(shared_model):
    """The service pattern: snapshot s.state, keep going, restore, replay -> identical outputs."""
    s = shared_model.stream()
    xs = _xs(1)
    for t in range(10):
        s.step(xs[t])
    snap = s.state
    a = np.stack([s.step(xs[t]) for t in range(10, 20)])
    s.state = snap
    b = np.stack([s.step(xs[t]) for t in range(10, 20)])
    np.testing.assert_array_equal(a, b)
    other = shared_model.stream()
    other.state = snap
    np.testing.assert_array_equal(np.stack([other.step(xs[t]) for t in range(10, 20)]), a)
