"""What one benchmark run measures (:class:`BenchConfig`) and the constants every module shares."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError

#: A peer whose outputs differ from ours by more than this (max abs, float32) is a mismatch.
TOLERANCE = 1e-4
#: Peers in the order they are reported; ``--compare`` accepts these names. "onnxruntime-int8" is
#: onnxruntime on ``onnxruntime.quantization.quantize_dynamic`` of the same export
#: (DynamicQuantizeLSTM): the int8 peer of ``--weights int8``; it runs only when asked for.
PEERS = ("onnxruntime", "torch", "openvino", "onnxruntime-int8")
DEFAULT_PEERS = ("onnxruntime", "torch", "openvino")
#: The check's bound when either side runs reduced weights: their quantization error, not a
#: different model (measured errors against float32 over 300 steps: 2e-4 to 6e-3).
REDUCED_TOLERANCE = 5e-2
MODES = ("step", "sequence", "streams")
#: The embedded default model: input size, hidden size, layers.
DEFAULT_SIZE = (64, 256, 2)
DEFAULT_SEED = 0
#: Steps of the validation sequence run by every runtime before timing.
CHECK_STEPS = 8
SCHEMA = "lstm-cpu-bench/1"

#: Per mode: (timed calls, warm-up calls, batch) when not given.
_DEFAULTS = {"step": (2000, 200, 1), "streams": (500, 50, 64), "sequence": (10, 2, 1)}


@dataclass
class BenchConfig:
    """What to measure. ``steps``/``warmup`` count calls: one step, or one whole sequence."""

    mode: str = "step"
    steps: Optional[int] = None  # timed calls per runtime; None: a default per mode
    warmup: Optional[int] = None  # untimed calls per runtime before the rounds
    rounds: int = 10  # interleaved rounds; each times steps/rounds calls per runtime
    threads: int = 1
    seq_len: int = 500
    batch: Optional[int] = None  # None: 1 for step and sequence, 64 for streams
    compare: Optional[Sequence[str]] = None  # None: every peer (a missing one is skipped)
    size: Tuple[int, int, int] = DEFAULT_SIZE
    seed: int = DEFAULT_SEED
    model_path: Optional[str] = None
    weights: Optional[str] = None  # ours: "float32", "int8", "bfloat16" (None: the file's own)
    load_options: Dict[str, object] = field(default_factory=dict)
    membw_mb: int = 256  # size of the array copied for the memory-bandwidth figure; 0: skip
    cold_process: bool = False  # also measure compile and cold start in fresh processes
    progress: Optional[bool] = None  # None: only when stderr is a terminal
    command: Optional[str] = None  # recorded in the result

    def resolved(self) -> "BenchConfig":
        """A copy with every default filled in and every value checked (InputError if bad)."""
        c = BenchConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        if c.mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {c.mode!r}")
        steps, warmup, batch = _DEFAULTS[c.mode]
        c.steps = steps if c.steps is None else c.steps
        c.warmup = warmup if c.warmup is None else c.warmup
        c.batch = batch if c.batch is None else c.batch
        if c.mode == "step" and c.batch != 1:
            raise InputError(f"mode 'step' streams one sample (batch 1), got --batch {c.batch}; "
                             "use --mode streams for batched streams")
        for name in ("steps", "rounds", "threads", "seq_len", "batch"):
            v = getattr(c, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if c.warmup < 0:
            raise InputError(f"warmup must be >= 0, got {c.warmup}")
        c.rounds = min(c.rounds, c.steps)
        if len(c.size) != 3 or min(c.size) < 1:
            raise InputError(f"size must be three positive integers I,H,L, got {c.size!r}")
        if c.weights is not None:
            from ..quant import check_format  # noqa: PLC0415

            check_format(c.weights)
        if c.compare is not None:
            bad = [p for p in c.compare if p not in PEERS]
            if bad:
                raise InputError(f"unknown peer {bad[0]!r}; expected some of {', '.join(PEERS)}")
        return c
