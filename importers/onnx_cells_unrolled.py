"""Unrolled LSTMs: chains of decomposed cells -> one (bi)directional multi-layer LSTM.

A *chain* is a run of cells linked by their state (:func:`importers.onnx_cells._chains`). Here:

* :func:`_chain_weights` checks that every step of a chain shares the weights of step 1 exactly,
  and reads its initial state: a graph input the caller passes to ``run``, or a constant the
  exporter folded into step 0 (its bias difference gives ``h0``; ``c0`` is read);
* :func:`_assemble` orders chains into layers and directions: first-layer chains read steps of
  one sequence (their direction from the time indices of ``Gather`` / ``Slice`` / ``Split`` along
  axis 0), upper chains read the ``h`` of the chains below at matching times, forward first;
* :func:`_stack` builds one candidate per stack, verified by :func:`importers.onnx_cells_check.self_check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.candidates import Candidate
from lstm_cpu.errors import UnsupportedModelError
from lstm_cpu.spec import LayerParams

from .onnx_cells_check import self_check
from .onnx_cells_graph import GraphIndex, _const_value, attrs_of, known_zeros
from .onnx_found import Found

if TYPE_CHECKING:
    from .onnx_cells import _Cell


@dataclass(eq=False)
class _Chain:
    cells: List[_Cell]
    Wh: np.ndarray  # (4H, H)
    bias: np.ndarray  # (4H,)
    roles: List[List[str]]  # roles[r][k]: the tensor playing input role r at step k
    Wr: List[np.ndarray]  # (4H, K_r) per role
    h0: object = None  # None (zeros) | (H,) constant | str (a tensor the caller provides)
    c0: object = None
    direction: Optional[str] = None  # "fwd" | "bwd"
    layer: Optional[int] = None
    feeds: List[Tuple[int, bool]] = field(default_factory=list)  # per role: (chain idx, same order)

    @property
    def T(self) -> int:
        return len(self.cells)

    @property
    def H(self) -> int:
        return self.cells[0].H

    @property
    def name(self) -> str:
        return self.cells[0].name


def _same(a, b) -> bool:
    return a is b or (a.shape == b.shape and np.array_equal(a, b))  # interned: equal is usually identical


def _chain_weights(gi: GraphIndex, chain: List[_Cell], label: str) -> _Chain:
    ref, T, H = chain[1], len(chain), chain[0].H
    Wh, bias = ref.weights(chain[0].h_new), ref.bias()
    role_src = [s for s in ref.sources() if s != chain[0].h_new]
    Wr = [ref.weights(s) for s in role_src]
    roles = [[None] * T for _ in role_src]
    h0 = c0 = None
    for k, cell in enumerate(chain):
        where = f"{label}: step {k} (node {cell.name!r}) of the unrolled LSTM starting at {chain[0].name!r}"
        if cell.H != H:
            raise UnsupportedModelError(f"{where}: hidden size {cell.H}, step 0 has {H}")
        left = [s for s in cell.sources() if k == 0 or s != chain[k - 1].h_new]
        if k > 0 and not _same(cell.weights(chain[k - 1].h_new), Wh):
            raise UnsupportedModelError(f"{where}: its recurrent weights differ from step 1's")
        for r, W in enumerate(Wr):
            s = next((s for s in left if _same(cell.weights(s), W)), None)
            if s is None:
                raise UnsupportedModelError(
                    f"{where}: no input has the input weights of step 1 (the weights are not shared)")
            roles[r][k] = s
            left.remove(s)
        if k == 0:
            if len(left) == 1 and _same(cell.weights(left[0]), Wh):
                h0 = left[0]  # the initial h is an input the caller provides
            elif left:
                raise UnsupportedModelError(f"{where}: it reads {left} beyond its inputs and h")
            delta = cell.bias() - bias  # (4H,): a constant initial h folded into the bias
            if isinstance(h0, str) and np.any(delta):
                raise UnsupportedModelError(f"{where}: its bias differs from step 1's")
            if h0 is None and np.any(delta):
                sol, *_ = np.linalg.lstsq(Wh, delta, rcond=None)  # delta = Wh @ h0
                if not np.allclose(Wh @ sol, delta, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(delta).max())):
                    raise UnsupportedModelError(
                        f"{where}: its bias differs from step 1's by more than a constant initial h explains")
                h0 = sol
            cv = _const_value(gi, cell.c_old)
            if cv is None and known_zeros(gi, cell.c_old) is not None:
                c0 = None  # zeros shaped at run time, e.g. by the batch of x
            elif cv is None:
                c0 = cell.c_old
            else:
                cv = np.asarray(cv, np.float64)
                rows = cv.reshape(-1, cv.shape[-1]) if cv.ndim else cv.reshape(1, 1)
                if rows.shape[-1] not in (1, H) or not np.all(rows == rows[:1]):
                    raise UnsupportedModelError(
                        f"{where}: its constant initial cell state {cell.c_old!r} differs between "
                        "batch rows; the model has one initial state")
                c0 = np.broadcast_to(rows[0], (H,)).copy() if np.any(rows) else None
        else:
            if left:
                raise UnsupportedModelError(f"{where}: it reads {left} beyond its inputs and h")
            if not _same(cell.bias(), bias):
                raise UnsupportedModelError(f"{where}: its bias differs from step 1's")
    return _Chain(chain, Wh, bias, roles, Wr, h0, c0)


def _time_index(gi: GraphIndex, name: str) -> Optional[Tuple[str, int]]:
    """(sequence tensor, t) when ``name`` is step t of a sequence taken along axis 0."""
    for _ in range(8):
        p = gi.producers.get(name)
        if p is None:
            return None
        node, k = p
        op = node.op_type
        if op in ("Identity", "Squeeze", "Reshape", "Flatten", "Unsqueeze"):
            name = node.input[0]
            continue
        shape = gi.shapes.get(node.input[0]) if node.input else None
        T = shape[0] if shape else None
        if op == "Gather" and int(attrs_of(node).get("axis", 0)) == 0 and len(node.input) == 2:
            idx = _const_value(gi, node.input[1])
            if idx is None or idx.size != 1 or idx.dtype.kind not in "iu":
                return None
            t = int(idx.reshape(-1)[0])
            if t < 0 and T is None:
                return None
            return (node.input[0], t + T if t < 0 else t)
        if op == "Split" and int(attrs_of(node).get("axis", 0)) == 0 and T == len(node.output):
            return (node.input[0], k)
        if op == "Slice" and len(node.input) >= 4 and T is not None:
            s, e, ax = (_const_value(gi, node.input[j]) for j in (1, 2, 3))
            st = _const_value(gi, node.input[4]) if len(node.input) > 4 and node.input[4] else None
            if s is None or e is None or ax is None or s.size != 1 or ax.reshape(-1)[0] != 0 \
                    or (st is not None and int(st.reshape(-1)[0]) != 1):
                return None
            t = int(s.reshape(-1)[0])
            t = t + T if t < 0 else t
            if min(int(e.reshape(-1)[0]), T) - t != 1:
                return None
            return (node.input[0], t)
        return None
    return None


def _state_name(gi: GraphIndex, s) -> Optional[str]:
    """How a run-time initial state is read: ``"h0[1]"`` for row 1 of graph tensor h0, else the
    tensor's name; None for a constant (or zero) state."""
    if not isinstance(s, str):
        return None
    ti = _time_index(gi, s)  # the same Gather / Slice / Split along axis 0
    return f"{ti[0]}[{ti[1]}]" if ti is not None else s


def _assemble(gi: GraphIndex, chains: List[_Chain], label: str) -> List[Found]:
    """Group chains into (bi)directional stacks, one Found per stack."""
    h_pos = {}  # h_new tensor -> (chain idx, step)
    for ci, ch in enumerate(chains):
        for k, cell in enumerate(ch.cells):
            h_pos[cell.h_new] = (ci, k)
    # Roles fed by other chains, and the order relation of their steps.
    for ci, ch in enumerate(chains):
        where = f"{label}: unrolled LSTM starting at node {ch.name!r}"
        for r, srcs in enumerate(ch.roles):
            pos = [h_pos.get(s) for s in srcs]
            if all(p is None for p in pos):
                ch.feeds.append((-1, True))
                continue
            if any(p is None for p in pos) or len({p[0] for p in pos}) != 1:
                raise UnsupportedModelError(
                    f"{where}: its input {r} mixes outputs of another LSTM with other tensors")
            src = chains[pos[0][0]]
            ks = [p[1] for p in pos]
            if src.T != ch.T or ks not in (list(range(ch.T)), list(range(ch.T))[::-1]):
                raise UnsupportedModelError(
                    f"{where}: it consumes the outputs of {src.name!r} out of time order")
            ch.feeds.append((pos[0][0], ks == list(range(ch.T))))
    # Layer 0: chains reading external tensors only; their direction from the time indices.
    base_of = {}
    for ci, ch in enumerate(chains):
        if any(f[0] >= 0 for f in ch.feeds):
            continue
        where = f"{label}: unrolled LSTM starting at node {ch.name!r}"
        if len(ch.roles) != 1:
            raise UnsupportedModelError(f"{where}: its first layer reads {len(ch.roles)} input tensors per step; one is supported")
        ti = [_time_index(gi, s) for s in ch.roles[0]]
        ch.layer = 0
        if all(t is not None for t in ti) and len({t[0] for t in ti}) == 1:
            ts = [t[1] for t in ti]
            if ts == list(range(ch.T)):
                ch.direction = "fwd"
            elif ts == list(range(ch.T))[::-1] and ch.T > 1:
                ch.direction = "bwd"
            else:
                raise UnsupportedModelError(f"{where}: its steps read the sequence {ti[0][0]!r} at times {ts}")
            base_of[ci] = ti[0][0]
        else:
            ch.direction = "fwd"  # the step inputs in step order are the sequence
            base_of[ci] = None
    # Upper layers, in dependency order (bounded: each pass assigns at least one chain).
    pending = [ci for ci, ch in enumerate(chains) if ch.layer is None]
    while pending:
        progress = False
        for ci in list(pending):
            ch = chains[ci]
            srcs = [chains[f[0]] for f in ch.feeds]
            if any(s.layer is None for s in srcs):
                continue
            # time of step k of ch: each role's source step time must agree
            times = set()
            for (fi, same), s in zip(ch.feeds, srcs):
                times.add((s.direction == "fwd") == same)
            if len(times) != 1:
                raise UnsupportedModelError(
                    f"{label}: unrolled LSTM starting at node {ch.name!r} reads its inputs at different times")
            ch.direction = "fwd" if times.pop() else "bwd"
            ch.layer = 1 + max(s.layer for s in srcs)
            pending.remove(ci)
            progress = True
        if not progress:
            raise UnsupportedModelError(
                f"{label}: unrolled LSTM starting at node {chains[pending[0]].name!r} consumes "
                "outputs that form no layer order")
    # Stacks: connected components through feeds.
    parent = list(range(len(chains)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_layer = {}  # first-layer chains reading one sequence are the directions of one layer
    for ci, ch in enumerate(chains):
        for fi, _ in ch.feeds:
            if fi >= 0:
                parent[root(ci)] = root(fi)
        if ch.layer == 0:
            key = base_of[ci] if base_of[ci] is not None else frozenset(ch.roles[0])
            parent[root(ci)] = root(first_layer.setdefault(key, ci))
    comps: Dict[int, List[int]] = {}
    for ci in range(len(chains)):
        comps.setdefault(root(ci), []).append(ci)
    return [_stack(gi, [chains[i] for i in comp], chains, base_of, label) for comp in comps.values()]


def _stack(gi, members: List[_Chain], chains: List[_Chain], base_of, label) -> Found:
    first = min(members, key=lambda c: (c.layer, c.direction != "fwd"))
    where = f"{label}: unrolled LSTM starting at node {first.name!r}"
    L = 1 + max(c.layer for c in members)
    grid = [[c for c in members if c.layer == l] for l in range(L)]
    D = len(grid[0])
    if D == 2 and any(base_of.get(chains.index(c)) is None for c in grid[0]):
        # Without time indices (Gather / Slice / Split of one sequence) nothing says which of
        # two chains reading the same step tensors runs forward in time.
        raise UnsupportedModelError(
            f"{where}: cannot tell which of its two directions runs forward in time (the step "
            "inputs are not indexed slices of one sequence)")
    T, H = first.T, first.H
    for l, row in enumerate(grid):
        dirs = sorted(c.direction for c in row)
        if len(row) != D or dirs != sorted(c.direction for c in grid[0]) or dirs not in (["fwd"], ["bwd", "fwd"], ["bwd"]):
            raise UnsupportedModelError(
                f"{where}: layer {l} has directions {dirs}; expected the same one or two directions in every layer")
        row.sort(key=lambda c: c.direction != "fwd")
        for c in row:
            if c.T != T or c.H != H:
                raise UnsupportedModelError(f"{where}: its chains differ in length or hidden size")
            if l > 0:
                feeders = [chains[fi] for fi, _ in c.feeds]
                if sorted(map(id, feeders)) != sorted(map(id, grid[l - 1])) or len(feeders) != D:
                    raise UnsupportedModelError(
                        f"{where}: layer {l} does not read exactly the outputs of layer {l - 1}")
    reverse = D == 1 and first.direction == "bwd"
    layers = []
    for l, row in enumerate(grid):
        lrow = []
        for c in row:
            if l == 0:
                w_ih = c.Wr[0]
            else:  # roles ordered as the layer below: forward's h first, then backward's
                order = sorted(range(len(c.roles)), key=lambda r: chains[c.feeds[r][0]].direction != "fwd")
                w_ih = np.concatenate([c.Wr[r] for r in order], axis=1)
            lrow.append(LayerParams(w_ih=w_ih.astype(np.float32), w_hh=c.Wh.astype(np.float32),
                                    bias=c.bias.astype(np.float32)))
        layers.append(lrow)
    flat = [c for row in grid for c in row]
    fwd0 = grid[0][0]
    # Step inputs in time order (time t of the sequence): the forward chain's step t.
    x_seq = fwd0.roles[0] if fwd0.direction == "fwd" else fwd0.roles[0][::-1]
    x_groups = [[x_seq[t]] for t in range(T)]
    if D == 2:
        other = grid[0][1].roles[0][::-1]
        for t in range(T):
            if other[t] != x_seq[t]:
                x_groups[t].append(other[t])
    const_state, state_inputs = [], []
    for c in flat:
        h0 = c.h0 if not isinstance(c.h0, str) else None
        c0 = c.c0 if not isinstance(c.c0, str) else None
        const_state.append((h0, c0))
        state_inputs.append((c.h0 if isinstance(c.h0, str) else None, c.c0 if isinstance(c.c0, str) else None))
    steps = [[{"h_new": cell.h_new, "c_new": cell.c_new} for cell in c.cells] for c in flat]
    self_check(gi, label, first.name, layers, steps=steps, x_groups=x_groups,
               state_inputs=state_inputs, const_state=const_state, reverse=reverse,
               directions=[c.direction for c in flat])
    initial_state = None
    if any(h is not None or cc is not None for h, cc in const_state):
        h0 = np.zeros((L * D, H))
        c0 = np.zeros((L * D, H))
        for j, (h, cc) in enumerate(const_state):
            if h is not None:
                h0[j] = h
            if cc is not None:
                c0[j] = cc
        initial_state = (h0, c0)
    base = base_of.get(chains.index(fwd0))
    top = grid[-1]
    outputs = {"h_per_step": [[cell.h_new for cell in (c.cells if c.direction == "fwd" else c.cells[::-1])]
                              for c in top],
               "final_h": [c.cells[-1].h_new for c in flat], "final_c": [c.cells[-1].c_new for c in flat]}
    inputs = {"X": base if base is not None else list(x_seq),
              "initial_h": [_state_name(gi, c.h0) for c in flat],
              "initial_c": [_state_name(gi, c.c0) for c in flat]}
    x_desc = (f"X {base!r} along axis 0" if base is not None
              else f"X = the step tensors {x_seq[0]!r} .. {x_seq[-1]!r}")
    loc = (f"main: {T} steps, {x_desc}; {L} layer(s) x {D} direction(s)"
           + (" (reverse)" if reverse else "") + f"; final h {outputs['final_h'][-1]!r}, "
           f"final c {outputs['final_c'][-1]!r}")
    source = {"format": "onnx", "kind": "unrolled", "graph": "main", "steps": T,
              "nodes": [cell.name for c in flat for cell in c.cells], "inputs": inputs, "outputs": outputs}
    I = layers[0][0].input_size
    cand = Candidate(first.name, "unrolled", I, H, L, D, loc)

    def build(layers=layers, initial_state=initial_state, source=source, reverse=reverse):
        out = [[LayerParams(p.w_ih.copy(), p.w_hh.copy(), p.bias.copy()) for p in row] for row in layers]
        init = None if initial_state is None else (initial_state[0].copy(), initial_state[1].copy())
        return out, dict(clip=None, input_forget=False, initial_state=init, reverse=reverse,
                         source=dict(source))

    aliases = tuple(dict.fromkeys(cell.name for c in flat for cell in c.cells if cell.name != first.name))
    return Found(cand, build, aliases)  # node= may name any cell of the stack


__all__ = ["_chain_weights", "_assemble"]
