"""Probe: reduced-precision gate products and steps vs onnxruntime's int8 LSTM (issue 11).

Side by side in one process, 1 thread, batch 1, state fed back every step:

* per-layer gate product time (the (K, C) product of the largest layer) for the float32 axpy
  kernel (``kernels._product``) and every kernel of ``kernels_quant``;
* whole-step time of our simulated int8 / 16-bit stacks (``kernels_quant.i8_stack_step`` /
  ``w_stack_step``: products + activation quantization + float epilogue), lstm-cpu's float32
  stream, onnxruntime float32 and onnxruntime int8 (``quantize_dynamic`` on the torch export:
  ``DynamicQuantizeLSTM``);
* accuracy: max abs output error of each against the float32 torch model (evaluated in float64)
  over 300 fed-back steps of N(0, 1) inputs.

Every variant is validated (its first outputs against the reference) before it is timed. Timing
is in interleaved rounds (one block per runtime per round, rotating order); p50 over calls.

    PYTHONPATH=$PWD python bench/quant_probe.py [--sizes 128,256,2 ...] [--steps 2000] [--cpu 1]

Last run (AMD EPYC, AVX-512 VNNI + BF16, 2 cores shared with other jobs: load average 7-8, so
every memory-bound figure is inflated; µs per step, p50, error vs the float32 torch model):

| (I, H, L)    | ort int8        | lstm-cpu int8          | ort fp32 | lstm-cpu fp32 | lstm-cpu bfloat16      |
|--------------|-----------------|------------------------|----------|---------------|------------------------|
| 128, 256, 2  | 39.5 (1.14e-3)  | 22.7 (6.6e-4) 1.74x    | 70.5     | 61.1          | 30.7 (2.3e-4) 1.99x fp32 |
| 256, 512, 2  | 83.3 (1.20e-3)  | 64.2 (6.1e-4) 1.30x    | 280.3    | 286.6         | 101.7 (2.8e-4) 2.8x fp32 |
| 512, 1024, 1 | 105.8 (6.34e-3) | 95.0 (2.9e-3) 1.11x    | 682.4    | 786.5         | 180.3 (1.1e-3) 4.4x fp32 |

Per-layer products at (512, 1024): int8 VNNI 92 G MAC/s (~92 GB/s of int8 weights, the
memory floor here: software prefetch did not help), bf16 ``vdpbf16ps`` 42-44, int8/f16/bf16
converted in the loop 28-31. The "fp32 axpy" product row is far slower than the engine's own
fp32 step since the merge (timed from Python; not investigated): compare steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lstm_cpu  # noqa: E402
from lstm_cpu import kernels as K0  # noqa: E402
from lstm_cpu import kernels_quant as KQ  # noqa: E402
from lstm_cpu import quant as Q  # noqa: E402
from lstm_cpu.layout import to_panels  # noqa: E402


@K0.njit(**dict(K0._FLAGS, cache=False))
def _fp32_product(Wp, z, acc):
    """The engine's float32 gate product (kernels._product) for one stream over panels."""
    K0._product(z.reshape((1, z.shape[0])), Wp, acc.reshape((1, acc.shape[0])), 0, Wp.shape[0], 0, Wp.shape[1])

SIZES = [(128, 256, 2), (256, 512, 2), (512, 1024, 1)]
ACC_STEPS = 300


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def torch_model(I, H, L, seed=0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.LSTM(I, H, num_layers=L).eval()


def canonical(m, L):
    """torch nn.LSTM -> per layer (w_ih (4H, in), w_hh (4H, H), bias (4H,)) float64."""
    out = []
    for l in range(L):
        g = lambda n: getattr(m, f"{n}_l{l}").detach().double().numpy()  # noqa: E731
        out.append((g("weight_ih"), g("weight_hh"), g("bias_ih") + g("bias_hh")))
    return out


def onnx_sessions(m, I, H, L, tmp):
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import quantize_dynamic

    f32 = os.path.join(tmp, "f32.onnx")
    i8 = os.path.join(tmp, "i8.onnx")
    x = torch.zeros(1, 1, I)
    h0 = torch.zeros(L, 1, H)
    torch.onnx.export(m, (x, (h0, h0)), f32, input_names=["x", "h0", "c0"],
                      output_names=["y", "hn", "cn"], dynamo=False)
    quantize_dynamic(f32, i8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    ops = {n.op_type for n in __import__("onnx").load(i8).graph.node}
    assert "DynamicQuantizeLSTM" in ops, ops
    return (ort.InferenceSession(f32, so, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(i8, so, providers=["CPUExecutionProvider"]))


class OrtStep:
    def __init__(self, sess, L, H):
        self.sess = sess
        self.feeds = {"x": None, "h0": np.zeros((L, 1, H), np.float32), "c0": np.zeros((L, 1, H), np.float32)}

    def step(self, x):  # x (I,)
        self.feeds["x"] = x.reshape(1, 1, -1)
        y, h, c = self.sess.run(None, self.feeds)
        self.feeds["h0"], self.feeds["c0"] = h, c
        return y.reshape(-1)


class OursStep:
    """A simulated stack of one of our reduced kernels (products + float epilogue)."""

    def __init__(self, layers, I, H, kind, kern):
        L = len(layers)
        Hp = Q.padded_units(H)
        C = 4 * Hp
        self.kind, self.kern = kind, kern
        self.entry = None
        Ws, sws, css, bs, krs, qrs = [], [], [], [], [], []
        for l, (w_ih, w_hh, b) in enumerate(layers):
            if kind in ("i8q", "i8a16", "i8deq"):
                # per-column scales over the fused rows; x and h_prev rows are two segments
                pk = Q.quantize_layer(w_ih, w_hh, b)[0]
                Ws.append(pk["Wp"] if kind == "i8deq" else pk["Wq4"])
                css.append(pk["colsum"])
                krs.append(pk["krows"])
                qrs.append(pk["qrows"])
                sws.append(pk["sw"])
                bs.append(pk["bias"])
                continue
            W = Q.fuse_gates(w_ih, w_hh)  # (K, C)
            if kind == "bf16dp":
                Wb2, pr = Q.pack_pairs(Q.to_bf16(W), np.array([0, W.shape[0]]))
                Ws.append(Wb2)
                krs.append(np.array([0, W.shape[0]]))
                qrs.append(pr)
                sws.append(np.ones((1, C), np.float32))
                bs.append(Q.fuse_vector(b, H).astype(np.float32))
                continue
            Ws.append(Q.pack_panels(Q.to_f16(W) if kind == "f16" else Q.to_bf16(W)))
            krs.append(np.array([0, W.shape[0]]))
            sws.append(np.ones((1, C), np.float32))
            bs.append(Q.fuse_vector(b, H).astype(np.float32))
        self.Ws, self.sws, self.bs = tuple(Ws), tuple(sws), tuple(bs)
        self.krows = np.stack(krs).astype(np.int64)
        self.weight_bytes = sum(w.nbytes for w in Ws) + sum(s.nbytes for s in sws)
        kmax = max(int(r[-1]) for r in krs)
        self.h = np.zeros((L, H), np.float32)
        self.c = np.zeros((L, Hp), np.float32)
        self.z = np.zeros(kmax, np.float32)
        self.acc = np.zeros(C, np.float32)
        if kind in ("i8q", "i8a16"):
            self.css = tuple(css)
            self.qrows = np.stack(qrs).astype(np.int64)
            self.zq = np.full(4 * int(self.qrows[:, -1].max()), 128, np.uint8)
            self.iacc = np.zeros(C, np.int32)
            self.zlo = np.zeros_like(self.zq)
            self.ihi = np.zeros((2, C), np.int32)  # (segments, C): x rows and h_prev rows
            self.ilo = np.zeros((2, C), np.int32)
        else:
            self.facc = np.zeros(C, np.float32)
        if kind == "bf16dp":
            self.qrows = np.stack(qrs).astype(np.int64)
            self.zq = np.zeros(2 * int(self.qrows[:, -1].max()), np.uint16)
            self.zlo = np.zeros_like(self.zq)

    def step(self, x):
        # the compiled entry point, as the engine calls its kernels (no per-call type resolution)
        if self.kind == "i8a16":
            if self.entry is None:
                self.entry = K0.compiled_entry(KQ.i8a16_stack_step, (self.kern, x, self.Ws, self.krows, self.qrows, self.sws, self.css, self.bs,
                                self.h, self.c, self.z, self.zq, self.zlo, self.ihi, self.ilo, self.acc))
            self.entry(self.kern, x, self.Ws, self.krows, self.qrows, self.sws, self.css, self.bs,
                                self.h, self.c, self.z, self.zq, self.zlo, self.ihi, self.ilo, self.acc)
        elif self.kind == "bf16dp":
            if self.entry is None:
                self.entry = K0.compiled_entry(KQ.bf16_stack_step, (x, self.Ws, self.krows, self.qrows, self.bs,
                                               self.h, self.c, self.z, self.zq, self.zlo, self.facc, self.acc))
            self.entry(x, self.Ws, self.krows, self.qrows, self.bs, self.h, self.c, self.z, self.zq, self.zlo,
                       self.facc, self.acc)
        elif self.kind == "i8q":
            if self.entry is None:
                self.entry = K0.compiled_entry(KQ.i8_stack_step, (self.kern, x, self.Ws, self.krows, self.qrows, self.sws, self.css, self.bs,
                             self.h, self.c, self.z, self.zq, self.iacc, self.acc))
            self.entry(self.kern, x, self.Ws, self.krows, self.qrows, self.sws, self.css, self.bs,
                             self.h, self.c, self.z, self.zq, self.iacc, self.acc)
        else:
            if self.entry is None:
                self.entry = K0.compiled_entry(KQ.w_stack_step, (self.kern, x, self.Ws, self.krows, self.sws, self.bs, self.h, self.c,
                            self.z, self.facc, self.acc))
            self.entry(self.kern, x, self.Ws, self.krows, self.sws, self.bs, self.h, self.c,
                            self.z, self.facc, self.acc)
        return self.h[-1].copy()


class Fp32Step:
    """lstm-cpu's own stream (weights="float32", or the integrated int8 / bfloat16 path)."""

    def __init__(self, m, weights="float32"):
        self.model = lstm_cpu.from_torch(m, weights=weights)
        self.s = self.model.stream(kernel="serial")

    def step(self, x):
        return self.s.step(x)


def reference(m, xs):
    """The float32 torch model evaluated in float64, state fed back: xs (T, I) -> (T, H)."""
    import copy

    import torch

    md = copy.deepcopy(m).double()
    with torch.inference_mode():
        y, _ = md(torch.from_numpy(xs.astype(np.float64))[:, None, :])
    return y[:, 0, :].numpy()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def interleaved(calls, n_calls, rounds=10):
    """calls: {name: f()} -> {name: p50 seconds}; per-call timing, rotating order per round."""
    names = list(calls)
    ts = {n: [] for n in names}
    per = max(1, n_calls // rounds)
    pc = time.perf_counter
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            f = calls[n]
            f()
            for _ in range(per):
                t0 = pc()
                f()
                ts[n].append(pc() - t0)
    return {n: float(np.median(v)) for n, v in ts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=None, help="I,H,L triples")
    ap.add_argument("--steps", type=int, default=2000, help="timed calls per runtime")
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = ap.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    import torch

    torch.set_num_threads(1)
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    feats = KQ.host_features()
    print(f"host: vnni512={KQ.has_vnni512(feats)} vnni256={KQ.has_vnni256(feats)} "
          f"bf16={KQ.has_bf16dp(feats)} f16c={KQ.has_f16c(feats)}")
    i8_kerns = {"i8q-portable": KQ.i8_portable}
    if KQ.has_vnni256(feats):
        i8_kerns["i8q-vnni256"] = KQ.i8_vnni256
    if KQ.has_vnni512(feats):
        i8_kerns["i8q-vnni512"] = KQ.i8_vnni
    a16_kerns = {"i8a16-portable": KQ.i8a16_portable}
    if KQ.has_vnni512(feats):
        a16_kerns["i8a16-vnni512"] = KQ.i8a16_vnni
    w_kerns = {}
    if KQ.has_avx512(feats):
        w_kerns = {"i8deq": ("i8deq", KQ.fma_panels), "f16": ("f16", KQ.fma_panels), "bf16": ("bf16", KQ.fma_panels)}
    rows_out = []
    for I, H, L in sizes:
        m = torch_model(I, H, L)
        layers = canonical(m, L)
        rng = np.random.default_rng(1)
        xs = rng.standard_normal((ACC_STEPS, I)).astype(np.float32)
        ref = reference(m, xs)
        with tempfile.TemporaryDirectory() as tmp:
            s32, s8 = onnx_sessions(m, I, H, L, tmp)
            runners = {"ort-fp32": lambda: OrtStep(s32, L, H), "ort-int8": lambda: OrtStep(s8, L, H),
                       "lstm-cpu fp32": lambda: Fp32Step(m),
                       "lstm-cpu int8": lambda: Fp32Step(m, "int8"),
                       "lstm-cpu bfloat16": lambda: Fp32Step(m, "bfloat16")}
            for name, kern in i8_kerns.items():
                runners[name] = lambda kern=kern: OursStep(layers, I, H, "i8q", kern)
            for name, kern in a16_kerns.items():
                runners[name] = lambda kern=kern: OursStep(layers, I, H, "i8a16", kern)
            for name, (kind, kern) in w_kerns.items():
                runners[name] = lambda kind=kind, kern=kern: OursStep(layers, I, H, kind, kern)
            if KQ.has_bf16dp(feats):
                runners["bf16-vdpbf16ps"] = lambda: OursStep(layers, I, H, "bf16dp", None)
            # accuracy over ACC_STEPS fed-back steps (each runner fresh)
            err = {}
            for name, mk in runners.items():
                r = mk()
                ys = np.stack([r.step(x) for x in xs])
                err[name] = float(np.abs(ys - ref).max())
            # step timing, interleaved
            x0 = xs[0]
            live = {name: mk() for name, mk in runners.items()}
            calls = {name: (lambda r=r: r.step(x0)) for name, r in live.items()}
            step_t = interleaved(calls, args.steps)
            # per-layer product time of the largest layer (K = I + H, or 2H)
            Kl = max(I, H) + H
            C = 4 * Q.padded_units(H)
            prod = product_times(Kl, C, args.steps, feats)
        rows_out.append(((I, H, L), step_t, err, prod))
        report_size((I, H, L), step_t, err, prod)
    return rows_out


def product_times(K, C, n, feats):
    """Seconds per gate product (K, C) for every kernel; validated against float64 first."""
    rng = np.random.default_rng(2)
    W = (rng.standard_normal((K, C)) * 0.05).astype(np.float32)
    z = rng.standard_normal(K).astype(np.float32)
    P = C // Q.PANEL
    rows = np.array([0, K])
    Wq, sc = Q.quantize_columns(W, rows)
    Wq4 = Q.pack_quads(Wq, rows)
    K4 = Wq4.shape[1]
    zq = rng.integers(0, 256, 4 * K4).astype(np.uint8)
    ref_i = np.einsum("pqjr,qr->pj", Wq4.astype(np.int64).reshape(P, K4, 16, 4),
                      zq.astype(np.int64).reshape(K4, 4)).ravel()
    acc = np.zeros(C, np.float32)
    oi = np.zeros(C, np.int32)
    of = np.zeros(C, np.float32)
    Wp32 = to_panels(W)  # (C/64, K, 64) the engine's float layout
    calls = {"fp32 axpy": lambda: _fp32_product(Wp32, z, acc)}
    checks = {"fp32 axpy": (lambda: acc, W.astype(np.float64).T @ z, 1e-3)}

    def reset():
        acc[:] = 0

    calls["i8 portable"] = lambda: KQ.i8_portable(Wq4, zq, 0, K4, 0, P, oi)
    checks["i8 portable"] = (lambda: oi, ref_i, 0)
    if KQ.has_vnni512(feats):
        calls["i8 vnni512"] = lambda: KQ.i8_vnni(Wq4, zq, 0, K4, 0, P, oi)
        checks["i8 vnni512"] = (lambda: oi, ref_i, 0)
    if KQ.has_vnni256(feats):
        calls["i8 vnni256"] = lambda: KQ.i8_vnni256(Wq4, zq, 0, K4, 0, P, oi)
        checks["i8 vnni256"] = (lambda: oi, ref_i, 0)
    if KQ.has_avx512(feats):
        Wp = Q.pack_panels(Wq)
        Wh = Q.pack_panels(Q.to_f16(W))
        Wb = Q.pack_panels(Q.to_bf16(W))
        calls["i8 dequant"] = lambda: KQ.fma_panels(Wp, z, 0, K, 0, P, of)
        checks["i8 dequant"] = (lambda: of, Wq.astype(np.float64).T @ z, 1e-2)
        calls["f16 fma"] = lambda: KQ.fma_panels(Wh, z, 0, K, 0, P, of)
        checks["f16 fma"] = (lambda: of, Q.from_f16(Q.to_f16(W)).astype(np.float64).T @ z, 1e-4)
        calls["bf16 fma"] = lambda: KQ.fma_panels(Wb, z, 0, K, 0, P, of)
        checks["bf16 fma"] = (lambda: of, Q.from_bf16(Q.to_bf16(W)).astype(np.float64).T @ z, 1e-4)
    if KQ.has_bf16dp(feats):
        Wb2, pr = Q.pack_pairs(Q.to_bf16(W), rows)
        hi, lo = Q.split_bf16(np.concatenate([z, np.zeros(2 * int(pr[-1]) - K, np.float32)]))
        calls["bf16 vdpbf16ps"] = lambda: KQ.bf16_dp(Wb2, hi, lo, 0, int(pr[-1]), 0, P, of)
        checks["bf16 vdpbf16ps"] = (lambda: of, Q.from_bf16(Q.to_bf16(W)).astype(np.float64).T @ z, 1e-3)
    for name, f in calls.items():  # validate before timing
        reset()
        f()
        got, want, tol = checks[name]
        d = np.abs(got().astype(np.float64) - want).max()
        assert d <= tol, (name, d)
    return interleaved(calls, n)


def report_size(size, step_t, err, prod):
    I, H, L = size
    print(f"\n## (I, H, L) = {size}: step, 1 thread, batch 1, state fed back (p50)")
    base = step_t["ort-int8"]
    print(f"| runtime | µs/step | ort-int8 / this | max abs err vs fp32 torch ({ACC_STEPS} steps) |")
    print("|---|---|---|---|")
    for name, t in step_t.items():
        print(f"| {name} | {t * 1e6:.1f} | {base / t:.2f}x | {err[name]:.2e} |")
    fp = prod["fp32 axpy"]
    K = max(I, H) + H
    print(f"\nper-layer gate product ({K} x {4 * Q.padded_units(H)}):")
    print("| kernel | µs | fp32 / this | G MAC/s |")
    print("|---|---|---|---|")
    for name, t in prod.items():
        print(f"| {name} | {t * 1e6:.1f} | {fp / t:.2f}x | {K * 4 * H / t / 1e9:.0f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
