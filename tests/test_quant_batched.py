"""Reduced-precision weights for many streams at once: the N-stream product kernels of
``lstm_cpu/kernels_quant.py``, ``quant.ReducedStack.streams`` / ``.run`` and what
``LSTMModel`` runs through them (``stream(batch=N)``, ``Stream.run``, ``LSTMModel.run``).

References: tests/naive.py (float64) with the weights the reduced ones stand for, at the bound
of the activation quantization (as tests/test_quant_kernels.py); the lone kernels and lone
streams, bit for bit (a stream's result must not depend on N, on its row in the batch, nor on
stepping, running a chunk or running a whole sequence).

Every path the host can run is tested: the portable twins everywhere, the VNNI / AVX512_BF16
kernels where the CPU has them (they are left out of the parameters elsewhere, not skipped).
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
from lstm_cpu import LayerParams, LSTMModel
from lstm_cpu import kernels_quant as KQ
from lstm_cpu import quant as Q

FEATS = KQ.host_features()
VNNI = KQ.has_vnni512(FEATS)
BF16 = KQ.has_bf16dp(FEATS)

#: (format, kernel= for ReducedStack, id): every path this host runs
PATHS = ([("int8", ("a16", KQ.i8a16_vnni), "int8-vnni")] if VNNI else []) + [
    ("int8", ("a16", KQ.i8a16_portable), "int8-a16-portable"),
    ("int8", ("deq", KQ.fma_panels), "int8-deq"),
] + ([("bfloat16", ("dp", KQ.bf16_dp), "bf16-dp")] if BF16 else []) + [
    ("bfloat16", ("fma", KQ.fma_panels), "bf16-fma"),
]
PATH_PARAMS = [pytest.param(f, k, id=i) for f, k, i in PATHS]
#: max abs output error against the float64 reference with the weights the reduced ones stand
#: for, over these short sequences: int8's 16-bit activations (~1e-5 per step), bfloat16's hi +
#: lo split (~1e-6); a wrong gate, scale, segment or stream gives errors of order 0.1
TOL = {"int8": 2e-4, "bfloat16": 1e-4}


def _layers(rng, I, H, L, D=1, scale=0.4):
    return [[LayerParams(rng.uniform(-scale, scale, (4 * H, I if l == 0 else D * H)),
                         rng.uniform(-scale, scale, (4 * H, H)), rng.uniform(-0.5, 0.5, 4 * H))
             for _ in range(D)] for l in range(L)]


def _lone(rs, xs):
    """One stream's outputs stepping alone: xs (T, I) -> (T, H)."""
    s = rs.stream()
    return np.stack([s.step(x) for x in xs])


# ---------------------------------------------------------------------------------------------
# Product kernels: N streams against the lone kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kern", [pytest.param(KQ.i8a16_portable_batch, id="portable")]
                         + ([pytest.param(KQ.i8a16_vnni_batch, id="vnni")] if VNNI else []))
def test_int8_batch_product_is_exact(kern, rng):
    K, C, N = 150, 80, 7  # odd segments, 5 panels, a block of four and three single streams
    rows = np.array([0, 21, K])
    Wq = rng.integers(-127, 128, size=(K, C)).astype(np.int8)
    Wq4, qr = Q.pack_quads(Wq, rows), Q.quad_rows(rows)
    zhi = rng.integers(0, 256, size=(N, 4 * int(qr[-1]) + 4)).astype(np.uint8)  # ZW > 4*K4
    zlo = rng.integers(0, 256, size=zhi.shape).astype(np.uint8)
    ohi, olo = np.full((N, 2, C), -7, np.int32), np.full((N, 2, C), -7, np.int32)
    kern(Wq4, zhi, zlo, qr, 1, 4, ohi, olo)  # panels 1..3 only
    for n in range(N):
        for s in range(2):
            k0, k1 = int(rows[s]), int(rows[s + 1])
            for z, o in ((zhi, ohi), (zlo, olo)):
                want = z[n, 4 * qr[s] : 4 * qr[s] + k1 - k0].astype(np.int64) @ Wq[k0:k1, 16:64].astype(np.int64)
                np.testing.assert_array_equal(o[n, s, 16:64], want)
    assert np.all(ohi[:, :, :16] == -7) and np.all(olo[:, :, 64:] == -7)  # other panels untouched


@pytest.mark.skipif(not BF16, reason="CPU without AVX512_BF16")  # never taken where BF16 is (CI)
def test_bf16_batch_product_matches_the_lone_kernel_bit_for_bit(rng):
    K, C = 91, 112  # odd rows, 7 panels: the two-panel pass ends on a lone panel
    B = Q.to_bf16(rng.standard_normal((K, C)).astype(np.float32))
    Wb2, pr = Q.pack_pairs(B, np.array([0, K]))
    for N in (1, 4, 6, 9):
        z = rng.standard_normal((N, 2 * int(pr[-1]))).astype(np.float32)
        z[:, K:] = 0
        hi, lo = (np.ascontiguousarray(a) for a in Q.split_bf16(z))
        out = np.full((N, C), -7.0, np.float32)
        KQ.bf16_dp_batch(Wb2, hi, lo, 0, int(pr[-1]), 0, 7, out)
        for n in range(N):
            one = np.zeros(C, np.float32)
            KQ.bf16_dp(Wb2, hi[n], lo[n], 0, int(pr[-1]), 0, 7, one)
            np.testing.assert_array_equal(out[n], one)
        exact = Q.from_bf16(B).astype(np.float64)
        assert np.all(np.abs(out - z[:, :K] @ exact) <= 2.0**-14 * (np.abs(z[:, :K]) @ np.abs(exact)))


@pytest.mark.parametrize("dt", [np.int8, np.int16], ids=["int8", "bfloat16"])
def test_fma_batch_product_matches_the_lone_kernel_bit_for_bit(dt, rng):
    K, C = 43, 48  # rows not a multiple of four: the remainder rows go to the first accumulator
    W = rng.integers(-127, 128, size=(K, C)).astype(np.int8) if dt == np.int8 else Q.to_bf16(
        rng.standard_normal((K, C)).astype(np.float32))
    Wp = Q.pack_panels(W)
    for N in (1, 3, 4, 7):
        z = rng.standard_normal((N, K + 5)).astype(np.float32)  # KZ > K
        out = np.zeros((N, C), np.float32)
        KQ.fma_panels_batch(Wp, z, 2, 41, 0, 3, out)
        for n in range(N):
            one = np.zeros(C, np.float32)
            KQ.fma_panels(Wp, np.ascontiguousarray(z[n]), 2, 41, 0, 3, one)
            np.testing.assert_array_equal(out[n], one)


def test_assembly_of_the_batch_kernels_uses_the_dot_product_instructions():
    rep = KQ.asm_report()
    assert rep["fma_panels_batch[int8]"]["vfmadd"] > 0 and rep["fma_panels_batch[int8]"]["zmm"] == KQ.has_avx512(FEATS)
    if VNNI:
        assert rep["i8a16_vnni_batch"]["vpdpbusd"] >= 8 and rep["i8a16_vnni_batch"]["zmm"]
    if BF16:
        assert rep["bf16_dp_batch"]["vdpbf16ps"] >= 16 and rep["bf16_dp_batch"]["zmm"]


# ---------------------------------------------------------------------------------------------
# Stacks: N streams, chunks and whole sequences give a stream the bits of its lone step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, kernel", PATH_PARAMS)
def test_a_stream_has_the_same_bits_in_any_batch(fmt, kernel, rng):
    I, H, T = 9, 40, 25  # H not a multiple of 16: padded units
    rs = Q.ReducedStack(_layers(rng, I, H, 2), fmt, kernel=kernel)
    xs = rng.standard_normal((T, 9, I)).astype(np.float32) * rng.uniform(0.1, 3, (1, 9, 1)).astype(np.float32)
    alone = np.stack([_lone(rs, xs[:, n]) for n in range(9)], axis=1)  # (T, 9, H)
    ref, _ = naive.run(rs.deq, xs.astype(np.float64))
    assert np.abs(alone - ref).max() < TOL[fmt]
    for N, pick in ((1, [4]), (2, [3, 0]), (5, [8, 1, 2, 6, 5]), (9, list(range(8, -1, -1)))):
        b = rs.streams(N)
        y = np.zeros((T, N * H), np.float32)
        for t in range(T):
            b.step_into(np.ascontiguousarray(xs[t, pick]).reshape(-1), y[t])
        np.testing.assert_array_equal(y.reshape(T, N, H), alone[:, pick])
        b.reset()
        yr = np.zeros((T, N * H), np.float32)
        b.run_into(np.ascontiguousarray(xs[:, pick]).reshape(T, -1), yr[:])
        np.testing.assert_array_equal(yr, y)
    y, hN, cN = rs.run(xs, np.zeros((2, 9, H), np.float32), np.zeros((2, 9, H), np.float32), np.full(9, T))
    np.testing.assert_array_equal(y, alone)


@pytest.mark.parametrize("fmt, kernel", PATH_PARAMS)
def test_run_with_lengths_and_initial_state(fmt, kernel, rng):
    I, H, T, B = 7, 24, 16, 6
    layers = _layers(rng, I, H, 2)
    rs = Q.ReducedStack(layers, fmt, kernel=kernel)
    xs = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = np.array([T, 0, 3, T - 1, 1, 9])
    for n in range(B):
        xs[lengths[n]:, n] = np.nan  # padding: must not reach any output or state
    h0 = rng.uniform(-0.5, 0.5, (2, B, H)).astype(np.float32)
    c0 = rng.uniform(-1, 1, (2, B, H)).astype(np.float32)
    y, hN, cN = rs.run(xs, h0, c0, lengths)
    ref, (rh, rc) = naive.run(rs.deq, np.nan_to_num(xs).astype(np.float64), h0, c0, lengths=lengths)
    assert np.isfinite(y).all() and np.abs(y - ref).max() < TOL[fmt]
    assert np.abs(hN - rh).max() < TOL[fmt] and np.abs(cN - rc).max() < 4 * TOL[fmt]
    assert np.all(hN[:, 1] == 0) and np.all(cN[:, 1] == 0)  # length 0: a zero state, as onnxruntime
    for n in range(B):
        assert np.all(y[lengths[n]:, n] == 0)
        if lengths[n] == 0:
            continue
        # alone, with its own length: the same bits; and a stream from the same state, stepped
        n_ = lengths[n]
        y1, h1, c1 = rs.run(np.ascontiguousarray(xs[:n_, n : n + 1]), h0[:, n : n + 1], c0[:, n : n + 1],
                            np.array([n_]))
        np.testing.assert_array_equal(y1[:, 0], y[:n_, n])
        np.testing.assert_array_equal(h1[:, 0], hN[:, n])
        np.testing.assert_array_equal(c1[:, 0], cN[:, n])
        s = rs.stream()
        s.h[:] = h0[:, n]
        s.c[:, :H] = c0[:, n]
        np.testing.assert_array_equal(np.stack([s.step(x) for x in xs[:n_, n]]), y[:n_, n])


@pytest.mark.parametrize("fmt, kernel", PATH_PARAMS)
@pytest.mark.parametrize("D, reverse", [(1, True), (2, False)], ids=["reverse", "bidirectional"])
def test_reverse_and_bidirectional_runs(fmt, kernel, D, reverse, rng):
    I, H, T, B = 6, 20, 12, 5
    rs = Q.ReducedStack(_layers(rng, I, H, 2, D=D), fmt, kernel=kernel)
    assert not rs.streamable or D == 1
    xs = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = np.array([T, 5, 0, 11, 1])
    h0 = rng.uniform(-0.5, 0.5, (2 * D, B, H)).astype(np.float32)
    c0 = rng.uniform(-1, 1, (2 * D, B, H)).astype(np.float32)
    y, hN, cN = rs.run(xs, h0, c0, lengths, reverse=reverse)
    ref, (rh, rc) = naive.run(rs.deq, xs.astype(np.float64), h0, c0, lengths=lengths, reverse=reverse)
    assert y.shape == (T, B, D * H)
    assert np.abs(y - ref).max() < TOL[fmt] and np.abs(hN - rh).max() < TOL[fmt]
    for n in (0, 3):  # alone: the same bits
        y1, h1, _ = rs.run(np.ascontiguousarray(xs[:, n : n + 1]), h0[:, n : n + 1], c0[:, n : n + 1],
                           lengths[n : n + 1], reverse=reverse)
        np.testing.assert_array_equal(y1[:, 0], y[:, n])
        np.testing.assert_array_equal(h1[:, 0], hN[:, n])


@pytest.mark.skipif(not VNNI, reason="CPU without AVX-512 VNNI")  # never taken where VNNI is (CI)
def test_vnni_and_portable_give_the_same_bits_for_batches_and_runs(rng):
    layers = _layers(rng, 11, 32, 2)
    a = Q.ReducedStack(layers, "int8", kernel=("a16", KQ.i8a16_vnni))
    b = Q.ReducedStack(layers, "int8", kernel=("a16", KQ.i8a16_portable))
    xs = rng.standard_normal((10, 6, 11)).astype(np.float32)
    ya, yb = np.zeros((10, 6 * 32), np.float32), np.zeros((10, 6 * 32), np.float32)
    a.streams(6).run_into(xs.reshape(10, -1), ya)
    b.streams(6).run_into(xs.reshape(10, -1), yb)
    np.testing.assert_array_equal(ya, yb)
    z = np.zeros((2, 6, 32), np.float32)
    np.testing.assert_array_equal(a.run(xs, z, z, np.full(6, 10))[0], b.run(xs, z, z, np.full(6, 10))[0])


def test_the_two_paths_of_a_format_agree(rng):
    """int8: VNNI-style 16-bit activations vs float activations (deq); bfloat16: hi + lo
    split vs float activations (fma). Different rounding, the same weights: close."""
    layers = _layers(rng, 10, 32, 2)
    xs = rng.standard_normal((20, 5, 10)).astype(np.float32)
    z = np.zeros((2, 5, 32), np.float32)
    for fmt, k1, k2, tol in (("int8", ("a16", KQ.i8a16_portable), ("deq", KQ.fma_panels), 2e-4),
                             ("bfloat16", ("dp", KQ.bf16_dp) if BF16 else ("fma", KQ.fma_panels),
                              ("fma", KQ.fma_panels), 1e-4)):
        y1 = Q.ReducedStack(layers, fmt, kernel=k1).run(xs, z, z, np.full(5, 20))[0]
        y2 = Q.ReducedStack(layers, fmt, kernel=k2).run(xs, z, z, np.full(5, 20))[0]
        if k1 != k2:  # (bfloat16 without AVX512_BF16 has only the fma path)
            assert 0 < np.abs(y1 - y2).max() < tol


def test_a_nan_stream_leaves_the_others_alone(rng):
    rs = Q.ReducedStack(_layers(rng, 5, 16, 2), "int8")
    xs = rng.standard_normal((8, 6, 5)).astype(np.float32)
    alone = np.stack([_lone(rs, xs[:, n]) for n in range(6)], axis=1)
    xs[3, 2, 1] = np.nan
    y = np.zeros((8, 6 * 16), np.float32)
    rs.streams(6).run_into(xs.reshape(8, -1), y)
    y = y.reshape(8, 6, 16)
    assert np.isnan(y[3:, 2]).all()
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(y[:, keep], alone[:, keep])


# ---------------------------------------------------------------------------------------------
# LSTMModel: batched streams, Stream.run and run go through the reduced kernels
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reduced_models():
    rng = np.random.default_rng(21)
    layers = _layers(rng, 12, 36, 2, scale=0.3)
    return dict({w: LSTMModel(layers, weights=w) for w in ("int8", "bfloat16")}, layers=layers)


@pytest.mark.parametrize("w", ["int8", "bfloat16"])
def test_model_streams_chunks_and_runs_share_the_bits(reduced_models, w, rng):
    m = reduced_models[w]
    T, N = 15, 5
    xs = rng.standard_normal((T, N, m.input_size)).astype(np.float32)
    lone = []
    for n in range(N):
        s = m.stream()
        lone.append(np.stack([s.step(x) for x in xs[:, n]]))
    lone = np.stack(lone, axis=1)  # (T, N, H)
    ref, _ = naive.run(m._rstack.deq, xs.astype(np.float64))
    assert np.abs(lone - ref).max() < TOL[w]
    sb = m.stream(batch=N)
    assert sb.kernel == "serial"
    out = np.empty((N, m.output_size), np.float32)
    np.testing.assert_array_equal(np.stack([sb.step(x, out=out).copy() for x in xs]), lone)
    sb.reset()
    np.testing.assert_array_equal(sb.run(xs[:7]), lone[:7])  # a chunk, then steps: state carries
    np.testing.assert_array_equal(sb.step(xs[7]), lone[7])
    np.testing.assert_array_equal(sb.run(xs[8:]), lone[8:])
    s1 = m.stream()
    np.testing.assert_array_equal(s1.run(xs[:, 2]), lone[:, 2])
    y, (h, c) = m.run(xs)
    np.testing.assert_array_equal(y, lone)
    np.testing.assert_array_equal(m.run(xs[:, 4])[0], lone[:, 4])
    np.testing.assert_array_equal(h, sb.state[0])
    np.testing.assert_array_equal(c, sb.state[1])
    # more streams than the BLAS threshold of the float kernels: still the reduced kernels
    big = m.stream(batch=41)
    x41 = np.repeat(xs[0, 3:4], 41, axis=0)
    assert big.kernel == "serial"
    np.testing.assert_array_equal(big.step(x41)[40], lone[0, 3])


@pytest.mark.parametrize("w", ["int8", "bfloat16"])
def test_model_run_state_and_lengths(reduced_models, w, rng):
    m = reduced_models[w]
    H, B, T = m.hidden_size, 4, 12
    xs = rng.standard_normal((T, B, m.input_size)).astype(np.float32)
    h0 = rng.uniform(-0.5, 0.5, (2, B, H)).astype(np.float32)
    c0 = rng.uniform(-1, 1, (2, B, H)).astype(np.float32)
    lengths = np.array([12, 4, 0, 7])
    y, (h, c) = m.run(xs, state=(h0, c0), lengths=lengths)
    ref, (rh, rc) = naive.run(m._rstack.deq, xs.astype(np.float64), h0, c0, lengths=lengths)
    assert np.abs(y - ref).max() < TOL[w] and np.abs(h - rh).max() < TOL[w]
    assert np.all(h[:, 2] == 0) and np.all(y[4:, 1] == 0)
    s = m.stream(batch=B)  # a batched stream from the same state: the same bits where valid
    s.state = (h0, c0)
    ys = s.run(xs)
    for n in range(B):
        np.testing.assert_array_equal(ys[: lengths[n], n], y[: lengths[n], n])
    np.testing.assert_array_equal(s.state[0][:, 0], h[:, 0])
    # the model's own initial state
    mi = LSTMModel(reduced_models["layers"], initial_state=(h0[:, 1], c0[:, 1]), weights=w)
    assert mi._rstack is not None
    np.testing.assert_array_equal(mi.run(xs[:4, 1])[0], y[:4, 1])


def test_parallel_and_unsupported_models_use_the_float_kernels(reduced_models, rng):
    m = reduced_models["int8"]
    xs = rng.standard_normal((10, 3, m.input_size)).astype(np.float32)
    ref, _ = naive.run(m.layer_params(), xs.astype(np.float64))
    yp, _ = m.run(xs, kernel="parallel")  # the float kernels over the weights int8 stands for
    assert np.abs(yp - ref).max() < 1e-5 and not np.array_equal(yp, m.run(xs)[0])
    assert m.stream(batch=3, kernel="parallel")._rstep is None
    clipped = LSTMModel(m.layer_params(), clip=0.5, weights="int8")  # outside the reduced cell
    assert clipped._rstack is None
    y, _ = clipped.run(xs)
    rc, _ = naive.run(clipped.layer_params(), xs.astype(np.float64), clip=0.5)
    assert np.abs(y - rc).max() < 1e-5
    sb = clipped.stream(batch=3)
    assert sb._rstep is None and np.abs(sb.run(xs) - rc).max() < 1e-5


def test_reverse_model_runs_reduced(rng):
    layers = _layers(rng, 6, 16, 1)
    m = LSTMModel(layers, weights="bfloat16", reverse=True)
    assert m._rstack is not None and m._rstack.streamable  # one direction; the model refuses streams
    xs = rng.standard_normal((9, 2, 6)).astype(np.float32)
    y, _ = m.run(xs, lengths=[9, 4])
    ref, _ = naive.run(m._rstack.deq, xs.astype(np.float64), lengths=[9, 4], reverse=True)
    assert np.abs(y - ref).max() < TOL["bfloat16"]
    assert not np.array_equal(y[:4, 1], m.run(xs[:4, 1], kernel="parallel")[0])  # the reduced kernels ran


@pytest.mark.parametrize("w", ["int8", "bfloat16"])
def test_a_reduced_model_holds_no_float_copy_of_its_gates(w, tmp_path, rng):
    """Its own kernels never read float gates: streams (any N), run, info and save leave the float
    copy unbuilt; a float path builds it, equal to what the constructor packed."""
    import lstm_cpu

    layers = _layers(rng, 8, 32, 2)
    m = LSTMModel(layers, weights=w)
    xs = rng.standard_normal((6, 3, 8)).astype(np.float32)
    m.stream().step(xs[0, 0])
    m.stream(batch=3).run(xs)
    y, _ = m.run(xs)
    m.info()
    m.save(tmp_path / "m.lstm")
    assert m._wfull is None
    assert m._wrest.nbytes < 0.05 * m._float_weights().nbytes
    back = lstm_cpu.load(tmp_path / "m.lstm")
    assert back._wfull is None
    np.testing.assert_array_equal(back.run(xs)[0], y)
    eager = LSTMModel(layers, weights="float32")  # the float kernels' buffer, packed from what w stands for
    stand_for = [[LayerParams(*q.weights(), p.bias)] for q, (p,) in zip([r[0] for r in m._reduced], layers)]
    np.testing.assert_array_equal(m._float_weights(), LSTMModel(stand_for)._wbuf)
    assert m._wfull is None and eager.weights == "float32"
    m.run(xs, kernel="parallel")  # a float path: builds the copy, keeps it
    assert m._wfull is not None
    np.testing.assert_array_equal(m._wfull, LSTMModel(stand_for)._wbuf)


def test_info_reports_the_kernel_streams_run(reduced_models):
    m = reduced_models["int8"]
    assert m.default_kernel == m.info()["kernel"] == m.stream().kernel == "serial"
    p = LSTMModel(reduced_models["layers"], weights="int8", kernel="parallel")
    assert p.default_kernel == p.stream().kernel == "parallel" and p.stream()._rstep is None


@pytest.mark.parametrize("fmt, kernel", PATH_PARAMS)
def test_the_kernels_layouts_give_back_the_canonical_weights(fmt, kernel, rng):
    """A stack keeps its gates only in the kernels' layouts: unpacking them is exact, also for
    separate input / recurrent scales (an imported DynamicQuantizeLSTM) and two directions."""
    layers = _layers(rng, 7, 20, 2, D=2)
    flat = [[Q.ReducedLayer.convert(p.w_ih, p.w_hh, fmt) for p in row] for row in layers]
    if fmt == "int8":
        flat[1][1].s_hh = (flat[1][1].s_hh * rng.uniform(0.5, 2, flat[1][1].s_hh.shape)).astype(np.float32)
    rs = Q.ReducedStack(layers, fmt, kernel=kernel, reduced=flat)
    back = rs.canonical()
    for row, brow in zip(flat, back):
        for q, b in zip(row, brow):
            for name in ("w_ih", "w_hh", "s_ih", "s_hh"):
                a, c = getattr(q, name), getattr(b, name)
                if a is None:
                    assert c is None
                else:
                    assert a.dtype == c.dtype and c.flags.c_contiguous
                    np.testing.assert_array_equal(a, c)
    assert rs.canonical_nbytes == sum(q.nbytes for row in flat for q in row)


def test_a_reduced_model_keeps_one_copy_of_its_gates(reduced_models, tmp_path, rng):
    import lstm_cpu

    m = LSTMModel(reduced_models["layers"], weights="int8")
    assert m._rcanon is None and m._wfull is None
    f32 = reduced_models["int8"].with_weights("float32")
    assert m.weight_bytes == reduced_models["int8"].weight_bytes < 0.3 * f32.weight_bytes
    m.save(tmp_path / "q.lstm")
    assert m._rcanon is None  # save unpacked them for the moment only
    back = lstm_cpu.load(tmp_path / "q.lstm")
    for row, brow in zip(m._reduced, back._reduced):
        np.testing.assert_array_equal(row[0].w_hh, brow[0].w_hh)
        np.testing.assert_array_equal(row[0].s_ih, brow[0].s_ih)


# ---------------------------------------------------------------------------------------------
# Ranges of streams on threads (policy.reduced_groups): the same bits as one range
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_ranges_on_threads_give_each_stream_its_bits(weights):
    """A batch split into ranges stepped on threads at once (steps, then a chunk) and sequences
    split into ranges (run) give every stream exactly the bits of one range."""
    rng = np.random.default_rng(21)
    I, H, L, N, T = 6, 40, 2, 11, 9
    layers = [[LayerParams(rng.uniform(-.4, .4, (4 * H, I if l == 0 else H)), rng.uniform(-.4, .4, (4 * H, H)),
                           rng.uniform(-.3, .3, 4 * H))] for l in range(L)]
    st = LSTMModel(layers, weights=weights)._rstack
    one, three = st.streams(N), st.streams(N, groups=3)
    assert one.groups == 1 and three.groups == 3
    xs = rng.normal(size=(T, N * I)).astype(np.float32)
    for t in range(T):  # step by step
        y1, y3 = np.empty(N * H, np.float32), np.empty(N * H, np.float32)
        one.step_into(xs[t], y1)
        three.step_into(xs[t], y3)
        np.testing.assert_array_equal(y1, y3)
    ys1, ys3 = np.empty((T, N * H), np.float32), np.empty((T, N * H), np.float32)
    one.run_into(xs, ys1)  # then a chunk
    three.run_into(xs, ys3)
    np.testing.assert_array_equal(ys1, ys3)
    np.testing.assert_array_equal(one.h, three.h)
    np.testing.assert_array_equal(one.c, three.c)
    x = rng.normal(size=(T, N, I)).astype(np.float32)
    h0 = rng.normal(size=(L, N, H)).astype(np.float32)
    c0 = rng.normal(size=(L, N, H)).astype(np.float32)
    lens = rng.integers(0, T + 1, N)
    for u, v in zip(st.run(x, h0, c0, lens), st.run_groups(x, h0, c0, lens, groups=2)):
        np.testing.assert_array_equal(u, v)


def test_stream_ranges_and_their_policy():
    from lstm_cpu import policy

    assert Q.group_bounds(11, 3) == [(0, 4), (4, 8), (8, 11)]
    assert Q.group_bounds(64, 2) == [(0, 32), (32, 64)]
    assert Q.group_bounds(5, 4) == [(0, 4), (4, 5)]
    assert Q.group_bounds(3, 2) == [(0, 3)]
    MB = 1 << 20
    assert policy.reduced_groups(MB, 64, 2) == 2
    assert policy.reduced_groups(MB, 64, 1) == 1
    assert policy.reduced_groups(MB, 4, 2) == 1  # fewer than two ranges of four
    assert policy.reduced_groups(1, 64, 2) == 1  # below the batched rule
    assert policy.reduced_groups(1, 64, 2, "parallel") == 2
    assert policy.reduced_groups(MB, 64, 2, "serial") == 1
