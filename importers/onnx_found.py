"""What an ONNX finder returns: a candidate LSTM and how to build it.

A finder is ``find_xxx(model: onnx.ModelProto, folder: str | None, label: str) -> list[Found]``
(``folder``: where external data may be read from; ``label``: the file, for messages). Finders
look; ``build()`` does the work of reading weights and checking them, only for the candidate
picked. ``importers/onnx_lstm.py`` runs every finder in ``FINDERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

from lstm_cpu.candidates import Candidate


@dataclass(frozen=True)
class Found:
    """candidate: the record ``lstm_cpu.inspect`` shows.
    build: ``() -> (layers, options)``: ``layers[l][d]`` canonical ``LayerParams``; ``options``
    the ``LSTMModel`` keywords ``clip``, ``input_forget``, ``initial_state``, ``reverse``, ``source``.
    aliases: other names ``node=`` accepts for it (e.g. every node of a chain)."""

    candidate: Candidate
    build: Callable[[], Tuple[List[list], dict]]
    aliases: Tuple[str, ...] = ()


__all__ = ["Found"]
