"""The model a benchmark times: the embedded default, or a file; and what the report says of it.

Everything here reads the model through its public API (``layer_params()``, ``head``,
``weight_bytes``, ``info()``), so that the benchmark survives changes to the packed layout.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..spec import LayerParams
from .config import DEFAULT_SEED, DEFAULT_SIZE, BenchConfig


def embedded_layers(input_size: int, hidden_size: int, num_layers: int,
                    seed: int = DEFAULT_SEED) -> List[List[LayerParams]]:
    """A fixed-seed unidirectional stack, initialised like torch (uniform +-1/sqrt(H)), float32."""
    rng = np.random.default_rng(seed)
    k = 1.0 / math.sqrt(hidden_size)

    def u(*shape):
        return rng.uniform(-k, k, size=shape).astype(np.float32)

    layers = []
    for layer in range(num_layers):
        n_in = input_size if layer == 0 else hidden_size
        layers.append([LayerParams(
            w_ih=u(4 * hidden_size, n_in),         # (4H, in)   gates i, f, g, o
            w_hh=u(4 * hidden_size, hidden_size),  # (4H, H)
            bias=u(4 * hidden_size) + u(4 * hidden_size),  # (4H,) b_ih + b_hh folded
        )])
    return layers


def embedded_model(size: Sequence[int] = DEFAULT_SIZE, seed: int = DEFAULT_SEED):
    """The default benchmark model as an LSTMModel."""
    from ..model import LSTMModel  # noqa: PLC0415 - keep `import lstm_cpu.bench` cheap

    i, h, n = (int(v) for v in size)
    return LSTMModel(embedded_layers(i, h, n, seed),
                     source={"format": "embedded", "seed": seed, "size": f"{i},{h},{n}"})


def load_bench_model(cfg: BenchConfig) -> Tuple[object, str]:
    """(model, a one-line description of where it came from)."""
    if cfg.model_path:
        import lstm_cpu  # noqa: PLC0415

        opts = {k: v for k, v in cfg.load_options.items() if v is not None}
        return lstm_cpu.load(cfg.model_path, **opts), os.path.basename(cfg.model_path)
    i, h, n = cfg.size
    return embedded_model(cfg.size, cfg.seed), f"embedded I={i} H={h} L={n} seed={cfg.seed}"


def float32_layers(model) -> List[List[LayerParams]]:
    """``model.layer_params()`` as float32 C arrays: the weights every peer is given."""
    def f32(a):
        return None if a is None else np.ascontiguousarray(a, np.float32)

    return [[LayerParams(f32(p.w_ih), f32(p.w_hh), f32(p.bias), f32(p.w_hr), f32(p.peephole),
                         p.activations) for p in dirs]
            for dirs in model.layer_params()]


def matmul_flops(model, layers: List[List[LayerParams]]) -> int:
    """Floating-point operations of one step's matrix products at batch 1 (2 per weight)."""
    n = sum(int(np.size(a)) for dirs in layers for p in dirs
            for a in (p.w_ih, p.w_hh, p.w_hr) if a is not None)
    head = model.head
    if head is not None:
        n += int(np.size(head[0]))
    return 2 * n


def describe_model(model, source: str) -> Dict[str, object]:
    """The report's "model" record: where it came from, its sizes and what a step reads."""
    info = model.info()
    d = {"source": source}
    for k in ("input_size", "hidden_size", "proj_size", "num_layers", "num_directions",
              "output_size", "dtype"):
        d[k] = info[k]
    d["weight_bytes"] = int(model.weight_bytes)
    d["parameter_count"] = info["parameters"]
    for k in ("kernel", "chunks"):  # the packing's choices, while the model reports them
        if k in info:
            d[k] = info[k]
    return d
