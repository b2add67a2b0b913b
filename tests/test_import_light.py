"""``import lstm_cpu`` stays light: the runtime never imports torch or onnx.

Each check runs in a fresh interpreter (this test process may already have torch loaded). In the
"blocked" variant a ``sys.meta_path`` finder makes torch / onnx / onnxruntime unimportable, as on
a deployment box that has neither: building, running, streaming, saving and loading a packed
model must still work, and so must reading a numpy state dict and a .safetensors file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "onnx", "onnxruntime", "onnxscript")

BLOCKER = textwrap.dedent(f"""
    import sys

    class _Blocker:
        '''Refuse torch / onnx: any attempt to import them fails like a missing package.'''
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ImportError(f"{{name}} is blocked by test_import_light")
            return None

    sys.meta_path.insert(0, _Blocker())
""")

CHECK_HEAVY = textwrap.dedent(f"""
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
    assert not loaded, f"heavy modules were imported: {{loaded}}"
""")


def _run(code, tmp_path, block):
    script = (BLOCKER if block else "import sys\n") + textwrap.dedent(code) + CHECK_HEAVY + "print('OK')\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), (
        f"subprocess failed (rc={p.returncode})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
    )


@pytest.mark.parametrize("block", [False, True], ids=["plain", "torch-onnx-blocked"])
def test_import_lstm_cpu_is_light(tmp_path, block):
    _run("""
        import lstm_cpu
        from lstm_cpu import errors, spec
        from lstm_cpu.model import LSTMModel
    """, tmp_path, block)


@pytest.mark.parametrize("block", [False, True], ids=["plain", "torch-onnx-blocked"])
def test_run_stream_save_load_without_torch(tmp_path, block):
    _run("""
        import numpy as np
        import lstm_cpu
        from lstm_cpu.model import LSTMModel
        from lstm_cpu.spec import LayerParams

        rng = np.random.default_rng(0)
        H, I = 6, 3
        p = LayerParams(w_ih=rng.standard_normal((4 * H, I)), w_hh=rng.standard_normal((4 * H, H)),
                        bias=rng.standard_normal(4 * H))
        model = LSTMModel([[p]])
        x = rng.standard_normal((5, I)).astype(np.float32)
        y, _ = model.run(x)
        s = model.stream()
        ys = np.stack([s.step(x[t]) for t in range(5)])
        assert np.allclose(ys, y, atol=1e-6)
        model.save("m.lstm")
        loaded = lstm_cpu.load("m.lstm")
        y2, _ = loaded.run(x)
        assert np.array_equal(y2, y), (y2, y)
    """, tmp_path, block)


def test_numpy_state_dict_and_safetensors_without_torch(tmp_path):
    """The torch importer itself needs no torch for numpy dicts and .safetensors files."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(1)
    H, I = 4, 3
    sd = {
        "rnn.weight_ih_l0": rng.standard_normal((4 * H, I)).astype(np.float32),
        "rnn.weight_hh_l0": rng.standard_normal((4 * H, H)).astype(np.float32),
        "rnn.bias_ih_l0": rng.standard_normal(4 * H).astype(np.float32),
        "rnn.bias_hh_l0": rng.standard_normal(4 * H).astype(np.float32),
        "fc.weight": rng.standard_normal((2, H)).astype(np.float32),
        "fc.bias": rng.standard_normal(2).astype(np.float32),
    }
    safetensors_numpy.save_file(sd, str(tmp_path / "m.safetensors"))
    np.savez(tmp_path / "sd.npz", **sd)
    torch_file = tmp_path / "m.pt"
    torch_file.write_bytes(b"PK\x03\x04 not really a checkpoint")
    _run("""
        import numpy as np
        from lstm_cpu.importers.torch_lstm import from_torch, load_torch_file
        from lstm_cpu.errors import LSTMError

        sd = dict(np.load("sd.npz"))
        a = from_torch(sd, head="fc")
        b = load_torch_file("m.safetensors", head="fc")
        assert a.output_size == 2 and b.output_size == 2
        x = np.random.default_rng(2).standard_normal((7, 3)).astype(np.float32)
        assert np.array_equal(a.run(x)[0], b.run(x)[0])
        assert b.info()["source"]["format"] == "safetensors"
        try:
            load_torch_file("m.pt")  # a .pt needs torch: a clear LSTMError, not ImportError
        except LSTMError as e:
            assert "torch" in str(e), e
        else:
            raise AssertionError("reading a .pt without torch should fail")
    """, tmp_path, block=True)
