"""The finder for ONNX ``LSTM`` operators: every node or chain of nodes is one candidate.

``find_operators(model, folder, label)`` walks the main graph and every subgraph (``If`` branches
nested at any depth, ``Loop``/``Scan`` bodies: each node there is its own candidate, reading the
enclosing graphs' constants), links the stacks ``torch.onnx.export`` writes into chains
(:mod:`.onnx_chains`), and returns one :class:`.onnx_found.Found` per chain; chains with identical
weights and attributes (the same LSTM in two branches) are reported once, the other's node names
as aliases. Its name is the
chain's first node; every other node of the chain is an alias, so ``node=`` may name any of them
and always gets the whole chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from functools import partial
from typing import List

import numpy as np

from lstm_cpu.candidates import Candidate

from .onnx_chains import check_chain, check_constant_lengths, find_chains, stacked_state, trailing_head
from .onnx_fold import Folder
from .onnx_found import Found
from .onnx_graph import all_graphs, default_opset
from .onnx_lstm_op import NodeInfo, is_batch_first_transpose
from .onnx_tensors import graph_input_behind


def find_operators(model, folder, label) -> List[Found]:
    opset = default_opset(model, label)
    found = []
    by_weights = {}  # digest of a chain's weights and attributes -> its index in found
    for chain in find_chains(model, all_graphs(model), opset, folder, label):
        first, last = chain[0], chain[-1]
        names = tuple(n for i in chain for n in (i.name, i.node.name) if n)
        digest = _digest(chain)
        k = by_weights.get(digest)
        if k is not None:  # e.g. the same LSTM in both branches of an If: one candidate
            f = found[k]
            cand = replace(f.candidate, location=f"{f.candidate.location}; also at {first.graph.path}: "
                                                 f"LSTM {first.name!r} (same weights)")
            found[k] = Found(cand, f.build, f.aliases + names)
            continue
        by_weights[digest] = len(found)
        y = last.node.output[0] if last.node.output else "?"
        cand = Candidate(
            name=first.name, kind="operator", input_size=first.I, hidden_size=first.H,
            num_layers=len(chain), num_directions=first.D,
            location=(f"{first.graph.path}: LSTM {' -> '.join(repr(i.name) for i in chain)}, "
                      f"{first.direction}; reads {first.inputs['X']!r}, writes {y!r}"))
        aliases = tuple(n for n in names if n != first.name)
        found.append(Found(cand, partial(_params, model, chain, opset, label, folder), aliases))
    return found


def _digest(chain: List[NodeInfo]) -> bytes:
    """What makes two chains the same model: sizes, attributes, weights and constant states."""
    h = hashlib.sha256()
    for info in chain:
        h.update(repr((info.H, info.I, info.D, info.direction, info.layout, info.clip, info.input_forget,
                       info.inputs["sequence_lens"], [p.activations for p in info.params])).encode())
        arrays = [a for p in info.params for a in (p.w_ih, p.w_hh, p.bias, p.peephole)] + [info.h0, info.c0]
        for a in arrays:
            h.update(b"none" if a is None else repr(np.shape(a)).encode() + np.ascontiguousarray(a).tobytes())
    return h.digest()


def _params(model, chain: List[NodeInfo], opset: int, label, folder):
    """One chain -> (layers, options): checked as a uniform stack, initial states gathered, and a
    linear layer that ends the graph right after the chain taken as the model's head."""
    check_chain(chain, label)
    const_T = check_constant_lengths(model, chain, label)
    first = chain[0]
    layers = [info.params for info in chain]
    L, D, H = len(chain), first.D, first.H
    initial_state = stacked_state(chain, D, H)
    head = trailing_head(chain[-1], opset, Folder.of(model, folder), label)
    x_name = first.inputs["X"]
    source = {
        "format": "onnx",
        "path": None,  # the entry point fills in the file and whether functions were inlined
        "nodes": [i.name for i in chain],
        "graph": first.graph.path,
        "opset": opset,
        "lstm_version": first.version,
        "layout": first.layout,
        "inlined_functions": False,
        "inputs": {
            "X": x_name,
            "X_graph_input": graph_input_behind(first.graph, x_name),
            "batch_first": first.layout == 1 or is_batch_first_transpose(first.graph, x_name),
            "sequence_lens": (first.inputs["sequence_lens"] if const_T is None
                              else f"constant {const_T} = T for every sequence (a no-op)"),
            "initial_h": [i.inputs["initial_h"] for i in chain],
            "initial_c": [i.inputs["initial_c"] for i in chain],
        },
        "head": None if head is None else {"output": head[2], "size": int(head[0].shape[0])},
    }
    options = {
        "clip": first.clip,
        "input_forget": first.input_forget,
        "initial_state": initial_state,
        "reverse": first.direction == "reverse",
        "head": None if head is None else head[:2],
        "source": source,
    }
    return layers, options


__all__ = ["find_operators"]
