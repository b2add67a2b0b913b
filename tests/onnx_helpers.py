"""Builders of small ONNX LSTM graphs and oracles shared by the ONNX tests.

Everything here generates models in memory (no network, no files unless a test writes one).
Shapes follow the ONNX LSTM operator: ``W (D, 4H, I)``, ``R (D, 4H, H)``, ``B (D, 8H)``,
``P (D, 3H)``, gate blocks in ONNX order (i, o, f, c), peepholes (i, o, f).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from lstm_cpu.spec import Activation, LayerParams, reorder_gates

try:  # run from the repo root (python -m pytest) or with tests/ on sys.path
    from tests import naive
except ImportError:  # pragma: no cover
    import naive

FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------------------------------------
# Random ONNX-layout weights
# ---------------------------------------------------------------------------------------------
def onnx_weights(rng, I, H, D=1, bias=True, peephole=False, scale=0.5):
    """Random float32 ONNX LSTM weights: dict with W (D,4H,I), R (D,4H,H), B (D,8H)|None, P (D,3H)|None."""
    f = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    return {
        "W": f(D, 4 * H, I),
        "R": f(D, 4 * H, H),
        "B": f(D, 8 * H) if bias else None,
        "P": f(D, 3 * H) if peephole else None,
    }


def oracle_params(W, R, B=None, P=None, acts=None):
    """Canonical LayerParams per direction, written independently of the importer (test oracle).

    acts: per direction a tuple of 3 spec.Activation, or None for the defaults.
    """
    D, H4, _ = W.shape
    H = H4 // 4
    out = []
    for d in range(D):
        bias = None if B is None else reorder_gates(B[d, : 4 * H] + B[d, 4 * H :], "iofc")
        pe = None
        if P is not None:
            pi, po, pf = np.split(P[d], 3)  # ONNX peephole order i, o, f
            pe = np.concatenate([pi, pf, po])
        kw = {} if acts is None else {"activations": acts[d]}
        out.append(
            LayerParams(
                w_ih=reorder_gates(W[d], "iofc"),
                w_hh=reorder_gates(R[d], "iofc"),
                bias=bias,
                peephole=pe,
                **kw,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Graph builders
# ---------------------------------------------------------------------------------------------
def _tensor(name, arr, dtype=None):
    arr = np.asarray(arr)
    if dtype is not None:
        arr = arr.astype(dtype)
    return numpy_helper.from_array(arr, name)


def lstm_model(
    W,
    R,
    B=None,
    P=None,
    *,
    direction="forward",
    hidden_size="auto",
    opset=14,
    layout=None,
    activations=None,
    activation_alpha=None,
    activation_beta=None,
    clip=None,
    input_forget=None,
    initial_h=None,
    initial_c=None,
    sequence_lens=False,
    weights_as="initializer",
    weight_dtype=np.float32,
    x_dtype=FLOAT,
    node_name="lstm",
    ir_version=None,
    extra_attrs=None,
):
    """One ONNX LSTM node as a model.

    initial_h / initial_c: None (absent), "input" (graph input) or an array (a constant).
    weights_as: "initializer" | "constant" (Constant nodes) | "identity" (Constant -> Identity)
                | "input" (W, R, B, P are graph inputs: runtime weights).
    hidden_size: "auto" (from R), None (attribute absent) or an int (written verbatim).
    Graph inputs: X (T, B, I) or (B, T, I) with layout=1, then initial_h, initial_c, sequence_lens.
    """
    D, H4, I = W.shape
    H = H4 // 4
    nodes, inits, inputs = [], [], []
    xshape = ["T", "N", I] if not layout else ["N", "T", I]
    inputs.append(helper.make_tensor_value_info("X", x_dtype, xshape))

    def add_const(name, arr):
        t = _tensor(name, arr, weight_dtype)
        if weights_as == "initializer":
            inits.append(t)
            return name
        if weights_as == "input":
            inputs.append(helper.make_tensor_value_info(name, t.data_type, list(arr.shape)))
            return name
        if weights_as == "constant":
            nodes.append(helper.make_node("Constant", [], [name], value=t, name=f"const_{name}"))
            return name
        if weights_as == "identity":
            src = name + "_src"
            t.name = src
            nodes.append(helper.make_node("Constant", [], [src], value=t, name=f"const_{name}"))
            nodes.append(helper.make_node("Identity", [src], [name], name=f"id_{name}"))
            return name
        raise ValueError(weights_as)

    ins = ["X", add_const("W", W), add_const("R", R)]
    ins.append(add_const("B", B) if B is not None else "")
    if sequence_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["N"]))
        ins.append("sequence_lens")
    else:
        ins.append("")
    sshape = [D, "N", H] if not layout else ["N", D, H]
    for nm, v in (("initial_h", initial_h), ("initial_c", initial_c)):
        if v is None:
            ins.append("")
        elif isinstance(v, str) and v == "input":
            inputs.append(helper.make_tensor_value_info(nm, x_dtype, sshape))
            ins.append(nm)
        else:
            inits.append(_tensor(nm, v, np.float32))
            ins.append(nm)
    ins.append(add_const("P", P) if P is not None else "")
    while ins and ins[-1] == "":
        ins.pop()

    attrs = {"direction": direction}
    if hidden_size == "auto":
        attrs["hidden_size"] = H
    elif hidden_size is not None:
        attrs["hidden_size"] = hidden_size
    for k, v in (
        ("layout", layout),
        ("activations", activations),
        ("activation_alpha", activation_alpha),
        ("activation_beta", activation_beta),
        ("clip", clip),
        ("input_forget", input_forget),
    ):
        if v is not None:
            attrs[k] = v
    attrs.update(extra_attrs or {})
    nodes.append(helper.make_node("LSTM", ins, ["Y", "Y_h", "Y_c"], name=node_name, **attrs))
    yshape = ["T", D, "N", H] if not layout else ["N", "T", D, H]
    outputs = [
        helper.make_tensor_value_info("Y", x_dtype, yshape),
        helper.make_tensor_value_info("Y_h", x_dtype, sshape),
        helper.make_tensor_value_info("Y_c", x_dtype, sshape),
    ]
    graph = helper.make_graph(nodes, "lstm_graph", inputs, outputs, initializer=inits)
    kw = {"ir_version": ir_version} if ir_version else {}
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kw)
    if ir_version is None:
        m.ir_version = min(m.ir_version, 8) if opset < 21 else 10
    return m


def if_model(W, R, B=None, *, opset=14):
    """An LSTM inside the then-branch of an If node, weights as Constant nodes in the branch.

    Graph inputs: X (T, N, I), cond (bool scalar). Output: Y (T, 1, N, H) from whichever branch ran
    (the else branch returns zeros of the same shape through an LSTM-free path).
    """
    D, H4, I = W.shape
    H = H4 // 4
    bnodes = [
        helper.make_node("Constant", [], ["W"], value=_tensor("W", W)),
        helper.make_node("Constant", [], ["R"], value=_tensor("R", R)),
    ]
    ins = ["X", "W", "R"]
    if B is not None:
        bnodes.append(helper.make_node("Constant", [], ["B"], value=_tensor("B", B)))
        ins.append("B")
    bnodes.append(helper.make_node("LSTM", ins, ["Yb"], name="lstm_in_if", hidden_size=H))
    yinfo = helper.make_tensor_value_info("Yb", FLOAT, None)
    then_g = helper.make_graph(bnodes, "then", [], [yinfo])
    zinfo = helper.make_tensor_value_info("Z", FLOAT, None)
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["X", "zero"], ["Z0"]), helper.make_node("Unsqueeze", ["Z0", "ax"], ["Z1"]),
         helper.make_node("Slice", ["Z1", "s0", "s1", "s2"], ["Z"])],
        "else", [], [zinfo],
        initializer=[
            _tensor("zero", np.float32(0)),
            _tensor("ax", np.array([1], np.int64)),
            _tensor("s0", np.array([0], np.int64)),
            _tensor("s1", np.array([H], np.int64)),
            _tensor("s2", np.array([3], np.int64)),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_g, else_branch=else_g, name="if")],
        "if_graph",
        [
            helper.make_tensor_value_info("X", FLOAT, ["T", "N", I]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("Y", FLOAT, None)],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def stacked_model(layer_weights, *, direction="forward", opset=14, names=None, link="torch"):
    """A chain of LSTM nodes linked the way torch.onnx.export links them.

    layer_weights: list of dicts from :func:`onnx_weights` (uniform H and D).
    link="torch": D=1 -> Squeeze(axis 1); D=2 -> Transpose(0,2,1,3) + Reshape(0,0,-1).
    Outputs: Y of the last node (T, D, N, H), and every node's Y_h / Y_c.
    """
    nodes, inits = [], []
    D, H4, I = layer_weights[0]["W"].shape
    H = H4 // 4
    x = "X"
    outs = []
    inits.append(_tensor("sq_axes", np.array([1], np.int64)))
    inits.append(_tensor("flat_shape", np.array([0, 0, -1], np.int64)))
    for l, w in enumerate(layer_weights):
        nm = names[l] if names else f"lstm_{l}"
        ins = [x, f"W{l}", f"R{l}"]
        inits += [_tensor(f"W{l}", w["W"]), _tensor(f"R{l}", w["R"])]
        if w.get("B") is not None:
            inits.append(_tensor(f"B{l}", w["B"]))
            ins.append(f"B{l}")
        nodes.append(
            helper.make_node("LSTM", ins, [f"Y{l}", f"Yh{l}", f"Yc{l}"], name=nm, hidden_size=H, direction=direction)
        )
        outs += [f"Yh{l}", f"Yc{l}"]
        if l + 1 < len(layer_weights):
            if D == 1:
                nodes.append(helper.make_node("Squeeze", [f"Y{l}", "sq_axes"], [f"X{l + 1}"], name=f"squeeze_{l}"))
            else:
                nodes.append(helper.make_node("Transpose", [f"Y{l}"], [f"T{l}"], perm=[0, 2, 1, 3], name=f"tr_{l}"))
                nodes.append(helper.make_node("Reshape", [f"T{l}", "flat_shape"], [f"X{l + 1}"], name=f"rs_{l}"))
            x = f"X{l + 1}"
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("X", FLOAT, ["T", "N", I])],
        [helper.make_tensor_value_info(f"Y{len(layer_weights) - 1}", FLOAT, None)]
        + [helper.make_tensor_value_info(o, FLOAT, None) for o in outs],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


# ---------------------------------------------------------------------------------------------
# Oracles
# ---------------------------------------------------------------------------------------------
def run_ort(model, feeds):
    """Run ``model`` with onnxruntime on one thread; returns the list of outputs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_reference(model, feeds):
    """Run ``model`` with onnx.reference.ReferenceEvaluator (the oracle for layout=1)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def y_to_time_major(Y):
    """ONNX Y (T, D, N, H) -> (T, N, D*H), the layout of our model's y."""
    T, D, N, H = Y.shape
    return np.transpose(Y, (0, 2, 1, 3)).reshape(T, N, D * H)


def naive_single(params_per_dir, x, h0=None, c0=None, clip=None, input_forget=False, lengths=None, reverse=False):
    """naive.run for one layer, including a lone *reverse* direction.

    x (T, N, I); h0/c0 (D, N, H). Returns y (T, N, D*H), h (D, N, H), c (D, N, H).
    """
    return naive.run([params_per_dir], x, h0, c0, clip, input_forget, lengths, reverse=reverse)


def all_activation_cases():
    """Every ONNX activation with non-default parameters where it takes them: (name, alpha, beta)."""
    return [
        ("Sigmoid", None, None),
        ("Tanh", None, None),
        ("Relu", None, None),
        ("HardSigmoid", 0.3, 0.4),
        ("Affine", 0.7, 0.1),
        ("LeakyRelu", 0.05, None),
        ("ThresholdedRelu", 0.2, None),
        ("ScaledTanh", 1.3, 0.8),
        ("Elu", 0.9, None),
        ("Softsign", None, None),
        ("Softplus", None, None),
    ]


def attrs_for_activations(acts: Sequence[tuple]):
    """(names, alphas, betas) lists for activations given as (name, alpha|None, beta|None).

    Alphas/betas are listed only for the activations that take them, in order (onnxruntime's rule).
    """
    from lstm_cpu.spec import ACTIVATIONS

    names, alphas, betas = [], [], []
    for name, a, b in acts:
        names.append(name)
        n = ACTIVATIONS[name][3]
        if n >= 1:
            alphas.append(ACTIVATIONS[name][1] if a is None else a)
        if n >= 2:
            betas.append(ACTIVATIONS[name][2] if b is None else b)
    return names, alphas, betas


def spec_activations(acts: Sequence[tuple]):
    """3 spec.Activation from (name, alpha|None, beta|None) triples (None -> spec default)."""
    return tuple(
        Activation(n, float("nan") if a is None else a, float("nan") if b is None else b) for n, a, b in acts
    )
