"""What an ONNX finder returns: one LSTM it found, and how to build it.

A finder is ``find_xxx(model: onnx.ModelProto, folder: str, label: str) -> list[Found]``. Each
:class:`Found` pairs the :class:`~lstm_cpu.candidates.Candidate` that ``inspect`` lists with a
``build()`` that does the (possibly costly) weight extraction only when that candidate is loaded:
``build() -> (layers, options)``, ``layers[l][d]`` canonical :class:`~lstm_cpu.spec.LayerParams`
and ``options`` keyword arguments of :class:`~lstm_cpu.model.LSTMModel` (``clip``,
``input_forget``, ``initial_state``, ``reverse``, ``source``, ...).
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Tuple

from lstm_cpu.candidates import Candidate
from lstm_cpu.spec import LayerParams


class Found(NamedTuple):
    candidate: Candidate
    build: Callable[[], Tuple[List[List[LayerParams]], dict]]


__all__ = ["Found"]
