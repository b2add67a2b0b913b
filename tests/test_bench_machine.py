"""lstm_cpu.bench.machine: CPU facts from /proc/cpuinfo text, and thread pins that restore."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import pytest

from lstm_cpu.bench import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two processors of an AVX-512 server (abridged) and one of an AVX2-only laptop, as Linux prints them.
EPYC = textwrap.dedent("""\
    processor\t: 0
    vendor_id\t: AuthenticAMD
    model name\t: AMD EPYC 9B14
    flags\t\t: fpu sse sse2 avx avx2 fma bmi2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512_bitalg
    bogomips\t: 5200.00

    processor\t: 1
    model name\t: AMD EPYC 9B14
    flags\t\t: fpu sse sse2 avx avx2 fma bmi2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni avx512_bitalg
""")
LAPTOP = ("processor\t: 0\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-1260P\n"
          "flags\t\t: fpu sse4_2 avx avx2 fma avx_vnni\n")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sve\n"


def test_cpu_model_and_vector_extensions_from_cpuinfo():
    assert machine.cpu_model(EPYC) == "AMD EPYC 9B14"
    assert machine.vector_extensions(EPYC) == [
        "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"]
    assert machine.cpu_model(LAPTOP) == "12th Gen Intel(R) Core(TM) i7-1260P"
    assert machine.vector_extensions(LAPTOP) == ["avx", "avx2", "fma", "avx_vnni"]
    assert machine.vector_extensions(ARM) == ["asimd", "sve"]
    assert machine.vector_extensions("") == []


def test_machine_info_records_this_cpus_flags():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo on this OS")
    with open("/proc/cpuinfo") as f:
        first = f.read().split("\n\n")[0]
    flags = set()
    for line in first.splitlines():
        if line.split(":")[0].strip() in ("flags", "Features"):
            flags = set(line.split(":", 1)[1].split())
    info = machine.machine_info()
    assert set(info["vector_extensions"]) == flags & set(machine.VECTOR_FLAGS)
    assert info["cpu"] and info["cores"] >= 1


def test_thread_pins_set_then_restore_numba_and_blas():
    pins = machine.ThreadPins()
    before_numba = numba.get_num_threads()
    before_blas = machine.blas_threads()
    other = 1 if before_numba != 1 else numba.config.NUMBA_NUM_THREADS
    pins.pin("numba", other)
    assert numba.get_num_threads() == other
    if before_blas is not None:
        blas_other = 1 if before_blas != 1 else 2
        pins.pin("blas", blas_other)
        assert machine.blas_threads() == blas_other
    pins.pin("numba", 1)  # a second pin keeps the count found first
    pins.pin(None, 1)  # a runtime whose count is fixed at construction: nothing to do
    pins.restore()
    assert numba.get_num_threads() == before_numba
    assert machine.blas_threads() == before_blas


def test_pinning_torch_never_imports_it():
    code = ("import sys\nfrom lstm_cpu.bench.machine import ThreadPins\n"
            "p = ThreadPins(); p.pin('torch', 1); p.restore()\n"
            "assert 'torch' not in sys.modules\nprint('OK')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-2000:]


def test_import_light_bench_is_separate():
    """`import lstm_cpu` does not load the bench package; the bench package loads no peer."""
    code = textwrap.dedent("""
        import sys
        import lstm_cpu
        assert not any(m.startswith("lstm_cpu.bench") for m in sys.modules), "bench imported"
        import lstm_cpu.bench
        heavy = {"torch", "onnx", "onnxruntime", "openvino", "matplotlib", "tqdm"}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        assert not loaded, loaded
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-2000:]
