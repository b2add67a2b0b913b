"""What ``lstm_cpu.inspect(path)`` returns: one record per LSTM found in a file.

A plain, frozen record (numpy-free, importable without any importer) so that a service can list
the LSTMs in a file, show them to an operator, and pass ``record.name`` back to ``load``. The
importers build these; this module only defines them.

``kind`` says how the LSTM is written in the file:

* ``"operator"``: an ONNX ``LSTM`` node (or a chain of them), or a PyTorch ``nn.LSTM`` /
  ``nn.LSTMCell`` state dict (``.pt``, ``.safetensors``, TorchScript);
* ``"cell"``: one LSTM cell written in primitive ONNX operators (MatMul/Gemm, Add, Split/Slice,
  Sigmoid, Tanh, Mul), as ``torch.onnx.export`` writes ``nn.LSTMCell`` or a hand-written cell;
* ``"unrolled"``: such a cell repeated over a fixed number of time steps with shared weights;
* ``"quantized"``: an ONNX ``com.microsoft`` ``DynamicQuantizeLSTM`` node.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("operator", "cell", "unrolled", "quantized")


@dataclass(frozen=True)
class Candidate:
    """One LSTM found in a file.

    name:      what ``load(path, node=name)`` (ONNX) or ``load(path, prefix=name)`` (PyTorch)
               accepts to pick this LSTM.
    kind:      one of :data:`KINDS`.
    input_size, hidden_size, num_layers, num_directions: its sizes.
    location:  where it lives: the graph path (``main``, ``main/If_0:then_branch``, ...) and the
               tensors it reads and writes, or the state-dict prefix; for people, not parsing.
    """

    name: str
    kind: str
    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    location: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def row(self) -> str:
        """One line for tables and error messages."""
        d = "bidirectional" if self.num_directions == 2 else "forward"
        return (f"{self.name!r}: {self.kind}, input {self.input_size}, hidden {self.hidden_size}, "
                f"{self.num_layers} layer(s), {d}; {self.location}")


def format_table(cands) -> str:
    """The candidates as ``inspect`` prints them (``lstm-cpu info FILE --all``)."""
    cands = list(cands)
    if not cands:
        return "no LSTM found"
    head = ("name", "kind", "input", "hidden", "layers", "dirs", "location")
    rows = [(c.name, c.kind, str(c.input_size), str(c.hidden_size), str(c.num_layers),
             str(c.num_directions), c.location) for c in cands]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head) - 1)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[-1]]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


__all__ = ["Candidate", "KINDS", "format_table"]
