"""Outputs of a fixed set of models and calls, for comparing the code of two instruction sets.

``tests/test_vector_width.py`` computes :func:`outputs` in the test process (the host's code) and
in a child compiled for another CPU (``NUMBA_CPU_NAME``), and asserts they are equal bit for bit:
the kernels' block sizes follow the vector width, their float order does not. Deterministic: the
same models and inputs in every process.
"""

from __future__ import annotations

import numpy as np

from lstm_cpu import LayerParams, LSTMModel, kernels

# name -> (I, H, L, D, P, peepholes, clip, dtype)
MODELS = {
    "plain": (13, 200, 1, 1, 0, False, None, np.float32),
    "two layers": (21, 72, 2, 1, 0, False, None, np.float32),
    "bidirectional": (9, 130, 2, 2, 0, False, None, np.float32),
    "projection": (17, 150, 1, 1, 40, False, None, np.float32),
    "peepholes+clip": (11, 96, 1, 1, 0, True, 2.0, np.float32),
    "float64": (7, 70, 1, 1, 0, False, None, np.float64),
}
#: batch sizes that reach every block shape of both ISAs (1, 2, 3, 3..6-stream blocks, remainders)
BATCHES = (1, 2, 3, 5, 7, 16)
STREAMS = 64
T = 19


def build(name):
    I, H, L, D, P, peep, clip, dtype = MODELS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    out = P or H
    layers = [[LayerParams(rng.uniform(-.4, .4, (4 * H, I if l == 0 else D * out)),
                           rng.uniform(-.4, .4, (4 * H, out)), rng.uniform(-.4, .4, 4 * H),
                           peephole=rng.uniform(-.4, .4, 3 * H) if peep else None,
                           w_hr=rng.uniform(-.4, .4, (P, H)) if P else None)
               for _ in range(D)] for l in range(L)]
    return LSTMModel(layers, clip=clip, dtype=dtype), I


def outputs() -> dict:
    """{key: array}: ``run`` (serial and parallel kernels) at every batch size, ``Stream.step``
    for 1 and 64 streams, for every model; plus ``v8`` (whether the 256-bit blocks ran)."""
    res = {"v8": np.array(kernels.V8_BLOCKS)}
    for name in MODELS:
        m, I = build(name)
        rng = np.random.default_rng(7)
        for B in BATCHES:
            x = rng.standard_normal((T, B, I)).astype(m.dtype)
            lengths = rng.integers(0, T + 1, B)
            lengths[0] = T
            for kernel in ("serial", "parallel"):
                y, (h, c) = m.run(x, lengths=lengths, kernel=kernel)
                res[f"{name}/run/B={B}/{kernel}/y"] = y
                res[f"{name}/run/B={B}/{kernel}/c"] = c
        if m.num_directions == 1:
            for N in (1, STREAMS):
                for kernel in ("serial", "parallel"):
                    s = m.stream(batch=N, kernel=kernel)
                    xs = rng.standard_normal((5, N, I)).astype(m.dtype)
                    res[f"{name}/step/N={N}/{kernel}"] = np.stack([np.array(s.step(x)) for x in xs])
    return res
