"""Model-local functions: inlined (by onnx's own inliner) when one of them holds what a finder
looks for, after the expanded size has been counted and capped at :data:`MAX_INLINED_NODES`.

``torch.onnx.export(..., export_modules_as_functions=...)`` puts an ``nn.LSTM`` inside such a
function; a hostile file can nest calls so that the expansion is exponential in its size, or make
a function call itself: both are refused with :class:`FormatError` before anything is expanded.
"""

from __future__ import annotations

from typing import Callable, Dict

from lstm_cpu.errors import FormatError, UnsupportedModelError

from .onnx_graph import subgraphs

#: Inlining model-local functions may not grow the model beyond this many nodes (a hostile model
#: can nest calls so that the expansion is exponential in the file size).
MAX_INLINED_NODES = 1 << 20


def inline_local_functions(model, label, wanted: Callable[[object], bool]):
    """``model`` with its model-local functions inlined when one of them holds a node for which
    ``wanted(node)`` is true (torch's ``export_modules_as_functions`` puts nn.LSTM there), else
    None. onnx's own inliner does the work, after the expanded size has been counted and bounded."""
    funcs = {(f.domain, f.name): f for f in model.functions}
    if not funcs:
        return None
    memo: Dict[tuple, int] = {}

    def size(nodes, stack) -> int:
        """Nodes after inlining, counting subgraphs; raises on recursion or blow-up."""
        n = 0
        for node in nodes:
            key = (node.domain, node.op_type)
            if key in funcs:
                if key in stack:
                    raise FormatError(f"{label}: model-local function {key[1]!r} calls itself")
                if key not in memo:
                    memo[key] = size(funcs[key].node, stack | {key})
                n += memo[key]
            else:
                n += 1
                for _, sub in subgraphs(node):
                    n += size(sub.node, stack)
            if n > MAX_INLINED_NODES:
                raise FormatError(
                    f"{label}: inlining the model-local functions would create more than "
                    f"{MAX_INLINED_NODES} nodes")
        return n

    def holds_wanted(nodes) -> bool:
        return any(wanted(nd) or any(holds_wanted(sub.node) for _, sub in subgraphs(nd)) for nd in nodes)

    if not any(holds_wanted(f.node) for f in funcs.values()):
        return None
    size(model.graph.node, frozenset())
    try:
        from onnx import inliner
    except ImportError:
        raise UnsupportedModelError(
            f"{label}: the LSTM is inside a model-local function; inlining it needs onnx >= 1.15 "
            "(pip install -U onnx)") from None
    try:
        return inliner.inline_local_functions(model)
    except Exception as exc:  # the C++ inliner rejects malformed functions with various types
        raise FormatError(f"{label}: could not inline the model-local functions: {exc}") from None


__all__ = ["inline_local_functions", "MAX_INLINED_NODES"]
