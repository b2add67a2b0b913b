"""lstm_cpu/policy.py: one kernel policy, used by every path, and results that do not depend on it
or on the machine's thread count."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lstm_cpu import InputError, LayerParams, LSTMModel, policy
from conftest import MANY
from lstm_cpu.policy import (BATCH_PARALLEL_MIN_BYTES, LONE_SEQUENCE_MIN_BYTES,
                             PARALLEL_MIN_WEIGHT_BYTES, SPLIT_MIN_STREAMS, SPLIT_MIN_WORK_BYTES,
                             choose_kernel)

MB = 1 << 20


@pytest.mark.parametrize("wbytes,streams,threads,requested,job,want", [
    # a lone stream: parallel only for big models and more than one thread
    (PARALLEL_MIN_WEIGHT_BYTES - 1, 1, 2, "auto", "step", "serial"),
    (PARALLEL_MIN_WEIGHT_BYTES, 1, 2, "auto", "step", "parallel"),
    (PARALLEL_MIN_WEIGHT_BYTES, 1, 1, "auto", "step", "serial"),
    # batched streams: bytes x streams decide
    (BATCH_PARALLEL_MIN_BYTES // 8, 8, 2, "auto", "step", "parallel"),
    (BATCH_PARALLEL_MIN_BYTES // 8 - 1, 8, 2, "auto", "step", "serial"),
    # many streams or sequences: the Numba kernels, whatever their number (no BLAS products)
    (1, MANY, 2, "auto", "step", "serial"),
    (1, MANY, 2, "parallel", "step", "parallel"),
    ((1 << 20) - 1, 64, 2, "auto", "step", "parallel"),
    ((1 << 20) - 1, 64, 1, "auto", "step", "serial"),
    (1, MANY, 2, "auto", "sequence", "serial"),
    (1, MANY, 2, "parallel", "sequence", "parallel"),
    ((1 << 20) - 1, MANY, 1, "auto", "sequence", "serial"),
    (1 << 20, MANY, 2, "serial", "sequence", "serial"),
    # an explicit request wins
    (1, 1, 1, "parallel", "step", "parallel"),
    (64 * MB, 1, 2, "serial", "step", "serial"),
    # whole sequences: bytes x sequences decide, a lone sequence included (no BLAS projection
    # next to Numba's threads since layout 7)
    (BATCH_PARALLEL_MIN_BYTES, 1, 2, "auto", "sequence", "parallel"),
    (BATCH_PARALLEL_MIN_BYTES - 1, 1, 2, "auto", "sequence", "serial"),
    (BATCH_PARALLEL_MIN_BYTES // 16, 16, 2, "auto", "sequence", "parallel"),
    (64 * MB, 1, 1, "auto", "sequence", "serial"),
    (1, 1, 2, "parallel", "sequence", "parallel"),
])
def test_choose_kernel_table(wbytes, streams, threads, requested, job, want):
    assert choose_kernel(wbytes, streams, threads, requested, job).name == want


@pytest.mark.parametrize("wbytes,threads,steps,want", [
    # a lone sequence of a smaller model: from LONE_SEQUENCE_MIN_BYTES, once long enough
    (LONE_SEQUENCE_MIN_BYTES, 2, -(-SPLIT_MIN_WORK_BYTES // LONE_SEQUENCE_MIN_BYTES), "parallel"),
    (LONE_SEQUENCE_MIN_BYTES, 2, SPLIT_MIN_WORK_BYTES // LONE_SEQUENCE_MIN_BYTES - 1, "serial"),
    (LONE_SEQUENCE_MIN_BYTES - 1, 2, 10 ** 6, "serial"),
    (LONE_SEQUENCE_MIN_BYTES, 1, 10 ** 6, "serial"),  # one thread
    (BATCH_PARALLEL_MIN_BYTES, 2, 3, "parallel"),  # large models: any length (as before)
])
def test_lone_sequences_of_smaller_models_go_parallel_when_long(wbytes, threads, steps, want):
    assert choose_kernel(wbytes, 1, threads, "auto", "sequence", steps).name == want
    # a lone stream's step never takes this rule
    assert choose_kernel(wbytes, 1, threads, "auto", "step", steps).name == "serial"


@pytest.mark.parametrize("wbytes,streams,threads,steps,want", [
    # a batch that splits into stream groups (no waiting between threads): total work decides
    (SPLIT_MIN_WORK_BYTES // (8 * 64), 8, 2, 64, "parallel"),
    (SPLIT_MIN_WORK_BYTES // (8 * 64), 8, 2, 63, "serial"),
    (1024, 2 * SPLIT_MIN_STREAMS - 1, 2, 10 ** 6, "serial"),  # groups too small
    (1024, 16, 1, 10 ** 6, "serial"),  # one thread
    (1024, 16, 2, 10 ** 6, "parallel"),
])
def test_split_batches_go_parallel_on_total_work(wbytes, streams, threads, steps, want):
    assert choose_kernel(wbytes, streams, threads, "auto", "sequence", steps).name == want
    # streaming steps never take this rule
    assert choose_kernel(1, streams, threads, "auto", "step", 10 ** 9).name == "serial"


@pytest.mark.parametrize("B,threads,C,Hp,want", [
    # (participants, panel ranges, unit ranges, stream groups)
    (1, 2, 256, 64, (2, 2, 1, 1)),  # a team; 64 units make one unit range
    (1, 2, 1024, 256, (2, 2, 2, 1)),
    (7, 2, 1024, 256, (2, 2, 2, 1)),  # 3 streams a group would not fill a register block
    (8, 2, 1024, 256, (2, 1, 1, 2)),  # two groups of four
    (64, 2, 1024, 256, (2, 1, 1, 2)),  # one group per thread
    (64, 4, 64, 16, (4, 1, 1, 4)),
    (3, 4, 64, 16, (4, 1, 1, 1)),  # one panel: one range
    (1, 1, 1024, 256, (1, 1, 1, 1)),
])
def test_sequence_team_shapes(B, threads, C, Hp, want):
    t = policy.sequence_team(B, threads, C, Hp)
    assert (t.participants, t.panel_ranges, t.unit_ranges, t.stream_groups) == want
    assert t.args() == want[:3]
    # the claim slots cover the team's three task lists
    assert t.tasks(B, True) == t.panel_ranges + -(-B // 4) * t.unit_ranges + B


def test_bad_request_is_a_typed_error():
    with pytest.raises(InputError, match="kernel must be one of"):
        choose_kernel(1, 1, 1, "fast")
    with pytest.raises(InputError):
        LSTMModel(_layers(np.random.default_rng(0), 3, 8), kernel="gpu")


def _layers(rng, I, H, L=1):
    return [[LayerParams(rng.normal(size=(4 * H, I if l == 0 else H)), rng.normal(size=(4 * H, H)),
                         rng.normal(size=4 * H))] for l in range(L)]


def test_every_path_asks_the_policy(monkeypatch):
    """Streams, batched streams and run() all go through policy.choose_kernel, and do what it says."""
    calls = []
    real = policy.choose_kernel

    def spy(wbytes, streams, threads, requested="auto", job="step", steps=1):
        choice = real(wbytes, streams, threads, requested, job, steps)
        calls.append((streams, requested, job, choice.name))
        return choice

    monkeypatch.setattr(policy, "choose_kernel", spy)
    m = LSTMModel(_layers(np.random.default_rng(1), 4, 16))
    assert m.stream().kernel == calls[-1][3] and calls[-1][:3] == (1, "auto", "step")
    many = m.stream(batch=MANY)
    assert many.kernel == calls[-1][3] and calls[-1][:3] == (MANY, "auto", "step")
    assert m.stream(batch=5, kernel="parallel").kernel == "parallel"
    assert calls[-1] == (5, "parallel", "step", "parallel")
    m.run(np.zeros((3, 2, 4), np.float32))
    assert calls[-1][:3] == (2, "auto", "sequence")
    assert m.default_kernel == calls[-1][3]


_PROBE = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    import lstm_cpu
    from lstm_cpu import LayerParams, LSTMModel
    MANY = 40

    rng = np.random.default_rng(7)
    I, H = 12, 200     # Hp = 208: up to 3 unit ranges
    layers = [[LayerParams(rng.normal(size=(4 * H, I if l == 0 else H)) * 0.2,
                           rng.normal(size=(4 * H, H)) * 0.2, rng.normal(size=4 * H) * 0.2)]
              for l in range(2)]
    x = rng.normal(size=(9, 6, I)).astype(np.float32)
    xbig = rng.normal(size=(3, MANY + 1, I)).astype(np.float32)
    out = {}
    for kernel in ("serial", "parallel"):
        m = LSTMModel(layers, kernel=kernel)
        m.save(sys.argv[1] + "." + kernel)
        s = m.stream()
        ys = [s.step(x[t, 0]) for t in range(9)]
        b = m.stream(batch=6)
        yb = [b.step(x[t]) for t in range(9)]
        big = m.stream(batch=MANY + 1)
        ybig = big.run(xbig)
        y, (h, c) = m.run(x)
        y2, _ = m.run(x[:, :2], kernel=kernel)
        for name, a in (("step", ys), ("batch", yb), ("many", ybig), ("run", [y, h, c]), ("run2", y2)):
            out[kernel + "/" + name] = hashlib.sha256(b"".join(np.ascontiguousarray(v).tobytes()
                                                               for v in a)).hexdigest()
        out[kernel + "/kernels"] = [s.kernel, b.kernel, big.kernel]
    print(json.dumps(out))
""")


def test_results_are_bit_identical_across_numba_thread_counts(tmp_path):
    """Issue 13: the same weights built and run under NUMBA_NUM_THREADS=1 and 2 (and a packed
    file written under either) give the same bytes, for step, batched streams, many streams
    (MANY + 1) and run; and the serial and parallel kernels agree with each other."""
    results = {}
    for n in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=n)
        p = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / f"m{n}")], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        results[n] = json.loads(p.stdout.strip().splitlines()[-1])
    assert results["1"] == results["2"]
    r = results["2"]
    for name in ("step", "batch", "many", "run", "run2"):
        assert r[f"serial/{name}"] == r[f"parallel/{name}"], name
    assert r["parallel/kernels"][:2] == ["parallel", "parallel"]
    for kernel in ("serial", "parallel"):
        files = [(tmp_path / f"m{n}.{kernel}").read_bytes() for n in ("1", "2")]
        assert hashlib.sha256(files[0]).digest() == hashlib.sha256(files[1]).digest()
