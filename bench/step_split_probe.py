"""Probe: the batched parallel step, split by panel and unit ranges or by groups of streams.

    python bench/step_split_probe.py

us per step (best of 5), 2 threads, for N = 8 / 16 / 64 streams of the three benchmark sizes:
``stack_step_serial``, ``stack_step_parallel`` (two regions per layer: the product over panel
ranges, the cells over (group, unit range) tasks) and ``stack_step_split`` (one region per step:
each thread steps its own streams through every layer). Also checks that all three leave the
same bits. policy.step_groups quotes the figures.
"""
import numpy as np, time
from lstm_cpu import kernels, layout as lay
from lstm_cpu.bench.models import embedded_model
for size in ((32,64,1), (128,256,2), (512,1024,1)):
    m = embedded_model(size)
    for N in (8, 16, 64):
        st = m.stream(batch=N, kernel="parallel")
        wbuf, meta, fpar = m._wbuf, m._meta, m._fpar
        x = np.random.default_rng(0).standard_normal(N * size[0]).astype(np.float32)
        R = lay.unit_ranges(m._plan.Hp, 2)
        res = {}
        outs = {}
        for name, fn, arg in (("serial", None, None), ("parallel", kernels.stack_step_parallel, R), ("split", kernels.stack_step_split, 2)):
            sbuf = st._sbuf.copy(); y = np.empty(N * m.output_size, np.float32)
            if fn is None:
                call = lambda: kernels.stack_step_serial(x, wbuf, meta, fpar, sbuf, y)
            else:
                call = lambda: fn(x, arg, wbuf, meta, fpar, sbuf, y)
            call(); reps = max(5, int(0.3 / max(1e-6, (lambda t0: (call(), time.perf_counter() - t0)[1])(time.perf_counter()))))
            b = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps): call()
                b = min(b, (time.perf_counter() - t) / reps)
            res[name] = b * 1e6
            sb = st._sbuf.copy(); yy = np.empty_like(y)
            if fn is None: kernels.stack_step_serial(x, wbuf, meta, fpar, sb, yy)
            else: fn(x, arg, wbuf, meta, fpar, sb, yy)
            outs[name] = (sb, yy)
        print({k: (int((outs[k][0] != outs["serial"][0]).sum()), int((outs[k][1] != outs["serial"][1]).sum())) for k in outs})
        same = all(np.array_equal(outs[k][0], outs["serial"][0]) and np.array_equal(outs[k][1], outs["serial"][1]) for k in outs)
        print(size, N, " ".join(f"{k} {v:8.1f}" for k, v in res.items()), "same bits" if same else "DIFFER")
