"""What every runner offers, and the state all of them start from.

A runner wraps one runtime on the benchmark's weights:

- ``outputs(xs)`` runs the short validation sequence ``xs (T, B, I)`` from the model's initial
  state, with exactly the state feeding that is timed, and returns ``(T, B, out)``;
- ``make_call()`` returns a zero-argument callable doing one timed unit (one step, or one whole
  sequence) on ``self.x`` with the state fed back;
- ``threads_of`` names the process-wide thread count the runtime reads
  (:class:`~lstm_cpu.bench.machine.ThreadPins` keys; None when it is fixed at construction).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import numpy as np


class PeerUnavailable(Exception):
    """A peer cannot run this model here (not installed, unsupported feature); carries the note."""


class Runner:
    name = "?"
    kind = "peer"  # "ours", "peer" or "bound"
    steps_per_call = 1  # time steps done by one call (T in sequence mode)
    threads_of: Optional[str] = None
    x: np.ndarray  # one timed call's input, set by the benchmark before make_call()

    def contexts(self) -> List[contextlib.AbstractContextManager]:
        """Context managers held open while this runner is timed (e.g. torch.inference_mode)."""
        return []

    def outputs(self, xs: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def make_call(self) -> Callable[[], object]:  # pragma: no cover - interface
        raise NotImplementedError


def initial_state(model, batch: int) -> Tuple[np.ndarray, np.ndarray]:
    """(h0 (L*D, B, out), c0 (L*D, B, H)) float32: the model's own starting state, batch-expanded."""
    ld = model.num_layers * model.num_directions
    out = model.proj_size or model.hidden_size
    h0 = np.zeros((ld, batch, out), np.float32)
    c0 = np.zeros((ld, batch, model.hidden_size), np.float32)
    init = model.initial_state  # (h0 (L*D, out), c0 (L*D, H)) or None: zeros
    if init is not None:
        h0[:] = np.asarray(init[0], np.float32)[:, None, :]
        c0[:] = np.asarray(init[1], np.float32)[:, None, :]
    return h0, c0
