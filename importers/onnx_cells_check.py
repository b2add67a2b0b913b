"""The recovery self-check: a recovered LSTM must reproduce the subgraph it was read from.

The matched subgraph (every node between the step inputs / states and the cells' ``h`` and ``c``
outputs) is extracted into a small model, evaluated with onnxruntime (onnx's
``ReferenceEvaluator`` when onnxruntime is missing or cannot run it) on random inputs and
states, and every step of every layer and direction is compared with a float64 step of the
*recovered* weights taken from the graph's own previous state and inputs. A mismatch raises :class:`UnsupportedModelError` naming the node, the
tensor and the size of the difference: a model that cannot be proven equivalent is never
returned.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from lstm_cpu.errors import FormatError, UnsupportedModelError

#: max |graph - recovered| <= TOL * max(1, max |recovered|) for every step, per element type of
#: the graph's tensors (a wrong gate or weight shows up as an error of order 1e-2 to 1).
_TOL = {1: 1e-4, 11: 1e-9, 10: 3e-2, 16: 3e-2}  # FLOAT, DOUBLE, FLOAT16, BFLOAT16
_NP = {1: np.float32, 11: np.float64, 10: np.float16}
#: The check feeds the graph's own static batch size; a larger one is refused.
MAX_CHECK_BATCH = 4096


def _sigmoid(v):
    return 0.5 * np.tanh(0.5 * v) + 0.5


def _cell(p, x, h, c):
    """One float64 step of ``p = (w_ih (4H, I), w_hh (4H, H), bias (4H,))`` float64, gates i, f,
    g, o (canonical). x (N, I), h, c (N, H)."""
    w_ih, w_hh, b = p
    H = len(b) // 4
    a = x @ w_ih.T + h @ w_hh.T + b  # (N, 4H)
    i, f, g, o = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H]), np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
    c = f * c + i * g
    return o * np.tanh(c), c


def _subgraph(gi, label, name, inputs: Sequence[str], outputs: Sequence[str]):
    """A ModelProto computing ``outputs`` from ``inputs`` with the graph's own nodes."""
    from onnx import TensorProto, helper, numpy_helper

    from .onnx_cells_graph import _const_value, known_zeros

    given, need, inits, stack, seen, zeros = set(inputs), {}, {}, list(outputs), set(), {}
    while stack:
        t = stack.pop()
        if not t or t in seen or t in given:
            continue
        seen.add(t)
        # Constants enter as initializers (folded values for computed ones), so no constant
        # subgraph (Shape of a declared shape, a malformed node) reaches the runtime.
        tp = gi.init.get(t)
        if tp is not None and tp.data_location != TensorProto.EXTERNAL:
            inits[t] = tp
            continue
        z = known_zeros(gi, t)
        if z is not None:  # zeros shaped at run time: fed as zeros of the check's batch
            zeros[t] = z
            continue
        cv = _const_value(gi, t)
        if cv is not None:
            dt = _NP.get(gi.elem.get(t, 1))  # the graph's element type (float16 stays float16)
            inits[t] = numpy_helper.from_array(np.asarray(cv, dt) if dt and cv.dtype.kind == "f" else cv, t)
            continue
        if tp is not None:
            raise FormatError(f"{label}: initializer {t!r} is unreadable")
        if t not in gi.producers:
            if t in gi.inputs:
                raise UnsupportedModelError(
                    f"{label}: LSTM at node {name!r}: its outputs also depend on graph input {t!r}, "
                    "beyond its inputs and states")
            raise FormatError(f"{label}: tensor {t!r} is used but never defined")
        node, _ = gi.producers[t]
        if id(node) not in need:
            need[id(node)] = node
            stack.extend(node.input)
    nodes = sorted(need.values(), key=lambda n: gi.order[id(n)])
    vi = lambda n: helper.make_tensor_value_info(n, gi.elem.get(n, TensorProto.FLOAT), None)  # noqa: E731
    inputs = list(inputs) + list(zeros)
    graph = helper.make_graph(nodes, "lstm_cell_check", [vi(n) for n in inputs], [vi(n) for n in outputs],
                              initializer=list(inits.values()))
    m = helper.make_model(graph, opset_imports=list(gi.model.opset_import))
    m.ir_version = gi.model.ir_version or m.ir_version
    m.functions.extend(gi.model.functions)
    return m, zeros


def _evaluate(m, feeds, outputs):
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(list(outputs), feeds)
    except Exception:  # not installed, or it cannot run this graph: onnx's own evaluator
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(m).run(list(outputs), feeds)


def self_check(gi, label, name, layers, *, steps, x_groups, state_inputs, const_state,
               reverse=False, directions: Optional[List[str]] = None, seed: int = 0):
    """Raise UnsupportedModelError unless the graph computes the LSTM ``layers``.

    layers[l][d]: recovered LayerParams. steps[j][k]: {"h_new", "c_new"} tensors of chain
    j = l*D + d at its step k. x_groups[t]: the tensors that carry the input at time t.
    state_inputs[j] / const_state[j]: (h0, c0) of chain j as tensor names, or constants (H,)
    (None: zeros). directions[j]: "fwd" or "bwd" (reverse: the one direction runs backwards).
    """
    L, D = len(layers), len(layers[0])
    T, H = len(x_groups), layers[0][0].hidden_size
    I = layers[0][0].input_size
    directions = directions or ["bwd" if reverse else "fwd"] * (L * D)
    rng = np.random.default_rng(seed)
    x0 = x_groups[0][0]
    shape = gi.shapes.get(x0) or (None, I)
    N = 1 if len(shape) == 1 else (shape[0] or 2)  # the graph's batch if static
    if N > MAX_CHECK_BATCH:
        raise UnsupportedModelError(
            f"{label}: LSTM at node {name!r}: its input {x0!r} has a static batch of {N}; the "
            f"recovery check runs at most {MAX_CHECK_BATCH}")

    def feed(name_, arr):  # arr (N, K) float64 -> the declared shape and element type
        s = gi.static_shape(name_)
        if s is not None and int(np.prod(s)) == arr.size:
            a = arr.reshape(s)
        else:
            s = gi.shapes.get(name_)
            a = arr[0] if s is not None and len(s) == 1 else arr
        return np.ascontiguousarray(a, _NP.get(gi.elem.get(name_, 1), np.float32))

    feeds = {}  # graph tensor -> array; the reference reads back the rounded values fed
    for group in x_groups:
        x = rng.standard_normal((N, I))
        for n_ in group:
            feeds[n_] = feed(n_, x)
    X = [feeds[g[0]].astype(np.float64).reshape(N, I) for g in x_groups]  # T x (N, I)
    init = []  # per chain [h0 (N, H), c0 (N, H)]
    for names, consts in zip(state_inputs, const_state):
        hc = []
        for nm, cv in zip(names, consts):
            if nm is not None:
                feeds[nm] = feed(nm, rng.standard_normal((N, H)))
                v = feeds[nm].astype(np.float64).reshape(N, H)
            else:
                v = np.zeros((N, H)) if cv is None else np.broadcast_to(np.asarray(cv, np.float64), (N, H))
            hc.append(v)
        init.append(hc)
    outputs = list(dict.fromkeys(st[q] for chain in steps for st in chain for q in ("h_new", "c_new")))
    m, zeros = _subgraph(gi, label, name, list(feeds), outputs)
    for t, (rank, k) in zeros.items():  # (rank, last dim): zeros with the check's batch
        feeds[t] = np.zeros((N, k) if rank == 2 else (k,), _NP.get(gi.elem.get(t, 1), np.float32))
    try:
        values = _evaluate(m, feeds, outputs)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{label}: LSTM at node {name!r}: the matched subgraph could not be evaluated for the "
            f"recovery check: {type(exc).__name__}: {exc}") from None
    got = {}  # tensor -> (N, H) float64, as the graph computed it
    for out, v in zip(outputs, values):
        if np.size(v) != N * H:
            raise UnsupportedModelError(
                f"{label}: LSTM at node {name!r}: {out!r} has {np.size(v)} values, the recovered "
                f"LSTM {N * H}")
        got[out] = np.asarray(v, np.float64).reshape(N, H)
    # Every step against one float64 step of the recovered weights, from the state and inputs the
    # graph itself produced before it: local errors do not compound, so a chaotic (large-weight)
    # LSTM is checked as tightly as a tame one, over any number of steps.
    w64 = [[tuple(np.asarray(v, np.float64) for v in (p.w_ih, p.w_hh, p.bias)) for p in row] for row in layers]
    at = lambda j, t: steps[j][T - 1 - t if directions[j] == "bwd" else t]  # noqa: E731
    for l in range(L):
        for d in range(D):
            j = l * D + d
            for k in range(T):
                t = T - 1 - k if directions[j] == "bwd" else k
                x = X[t] if l == 0 else np.concatenate(
                    [got[at((l - 1) * D + e, t)["h_new"]] for e in range(D)], axis=1)
                h, c = init[j] if k == 0 else (got[steps[j][k - 1]["h_new"]], got[steps[j][k - 1]["c_new"]])
                want = dict(zip(("h_new", "c_new"), _cell(w64[l][d], x, h, c)))
                for q in ("h_new", "c_new"):
                    out = steps[j][k][q]
                    tol = _TOL.get(gi.elem.get(out, 1), 1e-4)
                    bound = tol * max(1.0, float(np.abs(want[q]).max()))
                    err = float(np.max(np.abs(got[out] - want[q])))
                    if not err <= bound:  # NaN fails too
                        raise UnsupportedModelError(
                            f"{label}: LSTM at node {name!r}: the recovered LSTM does not reproduce "
                            f"the graph: {out!r} (layer {l}, direction {d}, step {k}) differs by up "
                            f"to {err:.3g} (allowed {bound:.3g}) on random inputs and states")

__all__ = ["self_check"]
