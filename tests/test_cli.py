"""The ``lstm-cpu`` command, driven through ``cli.main(argv)`` (one subprocess for ``python -m``).

Fast on purpose: tiny models, a few timed steps, no timing values checked (only the fields).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lstm_cpu import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("bench", "convert", "info", "run", "warmup")
# A tiny embedded model and a short run: what every bench test passes.
TINY_BENCH = ["bench", "--size", "4,8,1", "--steps", "12", "--warmup", "2", "--rounds", "3",
              "--membw-mb", "1", "--no-progress"]


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``lstm-cpu argv``."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got: {err!r}"
    assert lines[0].startswith("lstm-cpu: error: "), lines[0]
    assert "Traceback" not in err


@pytest.fixture
def torch_pt(tmp_path):
    """A 2-layer nn.LSTM state dict saved as .pt, and the module itself."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    m = torch.nn.LSTM(6, 10, num_layers=2).eval()
    path = tmp_path / "lstm.pt"
    torch.save(m.state_dict(), path)
    return path, m


# ---------------------------------------------------------------------------------------------
# Help and usage
# ---------------------------------------------------------------------------------------------
def test_module_help_subprocess():
    # -X importtime lists every module imported on stderr: --help must not pull in the peers.
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "lstm_cpu", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    for c in COMMANDS:
        assert c in p.stdout
    imported = {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in p.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "lstm_cpu" in imported
    heavy = imported & {"torch", "onnxruntime", "openvino", "onnx", "tqdm", "matplotlib"}
    assert not heavy, f"imported at module level: {sorted(heavy)}"


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: lstm-cpu {command}")


def test_bench_help_documents_options(capsys):
    _, out, _ = run_cli(capsys, "bench", "--help")
    for opt in ("--steps", "--warmup", "--threads", "--seq-len", "--mode", "--batch",
                "--compare", "--json", "--plot", "--size"):
        assert opt in out


def test_no_command_is_usage_error(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2
    assert_one_line_error(err)


@pytest.mark.parametrize("argv", [
    ["bench", "--bogus"],
    ["bench", "--steps", "0"],
    ["bench", "--mode", "sideways"],
    ["bench", "--size", "4,8"],
    ["bench", "--compare", "tensorflow"],
    ["bench", "--batch", "4"],          # step mode is batch 1
    ["run", "model.onnx"],              # --input is required
    ["info"],
    ["frobnicate"],
])
def test_bad_usage_exit_2_one_line(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert_one_line_error(err)


# ---------------------------------------------------------------------------------------------
# Failures: missing and unreadable files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["info", "bench", "convert"])
def test_missing_model_exit_1_one_line(capsys, tmp_path, command):
    missing = str(tmp_path / "nope.onnx")
    argv = [command, missing] + ([str(tmp_path / "out.lstm")] if command == "convert" else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert_one_line_error(err)
    assert "nope.onnx" in err


def test_unreadable_model_exit_1(capsys, tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(b"\x08this is not a protobuf at all" * 3)
    code, _, err = run_cli(capsys, "info", str(bad))
    assert code == 1
    assert_one_line_error(err)


def test_debug_prints_traceback(capsys, tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    code, _, err = run_cli(capsys, "info", str(bad), "--debug")
    assert code == 1
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("lstm-cpu: error: ")


def test_run_missing_input_exit_1(capsys, torch_pt, tmp_path):
    code, _, err = run_cli(capsys, "run", str(torch_pt[0]), "--input", str(tmp_path / "x.npy"))
    assert code == 1
    assert_one_line_error(err)


def test_run_refuses_pickled_npy(capsys, torch_pt, tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = run_cli(capsys, "run", str(torch_pt[0]), "--input", str(path))
    assert code == 1
    assert_one_line_error(err)
    assert "pickle" in err


def test_run_wrong_input_size_exit_1(capsys, torch_pt, tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 7), np.float32))  # the model takes 6 inputs
    code, _, err = run_cli(capsys, "run", str(torch_pt[0]), "--input", str(path))
    assert code == 1
    assert_one_line_error(err)
    assert "6" in err and "(3, 7)" in err


# ---------------------------------------------------------------------------------------------
# convert -> info -> run
# ---------------------------------------------------------------------------------------------
def test_convert_then_info_round_trip(capsys, torch_pt, tmp_path):
    pt, _ = torch_pt
    packed = tmp_path / "lstm.lstm"
    code, out, err = run_cli(capsys, "convert", str(pt), str(packed))
    assert code == 0, err
    assert packed.exists() and str(packed) in out

    code, out, err = run_cli(capsys, "info", str(packed), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["input_size"], info["hidden_size"], info["num_layers"]) == (6, 10, 2)
    assert info["num_directions"] == 1 and info["proj_size"] == 0
    # 4H (in + H) weights + 4H folded biases per layer; in = 6, then 10.
    assert info["parameters"] == (40 * (6 + 10) + 40) + (40 * (10 + 10) + 40)
    assert info["weight_bytes"] > 0

    code, out, _ = run_cli(capsys, "info", str(packed))
    assert code == 0
    for label in ("source", "input size", "hidden size", "projection", "layers", "directions",
                  "activations", "parameters", "weight bytes"):
        assert label in out


def test_convert_onnx_node_option(capsys, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("lstm_cpu.importers.onnx_lstm")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    I, H = 3, 5
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W", (1, 4 * H, I)), ("R", (1, 4 * H, H)), ("B", (1, 8 * H)))]
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y"], name="my_lstm", hidden_size=H)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out_path = tmp_path / "m.lstm"
    code, _, err = run_cli(capsys, "convert", str(src), str(out_path), "--node", "my_lstm")
    assert code == 0, err
    code, out, err = run_cli(capsys, "info", str(out_path), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["input_size"], info["hidden_size"]) == (I, H)
    code, _, err = run_cli(capsys, "convert", str(src), str(out_path), "--node", "nope")
    assert code == 1
    assert_one_line_error(err)


def test_run_npy_matches_model_and_stream(capsys, torch_pt, tmp_path):
    torch = pytest.importorskip("torch")
    pt, module = torch_pt
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3, 6)).astype(np.float32)  # (T, B, I)
    xin, yout, ystream = tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "ys.npy"
    np.save(xin, x)
    code, _, err = run_cli(capsys, "run", str(pt), "--input", str(xin), "--output", str(yout))
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", str(pt), "-i", str(xin), "-o", str(ystream), "--stream")
    assert code == 0, err
    with torch.no_grad():
        want = module(torch.from_numpy(x))[0].numpy()  # (T, B, H)
    y = np.load(yout, allow_pickle=False)
    assert y.shape == (7, 3, 10)
    np.testing.assert_allclose(y, want, atol=1e-5)
    np.testing.assert_allclose(np.load(ystream, allow_pickle=False), want, atol=1e-5)

    # (T, I) without --output: a summary, and --json gives the shapes.
    np.save(xin, x[:, 0])
    code, out, err = run_cli(capsys, "run", str(pt), "--input", str(xin), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["input_shape"] == [7, 6] and summary["output_shape"] == [7, 10]


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------
def _bench_json(capsys, *extra):
    code, out, err = run_cli(capsys, *TINY_BENCH, "--json", *extra)
    assert code == 0, err
    return json.loads(out), err


def test_bench_json_fields_ours_only(capsys):
    res, _ = _bench_json(capsys, "--compare", "none")
    assert res["schema"] == "lstm-cpu-bench/1"
    assert res["config"]["mode"] == "step" and res["config"]["batch"] == 1
    assert res["config"]["steps"] == 12 and res["config"]["threads"] == 1
    m = res["model"]
    assert (m["input_size"], m["hidden_size"], m["num_layers"]) == (4, 8, 1)
    ours = res["runtimes"]["lstm-cpu"]
    for k in ("p50_us", "p90_us", "p99_us", "max_us", "steps_per_s", "ratio_to_ours"):
        assert k in ours
    assert ours["calls"] == 12 and ours["ratio_to_ours"] == pytest.approx(1.0)
    assert ours["p50_us"] <= ours["p90_us"] <= ours["p99_us"] <= ours["max_us"]
    assert "numpy BLAS (bound)" in res["runtimes"]
    for k in ("first_call_s", "cold_call_us", "steady_p50_us"):
        assert k in res["ours"]
    bw = res["bandwidth"]
    assert bw["weight_bytes"] > 0 and bw["memory_copy_gb_s"] > 0 and bw["bound_gb_s"] > 0
    for k in ("cpu", "cores"):
        assert k in res["machine"]
    assert res["versions"]["numba"] and res["command"].startswith("lstm-cpu bench")
    assert res["checks"] == {} and res["mismatch"] is False


def test_bench_json_with_torch_peer(capsys):
    pytest.importorskip("torch")
    res, err = _bench_json(capsys, "--compare", "torch")
    assert res["checks"]["torch"]["ok"] is True
    assert res["checks"]["torch"]["max_abs_diff"] < 1e-4
    assert "check torch" in err  # notes go to stderr in --json mode
    t = res["runtimes"]["torch"]
    assert t["calls"] == 12 and t["ratio_to_ours"] > 0


def test_bench_json_with_onnxruntime_peer(capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("lstm_cpu.importers.onnx_export")
    res, _ = _bench_json(capsys, "--compare", "onnxruntime")
    assert res["checks"]["onnxruntime"]["ok"] is True, res["checks"]
    assert res["runtimes"]["onnxruntime"]["calls"] == 12


@pytest.mark.parametrize("mode,extra", [
    ("streams", ["--batch", "3"]),
    ("sequence", ["--seq-len", "5", "--batch", "2", "--steps", "3", "--warmup", "1"]),
])
def test_bench_modes(capsys, mode, extra):
    peers = "torch" if _has("torch") else "none"
    res, _ = _bench_json(capsys, "--mode", mode, "--compare", peers, *extra)
    assert res["config"]["mode"] == mode
    if peers == "torch":
        assert res["checks"]["torch"]["ok"] is True
    assert set(res["runtimes"]) >= {"lstm-cpu", "numpy BLAS (bound)"}


def test_bench_text_report_and_plot(capsys, tmp_path):
    png = tmp_path / "lat.png"
    code, out, err = run_cli(capsys, *TINY_BENCH, "--compare", "none", "--plot", str(png))
    assert code == 0, err
    assert "p50" in out and "lstm-cpu" in out and "GB/s" in out
    if _has("matplotlib"):
        assert png.exists() and png.stat().st_size > 0
    else:
        assert "matplotlib" in err


def test_bench_model_file(capsys, torch_pt):
    code, out, err = run_cli(capsys, "bench", str(torch_pt[0]), "--steps", "5", "--warmup", "1",
                             "--compare", "none", "--membw-mb", "0", "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["model"]["input_size"] == 6


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def test_bench_mismatch_is_loud(capsys, monkeypatch):
    pytest.importorskip("torch")
    from lstm_cpu.bench.runners.torch import TorchRunner

    real = TorchRunner.outputs
    monkeypatch.setattr(TorchRunner, "outputs", lambda self, xs: real(self, xs) + 1e-3)
    res, err = _bench_json(capsys, "--compare", "torch")
    assert res["mismatch"] is True and res["checks"]["torch"]["ok"] is False
    assert "MISMATCH torch" in err


def test_bench_restores_thread_counts(capsys):
    import numba

    before = numba.get_num_threads()
    _bench_json(capsys, "--compare", "none", "--threads", "1")
    assert numba.get_num_threads() == before


def test_every_subpackage_is_installed():
    """`lstm-cpu bench` works from a wheel only if pyproject lists lstm_cpu.bench and its runners:
    every folder of lstm_cpu/ with an __init__.py must be in [tool.setuptools] packages."""
    import re

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        listed = re.search(r"^packages\s*=\s*\[(.*?)\]", f.read(), re.M | re.S).group(1)
    listed = set(re.findall(r'"([^"]+)"', listed))
    pkg = os.path.join(ROOT, "lstm_cpu")
    found = {"lstm_cpu"}
    for dirpath, dirnames, files in os.walk(pkg):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and d != "importers"]
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert {"lstm_cpu.bench", "lstm_cpu.bench.runners"} <= found
    assert found <= listed, f"not installed by pyproject: {sorted(found - listed)}"


def test_bench_too_many_threads_is_usage_error(capsys):
    import numba

    code, _, err = run_cli(capsys, *TINY_BENCH, "--threads", str(numba.config.NUMBA_NUM_THREADS + 1))
    assert code == 2
    assert_one_line_error(err)
