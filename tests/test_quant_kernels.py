"""Reduced-precision gate products (lstm_cpu/kernels_quant.py) and the quantization helpers
(lstm_cpu/quant.py), against int64 / float64 numpy references and torch's bfloat16.

The SIMD kernels run only where the CPU has the instructions: elsewhere those cases are
reported as skipped (with the missing feature), never passed. The portable twins always run.
"""

from __future__ import annotations

import numpy as np
import pytest

import naive
from lstm_cpu import kernels_quant as KQ
from lstm_cpu import quant as Q
from lstm_cpu.errors import UnsupportedModelError
from lstm_cpu.spec import LayerParams

FEATS = KQ.host_features()
needs_vnni512 = pytest.mark.skipif(not KQ.has_vnni512(FEATS), reason="CPU without AVX-512 VNNI")
needs_vnni256 = pytest.mark.skipif(not KQ.has_vnni256(FEATS), reason="CPU without AVX-VNNI / AVX512VL-VNNI")
needs_bf16 = pytest.mark.skipif(not KQ.has_bf16dp(FEATS), reason="CPU without AVX512_BF16")

I8_KERNELS = [pytest.param(KQ.i8_portable, id="portable"),
              pytest.param(KQ.i8_vnni, id="vnni512", marks=needs_vnni512),
              pytest.param(KQ.i8_vnni256, id="vnni256", marks=needs_vnni256)]
A16_KERNELS = [pytest.param(KQ.i8a16_portable, id="portable"),
               pytest.param(KQ.i8a16_vnni, id="vnni512", marks=needs_vnni512)]


def _quads(rng, K, C, rows):
    Wq = rng.integers(-128, 128, size=(K, C)).astype(np.int8)  # (K, C), -128 included
    return Wq, Q.pack_quads(Wq, rows), Q.quad_rows(rows)


def _int_ref(Wq, rows, zq, qr, s, cols):
    """int64 sum over the rows of segment s of zq (as packed) * Wq, for columns cols."""
    k0, k1 = int(rows[s]), int(rows[s + 1])
    z = zq[4 * qr[s] : 4 * qr[s] + (k1 - k0)].astype(np.int64)
    return z @ Wq[k0:k1, cols].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# int8 x uint8 -> int32: exact
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kern", I8_KERNELS)
def test_int8_product_is_exact(kern, rng):
    K, C = 203, 96  # rows not a multiple of 4, two segments of odd length
    rows = np.array([0, 37, K])
    Wq, Wq4, qr = _quads(rng, K, C, rows)
    zq = rng.integers(0, 256, size=4 * int(qr[-1])).astype(np.uint8)
    for s in range(2):
        out = np.full(C, -7, np.int32)
        kern(Wq4, zq, qr[s], qr[s + 1], 1, 5, out)  # panels 1..4 only
        np.testing.assert_array_equal(out[16:80], _int_ref(Wq, rows, zq, qr, s, slice(16, 80)))
        assert np.all(out[:16] == -7) and np.all(out[80:] == -7)  # other panels untouched


@pytest.mark.parametrize("kern", A16_KERNELS)
def test_int8_x_16bit_product_is_exact(kern, rng):
    K, C = 150, 64
    rows = np.array([0, 21, K])
    Wq, Wq4, qr = _quads(rng, K, C, rows)
    zhi = rng.integers(0, 256, size=4 * int(qr[-1])).astype(np.uint8)
    zlo = rng.integers(0, 256, size=4 * int(qr[-1])).astype(np.uint8)
    ohi, olo = np.full((2, C), -7, np.int32), np.full((2, C), -7, np.int32)
    kern(Wq4, zhi, zlo, qr, 1, 3, ohi, olo)  # panels 1 and 2 only
    for s in range(2):
        np.testing.assert_array_equal(ohi[s, 16:48], _int_ref(Wq, rows, zhi, qr, s, slice(16, 48)))
        np.testing.assert_array_equal(olo[s, 16:48], _int_ref(Wq, rows, zlo, qr, s, slice(16, 48)))
    assert np.all(ohi[:, :16] == -7) and np.all(olo[:, 48:] == -7)


def test_16bit_activation_digits_reconstruct_the_rounded_value(rng):
    z = (rng.standard_normal(300) * 3).astype(np.float32)
    z[5] = 0.0
    zhi, zlo = np.zeros(300, np.uint8), np.zeros(300, np.uint8)
    s = KQ.quantize_a16(z, 0, 300, zhi, zlo, 0)
    assert s == np.float32(np.abs(z).max()) / np.float32(32767)
    v = 256 * (zhi.astype(np.int64) - 128) + zlo
    np.testing.assert_array_equal(v, np.rint(z * (np.float32(1) / s)).astype(np.int64))
    assert np.abs(v).max() == 32767
    assert np.abs(v * np.float64(s) - z).max() <= 0.5001 * s
    zq = np.zeros(300, np.uint8)
    s8 = KQ.quantize_u8(z, 0, 300, zq, 0)
    assert np.abs((zq.astype(np.int64) - 128) * np.float64(s8) - z).max() <= 0.5001 * s8


def test_all_zero_and_nan_segments():
    zhi, zlo = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    assert KQ.quantize_a16(np.zeros(8, np.float32), 0, 8, zhi, zlo, 0) == 1.0
    np.testing.assert_array_equal(256 * (zhi.astype(int) - 128) + zlo, 0)
    z = np.ones(8, np.float32)
    z[3] = np.nan
    assert np.isnan(KQ.quantize_a16(z, 0, 8, zhi, zlo, 0))  # the step's result becomes NaN


# ---------------------------------------------------------------------------------------------
# Quantization and conversion
# ---------------------------------------------------------------------------------------------
def test_quantize_columns_is_symmetric_per_column_and_within_half_a_step(rng):
    W = rng.standard_normal((70, 48)) * rng.uniform(0.01, 3, size=48)  # (K, C) columns of varied range
    W[:, 7] = 0.0
    rows = np.array([0, 30, 70])
    Wq, sc = Q.quantize_columns(W, rows)
    assert Wq.dtype == np.int8 and sc.shape == (2, 48)
    assert Wq.min() >= -127  # -128 never used
    for s in range(2):
        seg = slice(rows[s], rows[s + 1])
        np.testing.assert_array_equal(np.abs(Wq[seg]).max(axis=0)[np.arange(48) != 7], 127)
        assert np.all(np.abs(Q.dequantize(Wq, sc, rows)[seg] - W[seg]) <= sc[s].astype(np.float64) * 0.5 * (1 + 1e-6))
    assert np.all(sc[:, 7] == 1.0) and np.all(Wq[:, 7] == 0)


def test_quantize_refuses_non_finite_weights():
    W = np.ones((4, 16))
    W[1, 2] = np.inf
    with pytest.raises(UnsupportedModelError, match="finite"):
        Q.quantize_columns(W)


def test_bfloat16_rounds_to_nearest_even_like_torch(rng):
    import torch

    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-30, 30, 10000)).astype(np.float32)
    # exact ties: the 16 dropped bits are 0x8000, with even and odd kept bits
    ties = (np.arange(1000, dtype=np.uint32) << 16 | 0x8000).astype(np.uint32).view(np.float32)
    x = np.concatenate([x, ties, np.float32([0.0, -0.0, np.inf, -np.inf, 3.4e38])])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(Q.to_bf16(x), want)
    np.testing.assert_array_equal(Q.from_bf16(Q.to_bf16(x)), torch.from_numpy(x).to(torch.bfloat16).float().numpy())
    assert np.isnan(Q.from_bf16(Q.to_bf16(np.float32([np.nan])))).all()


def test_float16_conversion_and_range(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(Q.to_f16(x), x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(Q.from_f16(Q.to_f16(x)), x.astype(np.float16).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match="65504"):
        Q.to_f16(np.float32([1.0, 7e4]))


# ---------------------------------------------------------------------------------------------
# Float-activation products
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "float16", "bfloat16"])
def test_fma_panels_match_float64(fmt, rng):
    K, C = 77, 48
    W = rng.standard_normal((K, C)).astype(np.float32)
    z = rng.standard_normal(K).astype(np.float32)
    if fmt == "int8":
        Wr, _ = Q.quantize_columns(W)
        exact = Wr.astype(np.float64)
    elif fmt == "float16":
        Wr = Q.to_f16(W)
        exact = Q.from_f16(Wr).astype(np.float64)
    else:
        Wr = Q.to_bf16(W)
        exact = Q.from_bf16(Wr).astype(np.float64)
    Wp = Q.pack_panels(Wr)
    out = np.zeros(C, np.float32)
    KQ.fma_panels(Wp, z, 3, 70, 0, C // 16, out)
    ref = z[3:70].astype(np.float64) @ exact[3:70]
    bound = 1e-6 * (np.abs(z[3:70]) @ np.abs(exact[3:70])) + 1e-30
    assert np.all(np.abs(out - ref) <= bound)
    port = np.zeros(C, np.float32)
    KQ.deq_portable(Q.pack_panels(exact.astype(np.float32)), z, 3, 70, 0, C // 16, port)
    assert np.all(np.abs(port - ref) <= bound)


@needs_bf16
def test_bf16_dot_product_with_split_activations(rng):
    K, C = 90, 32
    W = rng.standard_normal((K, C)).astype(np.float32)
    z = rng.standard_normal(K).astype(np.float32)
    B = Q.to_bf16(W)
    Wb2, pr = Q.pack_pairs(B, np.array([0, K]))
    hi, lo = Q.split_bf16(np.concatenate([z, np.zeros(2 * int(pr[-1]) - K, np.float32)]))
    out = np.zeros(C, np.float32)
    KQ.bf16_dp(Wb2, hi, lo, 0, int(pr[-1]), 0, C // 16, out)
    exact = Q.from_bf16(B).astype(np.float64)
    ref = z.astype(np.float64) @ exact
    # z = hi + lo to ~2^-16 relative, then float32 sums
    assert np.all(np.abs(out - ref) <= 2.0**-14 * (np.abs(z) @ np.abs(exact)))


# ---------------------------------------------------------------------------------------------
# Gate pre-activations and whole steps against a float64 reference with the dequantized weights
# ---------------------------------------------------------------------------------------------
def _int8_layer(rng, I, H):
    """A random layer quantized by quant.quantize_layer -> (packed arrays, the LayerParams it
    stands for: float64 dequantized weights)."""
    w_ih = rng.uniform(-0.3, 0.3, (4 * H, I))
    w_hh = rng.uniform(-0.3, 0.3, (4 * H, H))
    bias = rng.uniform(-0.5, 0.5, 4 * H)
    pk, q_ih, q_hh, sc = Q.quantize_layer(w_ih, w_hh, bias)
    assert np.all(np.abs(sc[:, None] * q_ih - w_ih) <= sc[:, None] * 0.5 * (1 + 1e-6))
    deq = LayerParams(w_ih=sc.astype(np.float64)[:, None] * q_ih, w_hh=sc.astype(np.float64)[:, None] * q_hh,
                      bias=bias.astype(np.float32).astype(np.float64))  # the kernels' float32 bias
    return pk, deq


@pytest.mark.parametrize("kern", A16_KERNELS)
def test_int8_gates_within_the_activation_quantization_bound(kern, rng):
    I, H = 19, 40
    pk, deq = _int8_layer(rng, I, H)
    Wd = Q.fuse_gates(deq.w_ih, deq.w_hh)  # (K, C)
    C = Wd.shape[1]
    z = np.concatenate([rng.standard_normal(I) * 2, np.tanh(rng.standard_normal(H))]).astype(np.float32)
    K4 = int(pk["qrows"][-1])
    zhi, zlo = np.full(4 * K4, 128, np.uint8), np.zeros(4 * K4, np.uint8)
    acc = np.zeros(C, np.float32)
    KQ.i8a16_gates(kern, pk["Wq4"], z, pk["krows"], pk["qrows"], pk["sw"], pk["colsum"], pk["bias"],
                   zhi, zlo, np.zeros((2, C), np.int32), np.zeros((2, C), np.int32), acc)
    ref = z.astype(np.float64) @ Wd + pk["bias"]
    # each activation is off by at most half a step s_seg / 2 = max|z_seg| / 65534
    step = np.concatenate([np.full(I, np.abs(z[:I]).max()), np.full(H, np.abs(z[I:]).max())]) / 65534
    bound = step @ np.abs(Wd) + 1e-6 * (np.abs(z) @ np.abs(Wd) + np.abs(pk["bias"]))
    assert np.all(np.abs(acc - ref) <= bound)


def _stack(rng, I, H, L):
    packed, layers = [], []
    for l in range(L):
        pk, deq = _int8_layer(rng, I if l == 0 else H, H)
        packed.append(pk)
        layers.append([deq])
    return layers, packed


def _run_i8a16(kern, packed, xs, H):
    L = len(packed)
    Hp = Q.padded_units(H)
    C = 4 * Hp
    K4 = max(int(p["qrows"][-1]) for p in packed)
    h, c = np.zeros((L, H), np.float32), np.zeros((L, Hp), np.float32)
    args = [tuple(p[k] for p in packed) for k in ("Wq4",)]
    krows = np.stack([p["krows"] for p in packed])
    qrows = np.stack([p["qrows"] for p in packed])
    ys = []
    for x in xs:
        KQ.i8a16_stack_step(kern, x, args[0], krows, qrows, tuple(p["sw"] for p in packed),
                            tuple(p["colsum"] for p in packed), tuple(p["bias"] for p in packed), h, c,
                            np.zeros(max(p["krows"][-1] for p in packed), np.float32),
                            np.full(4 * K4, 128, np.uint8), np.zeros(4 * K4, np.uint8),
                            np.zeros((2, C), np.int32), np.zeros((2, C), np.int32), np.zeros(C, np.float32))
        ys.append(h[-1].copy())
    return np.stack(ys)


def test_int8_stack_follows_the_float64_reference_with_dequantized_weights(rng):
    I, H, L, T = 12, 24, 2, 60
    layers, packed = _stack(rng, I, H, L)
    xs = rng.standard_normal((T, I)).astype(np.float32)
    kern = KQ.select_int8(FEATS)[1] if KQ.has_vnni512(FEATS) else KQ.i8a16_portable
    ys = _run_i8a16(kern, packed, xs, H)
    ref, _ = naive.run(layers, xs[:, None, :].astype(np.float64))
    # 16-bit activations: per-step gate errors ~1e-5 here; fed back over 60 steps they stay small
    # while a wrong gate, scale or segment gives errors of order 0.1
    assert np.abs(ys - ref[:, 0, :]).max() < 2e-4


@needs_vnni512
def test_vnni_and_portable_steps_are_bit_identical(rng):
    layers, packed = _stack(rng, 9, 32, 2)
    xs = rng.standard_normal((20, 9)).astype(np.float32)
    np.testing.assert_array_equal(_run_i8a16(KQ.i8a16_vnni, packed, xs, 32),
                                  _run_i8a16(KQ.i8a16_portable, packed, xs, 32))


def test_selection_never_picks_vnni_without_the_feature():
    avx2 = frozenset({"avx", "avx2", "fma", "f16c"})
    assert KQ.select_int8(avx2) == ("deq", KQ.fma_panels)
    assert not KQ.has_vnni512(avx2) and not KQ.has_vnni256(avx2) and not KQ.has_bf16dp(avx2)
    assert KQ.has_vnni256(frozenset({"avxvnni"}))
    assert KQ.select_16bit("float16", frozenset({"avx2"})) is None
    assert KQ.select_16bit("bfloat16", frozenset({"avx2"})) is KQ.fma_panels


def test_assembly_uses_the_dot_product_instructions():
    """What the module docstring reports: vpdpbusd / vdpbf16ps on zmm registers."""
    if not (KQ.has_vnni512(FEATS) and KQ.has_bf16dp(FEATS)):
        pytest.skip("CPU without AVX-512 VNNI and BF16")
    rep = KQ.asm_report()
    assert rep["i8a16_vnni"]["vpdpbusd"] > 0 and rep["i8a16_vnni"]["zmm"]
    assert rep["bf16_dp"]["vdpbf16ps"] > 0 and rep["bf16_dp"]["zmm"]
    assert rep["fma_panels[float16]"]["vcvtph2ps"] > 0


@needs_bf16
def test_bf16_gates_split_the_activations_exactly_enough(rng):
    I, H = 11, 32
    W = Q.fuse_gates(rng.uniform(-0.3, 0.3, (4 * H, I)), rng.uniform(-0.3, 0.3, (4 * H, H)))  # (K, C)
    K, C = W.shape
    B = Q.to_bf16(W)
    Wb2, pr = Q.pack_pairs(B, np.array([0, I, K]))
    z = np.concatenate([rng.standard_normal(I) * 3, np.tanh(rng.standard_normal(H))]).astype(np.float32)
    zhi, zlo = np.zeros(2 * int(pr[-1]), np.uint16), np.zeros(2 * int(pr[-1]), np.uint16)
    KQ.split_bf16(z, 0, K, zhi, zlo, 0)
    np.testing.assert_array_equal(zhi[:K], Q.to_bf16(z).view(np.uint16))  # the numpy rounding
    np.testing.assert_array_equal(zlo[:K], Q.to_bf16(z - Q.from_bf16(Q.to_bf16(z))).view(np.uint16))
    bias = rng.standard_normal(C).astype(np.float32)
    acc = np.zeros(C, np.float32)
    KQ.bf16_gates(Wb2, z, np.array([0, I, K]), pr, bias, np.zeros_like(zhi), np.zeros_like(zlo),
                  np.zeros(C, np.float32), acc)
    exact = Q.from_bf16(B).astype(np.float64)
    ref = z.astype(np.float64) @ exact + bias
    assert np.all(np.abs(acc - ref) <= 2.0**-14 * (np.abs(z) @ np.abs(exact) + np.abs(bias)))


# ---------------------------------------------------------------------------------------------
# ReducedStack / error_estimate: the building blocks for LSTMModel(weights=...)
# ---------------------------------------------------------------------------------------------
def _model(rng, I=9, H=24, L=2):
    from lstm_cpu import LSTMModel

    layers = [[LayerParams(w_ih=rng.uniform(-0.4, 0.4, (4 * H, I if l == 0 else H)),
                           w_hh=rng.uniform(-0.4, 0.4, (4 * H, H)), bias=rng.uniform(-0.5, 0.5, 4 * H))]
              for l in range(L)]
    return LSTMModel(layers)


@pytest.mark.parametrize("kernel", [None, ("deq", KQ.fma_panels), ("a16", KQ.i8a16_portable)],
                         ids=["host", "deq", "portable"])
def test_reduced_int8_stream_follows_its_dequantized_weights(kernel, rng):
    model = _model(rng)
    rs = Q.ReducedStack(model.layer_params(), "int8", kernel=kernel)
    xs = rng.standard_normal((40, model.input_size)).astype(np.float32)
    s = rs.stream()
    ys = np.stack([s.step(x) for x in xs])
    ref, _ = naive.run(rs.deq, xs[:, None, :].astype(np.float64))
    assert np.abs(ys - ref[:, 0]).max() < 2e-4


def test_reduced_weights_are_a_quarter_and_a_half(rng):
    model = _model(rng, I=64, H=128)
    assert Q.ReducedStack(model.layer_params(), "int8").nbytes <= 0.26 * model.weight_bytes
    assert Q.ReducedStack(model.layer_params(), "bfloat16").nbytes <= 0.51 * model.weight_bytes


@pytest.mark.parametrize("kernel", [None, ("fma", KQ.fma_panels)], ids=["host", "fma"])
def test_reduced_bfloat16_stream_follows_bf16_weights(kernel, rng):
    model = _model(rng)
    params = model.layer_params()
    rs = Q.ReducedStack(params, "bfloat16", kernel=kernel)
    bf = [[LayerParams(w_ih=Q.from_bf16(Q.to_bf16(p.w_ih)).astype(np.float64),
                       w_hh=Q.from_bf16(Q.to_bf16(p.w_hh)).astype(np.float64),
                       bias=p.bias.astype(np.float32).astype(np.float64))] for (p,) in params]
    xs = rng.standard_normal((40, model.input_size)).astype(np.float32)
    s = rs.stream()
    ys = np.stack([s.step(x) for x in xs])
    ref, _ = naive.run(bf, xs[:, None, :].astype(np.float64))
    assert np.abs(ys - ref[:, 0]).max() < 1e-4


def test_error_estimate_is_deterministic_and_bounded(rng):
    from lstm_cpu import LSTMModel

    model = _model(rng)
    m8 = LSTMModel(model.layer_params(), weights="int8")
    e8 = Q.error_estimate(model, m8, steps=200)
    assert e8 == Q.error_estimate(model, m8, steps=200)
    assert 0 < e8 < 2e-2
    assert m8.weight_error >= e8  # 1,000 steps at conversion include these 200
    assert 0 < LSTMModel(model.layer_params(), weights="bfloat16").weight_error < 2e-2


def test_reduced_formats_refuse_what_the_cell_cannot_run(rng):
    H = 16
    p = LayerParams(w_ih=rng.standard_normal((4 * H, 3)), w_hh=rng.standard_normal((4 * H, H)),
                    peephole=rng.standard_normal(3 * H))
    with pytest.raises(UnsupportedModelError, match="peepholes"):
        Q.ReducedStack([[p]], "int8")
    with pytest.raises(UnsupportedModelError, match="'int8' or 'bfloat16'"):
        Q.ReducedStack([[p]], "float16")
    assert not Q.reduced_stream_supported([[LayerParams(w_ih=p.w_ih, w_hh=p.w_hh)]], clip=3.0)
