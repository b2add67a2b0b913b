"""An lstm-cpu model -> an ONNX graph of chained ``LSTM`` nodes with the same weights.

For benchmark peers (onnxruntime, OpenVINO): they must run exactly the weights lstm-cpu runs. The
graph is the one ``torch.onnx.export`` writes for an ``nn.LSTM`` stack, so every runtime's LSTM
fusion applies::

    inputs   X            (T, N, I)      time-major, float32
             initial_h_l  (D, N, H)      per layer l: fed by the caller; a model with an initial
             initial_c_l  (D, N, H)      state also stores it as the inputs' default (an
                                         initializer of the same name, batch 1)
    nodes    LSTM_l       W (D, 4H, in), R (D, 4H, H), B (D, 8H), P (D, 3H) as initializers,
                          gate blocks in ONNX order i, o, f, c (peepholes i, o, f)
             between layers: Squeeze(axis 1) for D = 1, Transpose(0, 2, 1, 3) + Reshape(0, 0, -1) for D = 2
             an optional head: MatMul + Add on the last layer's output
    outputs  Y            (T, N, D*H)    or (T, N, O) with a head: what ``model.run`` returns as y
             Y_h_l, Y_c_l (D, N, H)      per layer l

The inverse of :mod:`lstm_cpu.importers.onnx_lstm`: ``load_onnx(to_onnx(m))`` gives ``m`` back,
including ``clip``, ``input_forget`` (``f = 1 - i``, as onnxruntime computes it and lstm-cpu's spec
says), peepholes, activations, a one-direction ``reverse`` model (``direction="reverse"``), the
model's initial state and a linear head. A projection (PyTorch ``proj_size``) has no ONNX LSTM
equivalent and is refused with :class:`UnsupportedModelError`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lstm_cpu.errors import InputError, InputTypeError, UnsupportedModelError
from lstm_cpu.spec import ACTIVATIONS, LayerParams, as_activations, gate_permutation

#: Default opset: LSTM-14 (layout attribute) and every runtime of 2023+ reads it.
DEFAULT_OPSET = 17


def io_names(num_layers: int) -> dict:
    """The names of the graph's data and state tensors, for callers that feed it (the benchmark):
    ``{"x": "X", "y": "Y", "initial_h": [per layer], "initial_c": [...], "y_h": [...], "y_c": [...]}``.
    The graph's inputs are ``x`` then ``initial_h[l], initial_c[l]`` per layer; its outputs ``y``
    then ``y_h[l], y_c[l]`` per layer."""
    layers = range(int(num_layers))
    return {"x": "X", "y": "Y",
            "initial_h": [f"initial_h_{l}" for l in layers], "initial_c": [f"initial_c_{l}" for l in layers],
            "y_h": [f"Y_h_{l}" for l in layers], "y_c": [f"Y_c_{l}" for l in layers]}


def _to_onnx_gates(a: np.ndarray) -> np.ndarray:
    """Canonical gate blocks (i, f, g, o) -> ONNX (i, o, f, c) along axis 0: the inverse of
    ``spec.reorder_gates(a, "iofc")``."""
    perm = gate_permutation("iofc")  # canonical_block[k] = onnx_block[perm[k]]
    blocks = np.split(np.asarray(a), 4, axis=0)
    onnx_blocks = [None] * 4
    for k, src in enumerate(perm):
        onnx_blocks[src] = blocks[k]
    return np.concatenate(onnx_blocks, axis=0)


def _peephole_to_onnx(p: np.ndarray) -> np.ndarray:
    """Canonical peepholes (i, f, o) -> ONNX (i, o, f)."""
    pi, pf, po = np.split(np.asarray(p), 3)
    return np.concatenate([pi, po, pf])


def _activation_attrs(rows):
    """Per-direction (f, g, h) -> (names, alphas, betas) in onnxruntime's consumption order."""
    names, alphas, betas = [], [], []
    for acts in rows:
        for a in as_activations(acts):
            names.append(a.name)
            n = ACTIVATIONS[a.name][3]  # how many of (alpha, beta) it takes: the same set as onnxruntime's
            if n >= 1:
                alphas.append(float(a.alpha))
            if n >= 2:
                betas.append(float(a.beta))
    return names, alphas, betas


def to_onnx(model_or_layers, *, clip: Optional[float] = None, input_forget: bool = False, head=None,
            initial_state=None, reverse: bool = False, state_defaults: bool = True,
            opset: int = DEFAULT_OPSET):
    """An :class:`~lstm_cpu.model.LSTMModel` (or ``layers[l][d]`` of LayerParams) -> ``onnx.ModelProto``.

    For a model, ``clip``, ``input_forget``, ``head``, ``initial_state`` ((h0 (L*D, H), c0
    (L*D, H))) and ``reverse`` come from it; for a bare ``layers`` list, pass them. Projections
    (``w_hr``) have no ONNX LSTM equivalent: UnsupportedModelError.

    ``state_defaults=False`` leaves the initial state out of the file (the caller feeds it, as
    the benchmark peers do every step: some runtimes, OpenVINO among them, turn an input that has
    an initializer into a constant); such a file no longer round-trips the initial state.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if hasattr(model_or_layers, "layer_params"):
        m = model_or_layers
        layers = m.layer_params()
        clip, input_forget, head = m.clip, m.input_forget, m.head
        initial_state, reverse = m.initial_state, m.reverse
    elif isinstance(model_or_layers, (list, tuple)):
        layers = [list(row) for row in model_or_layers]
    else:
        raise InputTypeError(
            f"to_onnx expects an LSTMModel or a list of per-layer lists of LayerParams, "
            f"got {type(model_or_layers).__name__}")
    if not layers or not all(row and len(row) in (1, 2) for row in layers):
        raise InputError("layers must be a non-empty list of per-layer lists of 1 or 2 LayerParams")
    if not all(isinstance(p, LayerParams) for row in layers for p in row):
        raise InputTypeError("every entry of layers must be an lstm_cpu.spec.LayerParams")
    if any(p.w_hr is not None for row in layers for p in row):
        raise UnsupportedModelError(
            "the model has a projection (w_hr, PyTorch proj_size); the ONNX LSTM operator has none, "
            "so it cannot be exported")
    D = len(layers[0])
    if reverse and D != 1:
        raise InputError("reverse=True is for one-direction models; a bidirectional model "
                         "already has a backward direction")
    H = layers[0][0].hidden_size
    I = layers[0][0].input_size
    peep = any(p.peephole is not None for row in layers for p in row)

    io = io_names(len(layers))
    nodes, inits, g_inputs, g_outputs = [], [], [], []
    g_inputs.append(helper.make_tensor_value_info(io["x"], TensorProto.FLOAT, ["T", "N", I]))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "squeeze_axes"))
    inits.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat_shape"))
    x = io["x"]
    for l, row in enumerate(layers):
        if len(row) != D or any(p.hidden_size != H for p in row):
            raise InputError(f"layer {l}: every layer needs {D} direction(s) of hidden size {H}")
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        W = np.stack([_to_onnx_gates(f32(p.w_ih)) for p in row])  # (D, 4H, in)
        R = np.stack([_to_onnx_gates(f32(p.w_hh)) for p in row])  # (D, 4H, H)
        # Folded bias goes into Wb; Rb is zero: (D, 8H).
        B = np.stack([np.concatenate([_to_onnx_gates(f32(p.bias)) if p.bias is not None
                                      else np.zeros(4 * H, np.float32), np.zeros(4 * H, np.float32)])
                      for p in row])
        names = [f"W_{l}", f"R_{l}", f"B_{l}"]
        inits += [numpy_helper.from_array(W, names[0]), numpy_helper.from_array(R, names[1]),
                  numpy_helper.from_array(B, names[2])]
        h0, c0 = io["initial_h"][l], io["initial_c"][l]
        for s in (h0, c0):
            g_inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, [D, "N", H]))
        if initial_state is not None and state_defaults:  # the inputs' defaults (an initializer
            # of the same name, which the ONNX spec lets a caller override)
            for s, a in zip((h0, c0), initial_state):
                a = np.asarray(a, np.float32)[l * D:(l + 1) * D, None, :]  # (D, 1, H)
                inits.append(numpy_helper.from_array(np.ascontiguousarray(a), s))
        ins = [x] + names + ["", h0, c0]
        if peep:
            P = np.stack([_peephole_to_onnx(f32(p.peephole)) if p.peephole is not None
                          else np.zeros(3 * H, np.float32) for p in row])  # (D, 3H)
            inits.append(numpy_helper.from_array(P, f"P_{l}"))
            ins.append(f"P_{l}")
        attrs = {"hidden_size": H,
                 "direction": "bidirectional" if D == 2 else ("reverse" if reverse else "forward")}
        acts = [p.activations for p in row]
        if any(tuple(a.name for a in as_activations(x_)) != ("Sigmoid", "Tanh", "Tanh") for x_ in acts):
            n_, a_, b_ = _activation_attrs(acts)
            attrs["activations"] = n_
            if a_:
                attrs["activation_alpha"] = a_
            if b_:
                attrs["activation_beta"] = b_
        if clip:
            attrs["clip"] = float(clip)
        if input_forget:
            attrs["input_forget"] = 1
        y = f"Y_{l}"
        nodes.append(helper.make_node("LSTM", ins, [y, io["y_h"][l], io["y_c"][l]], name=f"LSTM_{l}", **attrs))
        # (T, D, N, H) -> (T, N, D*H): the next layer's X and the model's y
        if D == 1:
            nodes.append(helper.make_node("Squeeze", [y, "squeeze_axes"], [f"Yf_{l}"], name=f"Squeeze_{l}"))
        else:
            nodes.append(helper.make_node("Transpose", [y], [f"Yt_{l}"], perm=[0, 2, 1, 3], name=f"Transpose_{l}"))
            nodes.append(helper.make_node("Reshape", [f"Yt_{l}", "flat_shape"], [f"Yf_{l}"], name=f"Reshape_{l}"))
        x = f"Yf_{l}"
        for s in (io["y_h"][l], io["y_c"][l]):
            g_outputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, [D, "N", H]))
    out_size = D * H
    if head is not None:
        hw, hb = head
        hw = np.asarray(hw, np.float32)  # (O, D*H)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(hw.T), "head_weight_t"))  # (D*H, O)
        nodes.append(helper.make_node("MatMul", [x, "head_weight_t"], ["head_mm"], name="Head_MatMul"))
        x = "head_mm"
        if hb is not None:
            inits.append(numpy_helper.from_array(np.asarray(hb, np.float32), "head_bias"))
            nodes.append(helper.make_node("Add", [x, "head_bias"], ["head_out"], name="Head_Add"))
            x = "head_out"
        out_size = hw.shape[0]
    nodes.append(helper.make_node("Identity", [x], [io["y"]], name="Output"))
    g_outputs.insert(0, helper.make_tensor_value_info(io["y"], TensorProto.FLOAT, ["T", "N", out_size]))
    graph = helper.make_graph(nodes, "lstm_cpu_export", g_inputs, g_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", int(opset))],
                              producer_name="lstm-cpu")
    model.ir_version = 8 if opset <= 18 else 10
    onnx.checker.check_model(model)
    return model


__all__ = ["to_onnx", "io_names", "DEFAULT_OPSET"]
