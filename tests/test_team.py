"""The one-region parallel kernels of ``model.run`` (lstm_cpu/team.py, kernels.layer_sequence_parallel
and kernels.layer_run_split): atomics that are atomic, a protocol that finishes however the threading
layer schedules its participants, and bits equal to the serial kernel's for every model feature."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import numba
import numpy as np
import pytest
from numba import njit, prange

from lstm_cpu import LayerParams, LSTMModel, kernels, policy, team
from lstm_cpu import model as model_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@njit(parallel=True, nogil=True)
def _count(sync, P, n):
    for p in prange(P):
        for i in range(n):
            team.atomic_add(sync, 0, 1)


@njit(parallel=True, nogil=True)
def _race(sync, wins, P, tasks):
    for p in prange(P):
        for j in range(tasks):
            if team.claim(sync, 0, j, 0):
                wins[j] += 1  # one winner per slot: no two participants write the same element
                team.finished(sync)
        team.wait_done(sync, tasks)


def test_atomic_add_loses_no_update():
    sync = team.new_sync(0)
    _count(sync, 4, 20000)
    assert sync[0] == 80000  # a plain += from two threads loses some of these


def test_each_task_is_claimed_exactly_once():
    for rep in range(20):
        tasks = 37
        sync = team.new_sync(tasks)
        wins = np.zeros(tasks, np.int64)
        _race(sync, wins, 4, tasks)
        assert wins.tolist() == [1] * tasks
        assert sync[0] == tasks
        # every slot moved from phase 0 to 1
        assert [sync[team.SLOT * (1 + j)] for j in range(tasks)] == [1] * tasks


_SCHEDULES = textwrap.dedent("""
    import numba, numpy as np
    from lstm_cpu import kernels, layout, policy, team
    from lstm_cpu.bench.models import embedded_model
    m = embedded_model((24, 200, 1))  # Hp = 208: 3 unit ranges of 64+ units
    wbuf, meta, fpar = m._wbuf, m._meta, m._fpar
    C, Hp, out = m._plan.C, m._plan.Hp, m._out
    rng = np.random.default_rng(0)
    T = 30
    for B in (1, 5):
        xp = rng.standard_normal((T, B, C)).astype(np.float32)
        lens = np.array([T, 0, 7, T - 1, 1][:B], np.int64)
        def run(P, RA, RB):
            h = np.zeros((B, out), np.float32); c = np.zeros((B, Hp), np.float32)
            y = np.full((T, B, out), np.nan, np.float32)
            acc = np.empty((B, C), np.float32); mb = np.empty((B, Hp), np.float32)
            if P == 0:
                kernels.layer_sequence_serial(xp, 1, wbuf, meta, fpar, 0, 0, lens, h, c, y, acc, mb)
            else:
                tasks = RA + ((B + 3) // 4) * RB
                kernels.layer_sequence_parallel(xp, P, RA, RB, wbuf, meta, fpar, 0, 0, lens, h, c, y,
                                                acc, mb, team.new_sync(tasks))
            return y, h, c
        want = run(0, 0, 0)
        # more participants than threads, odd splits, and (below) a single thread running all of
        # them one after another: the first does every task, the others find them done
        for threads in (2, 1):
            numba.set_num_threads(threads)
            for P, RA, RB in ((2, 2, 2), (3, 3, 3), (5, 2, 1), (2, 13, 3), (4, 1, 1)):
                got = run(P, RA, RB)
                for a, b in zip(got, want):
                    assert np.array_equal(a, b, equal_nan=False), (threads, P, RA, RB, B)
    print("ok")
""")


def test_team_finishes_and_matches_serial_under_any_schedule():
    """Run in a child with a timeout: a protocol bug would hang, not fail."""
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", _SCHEDULES], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


def test_row_split_projection_matches_serial():
    rng = np.random.default_rng(3)
    H, I = 40, 11
    m = LSTMModel([[LayerParams(rng.normal(size=(4 * H, I)), rng.normal(size=(4 * H, H)))]])
    C = m._plan.C
    X = rng.standard_normal((37, I)).astype(np.float32)
    want = np.empty((37, C), np.float32)
    kernels.input_projection_serial(X, m._wbuf, m._meta, 0, 0, want)
    for R in (1, 2, 3, 5, 37, 40):
        got = np.full((37, C), np.nan, np.float32)
        kernels.input_projection_parallel(X, R, m._wbuf, m._meta, 0, 0, got)
        np.testing.assert_array_equal(got, want)


def _layers(rng, I, H, L=1, D=1, P=0, peep=False):
    out = P or H
    return [[LayerParams(rng.uniform(-.4, .4, (4 * H, I if l == 0 else D * out)),
                         rng.uniform(-.4, .4, (4 * H, out)), rng.uniform(-.4, .4, 4 * H),
                         peephole=rng.uniform(-.4, .4, 3 * H) if peep else None,
                         w_hr=rng.uniform(-.4, .4, (P, H)) if P else None)
             for _ in range(D)] for l in range(L)]


_CASES = {
    "plain": dict(H=200),
    "two layers": dict(H=72, L=2),
    "bidirectional": dict(H=130, L=2, D=2),
    "projection": dict(H=150, P=40),
    "peepholes+clip": dict(H=96, peep=True, clip=2.0),
    "reverse": dict(H=80, reverse=True),
    "float64": dict(H=70, dtype=np.float64),
}


@pytest.fixture(params=sorted(_CASES))
def case(request):
    spec = dict(_CASES[request.param])
    rng = np.random.default_rng(zlib.crc32(request.param.encode()))  # the same in every process
    I = 13
    kw = {k: spec.pop(k) for k in ("clip", "reverse", "dtype") if k in spec}
    return request.param, LSTMModel(_layers(rng, I, **spec), **kw), I


@pytest.mark.parametrize("B", [1, 3, 8, 9, 17])
def test_parallel_run_is_bit_identical_to_serial(case, B, monkeypatch):
    """Team (B < 8 on two threads) and split (B >= 8) against the serial kernel, with lengths
    (0, short, full), an initial state, and output buffers that start as NaN: every element of y
    must be written, zeros past a sequence's length included."""
    name, m, I = case
    real = model_mod.aligned.empty

    def nan_empty(n, dtype, lead=0):
        a = real(n, dtype, lead)
        if np.dtype(dtype).kind == "f":
            a.fill(np.nan)
        return a

    monkeypatch.setattr(model_mod.aligned, "empty", nan_empty)
    rng = np.random.default_rng(B)
    T = 23
    x = rng.standard_normal((T, B, I)).astype(m.dtype)
    lengths = rng.integers(0, T + 1, B)
    lengths[0] = T
    if B > 2:
        lengths[1] = 0
    LD = m.num_layers * m.num_directions
    out = m.output_size // m.num_directions
    state = (rng.standard_normal((LD, B, out)).astype(m.dtype),
             rng.standard_normal((LD, B, m.hidden_size)).astype(m.dtype))
    ys, (hs, cs) = m.run(x, state=state, lengths=lengths, kernel="serial")
    assert not np.isnan(ys).any()
    for t in range(T):
        assert not ys[t, t >= lengths].any(), "steps past a length are zero"
    numba_threads = numba.get_num_threads()
    for threads in sorted({1, 2, numba_threads}):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            yp, (hp, cp) = m.run(x, state=state, lengths=lengths, kernel="parallel")
        finally:
            numba.set_num_threads(numba_threads)
        for a, b, what in ((ys, yp, "y"), (hs, hp, "h"), (cs, cp, "c")):
            np.testing.assert_array_equal(b, a, err_msg=f"{name} B={B} threads={threads}: {what}")


def test_split_and_team_are_what_runs(monkeypatch):
    """The policy's shape reaches the kernels: a batch of 8 on 2 threads runs split, 1 a team."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")  # pragma: no cover - CI machines have 2 cores
    calls = []
    for name in ("layer_run_split", "layer_sequence_parallel"):
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name):
            calls.append(_name)
            return _real(*a)

        monkeypatch.setattr(kernels, name, spy)
    rng = np.random.default_rng(0)
    m = LSTMModel(_layers(rng, 5, 128), kernel="parallel")
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        m.run(rng.standard_normal((6, 8, 5)).astype(np.float32))
        m.run(rng.standard_normal((6, 1, 5)).astype(np.float32))
    finally:
        numba.set_num_threads(saved)
    assert calls == ["layer_run_split", "layer_sequence_parallel"]
    assert policy.sequence_team(8, 2, m._plan.C, m._plan.Hp).stream_groups == 2


# ---------------------------------------------------------------------------------------------
# Batched streams: kernels.stack_step_split (groups of streams, one region a step)
# ---------------------------------------------------------------------------------------------
_STREAM_CASES = {
    # layers of different widths: K_0 = 13 + 72 and K_1 = 72 + 72 move the z rows between
    # layers (the race stack_step_split's per-group z stretch prevents)
    "two layers": dict(H=72, L=2),
    "three layers, projection": dict(H=150, L=3, P=40),
    "peepholes+clip": dict(H=96, peep=True, clip=2.0),
    "float64": dict(H=70, L=2, dtype=np.float64),
}


@pytest.mark.parametrize("name", sorted(_STREAM_CASES))
@pytest.mark.parametrize("N", [8, 9, 13, 64])
def test_split_step_is_bit_identical_to_serial(name, N):
    """Every stream's outputs and state after several steps and a run, from a random state,
    equal the serial kernel's, for 1-4 groups (more groups than threads included)."""
    spec = dict(_STREAM_CASES[name])
    rng = np.random.default_rng(zlib.crc32(name.encode()) + N)
    I = 13
    kw = {k: spec.pop(k) for k in ("clip", "dtype") if k in spec}
    m = LSTMModel(_layers(rng, I, **spec), **kw)
    h0 = rng.standard_normal((m.num_layers, N, m.output_size)).astype(m.dtype)
    c0 = rng.standard_normal((m.num_layers, N, m.hidden_size)).astype(m.dtype)
    xs = rng.standard_normal((6, N, I)).astype(m.dtype)

    def steps(SG):
        """The outputs of 3 steps and a 3-step run, on a stream's buffers driven by the serial
        kernels (SG = 0) or the split ones."""
        s = m.stream(batch=N, kernel="serial")
        s._h[...], s._c[:, :, : m.hidden_size] = h0, c0
        wbuf, meta, fpar, sbuf = s.numba_args()
        out = []
        for x in xs[:3]:
            y = np.full(N * m.output_size, np.nan, m.dtype)
            if SG:
                kernels.stack_step_split(x.reshape(-1), SG, wbuf, meta, fpar, sbuf, y)
            else:
                kernels.stack_step_serial(x.reshape(-1), wbuf, meta, fpar, sbuf, y)
            out.append(y)
        ys = np.full((3, N * m.output_size), np.nan, m.dtype)
        if SG:
            kernels.stack_run_split(xs[3:].reshape(3, -1), SG, wbuf, meta, fpar, sbuf, ys)
        else:
            kernels.stack_run_serial(xs[3:].reshape(3, -1), wbuf, meta, fpar, sbuf, ys)
        return out + [ys, s._h, s._c]

    want = steps(0)
    assert not np.isnan(want[3]).any()
    for SG in (1, 2, 3, 4):
        got = steps(SG)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} N={N} SG={SG}")


def test_parallel_streams_split_into_groups(monkeypatch):
    """A parallel stream of 8+ streams on 2 threads steps with the split kernel, and gives the
    serial kernel's bits through the public API; fewer streams keep the panel-range kernel."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")  # pragma: no cover - CI machines have 2 cores
    rng = np.random.default_rng(11)
    m = LSTMModel(_layers(rng, 9, H=64, L=2))
    threads = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        assert policy.step_groups(8, 2) == 2 and policy.step_groups(7, 2) == 0
        assert policy.step_groups(64, 1) == 0 and policy.step_groups(64, 4) == 4
        s8, s4 = m.stream(batch=8, kernel="parallel"), m.stream(batch=4, kernel="parallel")
        assert s8._step_fn is kernels.stack_step_split and s4._step_fn is kernels.stack_step_parallel
        ref = m.stream(batch=8, kernel="serial")
        for x in rng.standard_normal((4, 8, 9)).astype(np.float32):
            np.testing.assert_array_equal(s8.step(x), ref.step(x))
    finally:
        numba.set_num_threads(threads)
