"""lstm_cpu.bench.report: the text report of a hand-made result, and the public JSON."""

from __future__ import annotations

import json

from lstm_cpu.bench.report import format_report, public_result


def _result(batch=1, mismatch=False):
    def rt(p50, kind, ratio):
        return {"p50_us": p50, "p90_us": p50 * 1.5, "p99_us": p50 * 2, "max_us": p50 * 10,
                "steps_per_s": 1e6 / p50, "samples_per_s": batch * 1e6 / p50, "kind": kind,
                "ratio_to_ours": ratio}

    return {
        "config": {"mode": "step" if batch == 1 else "streams", "batch": batch, "seq_len": None,
                   "threads": 1, "steps": 100, "warmup": 10, "rounds": 5},
        "model": {"source": "embedded I=4 H=8 L=1 seed=0", "input_size": 4, "hidden_size": 8,
                  "proj_size": 0, "num_layers": 1, "num_directions": 1, "dtype": "float32",
                  "weight_bytes": 2_000_000},
        "machine": {"cpu": "AMD EPYC 9B14", "vector_extensions": ["avx2", "avx512f", "avx512_vnni"],
                    "cores": 2},
        "versions": {"numpy": "2.4", "numba": "0.68", "torch": "2.13.0"},
        "ours": {"first_call_s": 0.5, "cold_call_us": 12.0, "stream_create_us": 3.0},
        "notes": ["check torch: ok"],
        "runtimes": {"lstm-cpu": rt(4.0, "ours", 1.0), "torch": rt(80.0, "peer", 20.0),
                     "numpy BLAS (bound)": rt(3.0, "bound", 0.75)},
        "checks": {"torch": {"ok": not mismatch, "max_abs_diff": 1e-3 if mismatch else 1e-8}},
        "bandwidth": {"weight_bytes": 2_000_000, "ours_gb_s": 500.0, "bound_gb_s": 666.7,
                      "memory_copy_gb_s": 30.0, "memory_copy_mb": 256, "flops_per_step": 64e6,
                      "ours_gflop_s": 16.0 if batch > 1 else None, "bound_gflop_s": 21.3},
        "mismatch": mismatch,
        "_durations_us": {"lstm-cpu": [4.0, 4.1]},
    }


def test_report_header_names_cpu_and_vector_extensions():
    text = format_report(_result())
    machine = next(ln for ln in text.splitlines() if ln.startswith("machine "))
    assert "AMD EPYC 9B14 (avx2 avx512f avx512_vnni), 2 cores" in machine
    assert "torch 2.13.0" in machine
    assert "2.00 MB of weights" in text


def test_report_rows_ratios_and_units():
    lines = format_report(_result()).splitlines()
    torch_row = next(ln for ln in lines if ln.startswith("torch"))
    # p50 80.0 (>= 10: one decimal), p99 160.0, max 800.0, 12,500 steps/s, ratio 20.00
    assert torch_row.split() == ["torch", "80.0", "120.0", "160.0", "800.0", "12,500", "20.00"]
    bound_row = next(ln for ln in lines if ln.startswith("numpy BLAS (bound)"))
    assert bound_row.split()[3:] == ["3.00", "4.50", "6.00", "30.0", "333,333"]  # no ratio
    assert "samples/s" not in "\n".join(lines)
    assert any(ln.startswith("weights 2.00 MB/step: lstm-cpu 500.0 GB/s") for ln in lines)


def test_report_batched_shows_samples_and_gflops():
    text = format_report(_result(batch=16))
    assert "samples/s" in text
    assert "batch 16: matrix products 64.0 MFLOP/step: lstm-cpu 16.0 GFLOP/s" in text


def test_report_flags_a_mismatch():
    text = format_report(_result(mismatch=True))
    assert next(ln for ln in text.splitlines() if ln.startswith("torch")).endswith("MISMATCH")
    assert text.splitlines()[-1].startswith("!!!")
    assert "MISMATCH" not in format_report(_result())


def test_public_result_drops_raw_durations_and_is_json():
    res = _result()
    pub = public_result(res)
    assert "_durations_us" not in pub and "_durations_us" in res
    assert json.loads(json.dumps(pub))["machine"]["vector_extensions"][-1] == "avx512_vnni"
