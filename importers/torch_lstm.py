"""PyTorch LSTMs -> the canonical :class:`lstm_cpu.model.LSTMModel`.

What is read
------------
``torch.nn.LSTM`` (any number of layers, ``bidirectional``, ``bias=False``, ``proj_size``) and
``torch.nn.LSTMCell``, given as

* the module itself, or any ``nn.Module`` holding exactly one of them (found by ``isinstance``);
* a state dict: a mapping ``name -> tensor | ndarray`` (``module.state_dict()``, possibly from a
  ``DataParallel``/``DistributedDataParallel`` model whose keys all start with ``module.``);
* a file: ``.pt``/``.pth`` (``torch.save``; read with ``torch.load(weights_only=True)`` only),
  ``.safetensors`` (read with the ``safetensors`` package; torch is not needed for it), or a
  TorchScript archive (``torch.jit.save``; its weights are read by
  :mod:`lstm_cpu.importers.torchscript`, which runs nothing and needs no torch).

State-dict keys, PyTorch's names (``k`` = layer, ``_reverse`` = backward direction)::

    weight_ih_l{k}[_reverse]   (4H, in)    in = I for k = 0, else D*out
    weight_hh_l{k}[_reverse]   (4H, out)   out = P if proj_size else H
    bias_ih_l{k}[_reverse]     (4H,)       optional (bias=False), folded with bias_hh
    bias_hh_l{k}[_reverse]     (4H,)
    weight_hr_l{k}[_reverse]   (P, H)      only with proj_size
    LSTMCell: weight_ih (4H, I), weight_hh (4H, H), bias_ih (4H,), bias_hh (4H,)

PyTorch's gate order (i, f, g, o) *is* the canonical order, but the weights still go through
``spec.reorder_gates(a, "ifgo")`` so that every importer states its source order in one visible place.

Finding the LSTM
----------------
``prefix="encoder.rnn."`` names it inside a bigger model (the trailing dot is optional). Without a
prefix, the one LSTM present is used: keys are grouped by the prefix in front of ``weight_ih_l0``
(``nn.LSTM``) or ``weight_ih`` (``nn.LSTMCell``). Several candidates -> :class:`InputError` listing
them with their sizes; none -> :class:`FormatError` saying which keys were expected. A state dict
cannot tell an LSTM from a GRU by name; a GRU is rejected by its shapes (``weight_hh`` has 3H rows,
not 4H). Given a module, candidates are found with ``isinstance`` so other RNNs are never picked.

``head="fc"`` names an ``nn.Linear`` (``fc.weight`` (O, D*out), optional ``fc.bias`` (O,)) relative
to the module / state-dict root (not to the LSTM prefix); it is applied to every output step.

Projections (``proj_size``)
--------------------------
``torch.onnx.export`` cannot export an ``nn.LSTM`` with ``proj_size > 0`` (ONNX's LSTM has no
projection), so such models reach lstm-cpu through this module: pass the module, its state dict,
or a ``.pt``/``.safetensors`` file of it.

Safety
------
``.pt`` files are only ever opened with ``torch.load(..., weights_only=True)``: a checkpoint that
needs full unpickling (a pickled ``nn.Module``, custom classes, anything with a ``__reduce__``) is
refused with :class:`FormatError` and never executed. Tensor shapes are checked against
:data:`MAX_TENSOR_ELEMENTS` / :data:`MAX_DIM` before the tensor is read (safetensors reads the
header first), and every malformed input raises :class:`FormatError` naming the key, what was
expected and what was found -- never ``KeyError`` or a library's own exception.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from lstm_cpu.errors import FormatError, InputError, InputTypeError, UnsupportedModelError
from lstm_cpu.loader import sniff_checkpoint
from lstm_cpu.spec import LayerParams, reorder_gates

from .limits import MAX_DIM, MAX_TENSOR_ELEMENTS, check_dims, widen_bfloat16

#: PyTorch stores the gate blocks as (input, forget, cell candidate, output).
TORCH_GATE_ORDER = "ifgo"

#: Refuse stacks deeper than this (a corrupt key like ``weight_ih_l99999999`` must not loop).
MAX_LAYERS = 1024

# nn.LSTM parameter names: weight_ih_l0, bias_hh_l3_reverse, weight_hr_l1, ...
_LSTM_KEY = re.compile(r"^(weight_ih|weight_hh|weight_hr|bias_ih|bias_hh)_l(\d+)(_reverse)?$")
_CELL_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# Keys wrapped models add in front of every name: DataParallel / DDP, and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A checkpoint dict often nests the state dict under one of these.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


# ---------------------------------------------------------------------------------------------
# Tensor sources: shapes first, values on demand
# ---------------------------------------------------------------------------------------------
@dataclass
class _Tensors:
    """Names, shapes and lazy loading of the tensors of one state dict or file.

    ``shape(name)`` must not read the data, so sizes can be validated before anything is loaded
    (this matters for safetensors, whose header lists shapes).
    """

    names: List[str]
    shape: Callable[[str], Tuple[int, ...]]
    load: Callable[[str], np.ndarray]


def _shape_of(value) -> Optional[Tuple[int, ...]]:
    """Shape of a tensor / ndarray without converting it, or None if ``value`` is not array-like."""
    shp = getattr(value, "shape", None)
    if shp is None:
        return None
    try:
        return tuple(int(s) for s in shp)
    except (TypeError, ValueError):
        return None


def _to_numpy(name: str, value) -> np.ndarray:
    """A torch tensor or array-like -> a numpy floating array (torch is never imported here)."""
    if isinstance(value, np.ndarray):
        arr = value
    elif hasattr(value, "detach") and hasattr(value, "cpu"):
        # A torch.Tensor: numpy() has no bfloat16/float8, so widen those to float32 first.
        try:
            t = value.detach().cpu()
            # A file may not claim more than it holds: a broadcast (stride-0) view of a tiny
            # storage would otherwise be materialised at its logical size (a decompression bomb).
            held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
            if t.numel() * t.element_size() > held:
                raise FormatError(
                    f"tensor {name!r} of shape {tuple(t.shape)} needs {t.numel() * t.element_size()} "
                    f"bytes but its storage holds {held}: broadcast or overlapping views are refused")
            if t.is_floating_point() and t.dtype.itemsize < 4 and str(t.dtype) != "torch.float16":
                t = t.float()
            arr = t.numpy()
        except FormatError:
            raise
        except Exception as exc:  # sparse / quantized / meta tensors cannot become arrays
            raise FormatError(f"tensor {name!r} cannot be read as a dense CPU array: {exc}") from None
    else:
        try:
            arr = np.asarray(value)
        except Exception as exc:
            raise FormatError(f"{name!r} is not an array: {type(value).__name__} ({exc})") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise FormatError(f"tensor {name!r}: expected floating-point weights, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise FormatError(f"tensor {name!r} contains NaN or Inf")
    return arr


def _dict_tensors(sd: Mapping) -> _Tensors:
    """Tensors of an in-memory state dict; non-string keys and non-array values are ignored."""
    names = [k for k, v in sd.items() if isinstance(k, str) and _shape_of(v) is not None]

    def shape(name):
        return _shape_of(sd[name])

    def load(name):
        return _to_numpy(name, sd[name])

    return _Tensors(names, shape, load)


# ---------------------------------------------------------------------------------------------
# Locating the LSTM inside a state dict
# ---------------------------------------------------------------------------------------------
def _strip_wrappers(names: List[str]) -> str:
    """The wrapper prefix (``module.``) that *every* key carries, or ``""``."""
    for w in _WRAPPER_PREFIXES:
        if names and all(n.startswith(w) for n in names):
            return w
    return ""


def _norm_prefix(prefix: Optional[str], wrapper: str) -> Optional[str]:
    if prefix is None:
        return None
    if not isinstance(prefix, str):
        raise InputTypeError(f"prefix must be a string like 'encoder.rnn.', got {type(prefix).__name__}")
    if prefix and not prefix.endswith("."):
        prefix += "."
    # The user may spell the prefix with or without the DataParallel "module." in front.
    if wrapper and not prefix.startswith(wrapper):
        prefix = wrapper + prefix
    return prefix


def _candidates(tensors: _Tensors) -> Dict[str, str]:
    """prefix -> "LSTM" | "LSTMCell" for every group of keys that looks like one."""
    out: Dict[str, str] = {}
    names = set(tensors.names)
    for n in tensors.names:
        for suffix, kind in (("weight_ih_l0", "LSTM"), ("weight_ih", "LSTMCell")):
            if n.endswith(suffix):
                p = n[: -len(suffix)]
                if p and not p.endswith("."):
                    continue  # "myweight_ih" is not a parameter of a module at "my"
                if kind == "LSTMCell" and p + "weight_hh" not in names:
                    continue
                out.setdefault(p, kind)
    return out


def _group_sizes(tensors: _Tensors, prefix: str, kind: str) -> Tuple[Optional[Tuple[int, int]], int, int]:
    """What the key names and layer-0 shapes say about a candidate, without reading values:
    ((input_size, hidden_size) or None if weight_ih is not 2-D, num_layers, num_directions)."""
    shp = tensors.shape(prefix + ("weight_ih_l0" if kind == "LSTM" else "weight_ih"))
    sizes = (shp[1], shp[0] // 4) if len(shp) == 2 else None
    if kind != "LSTM":
        return sizes, 1, 1
    layers = {int(m.group(2)) for n in tensors.names if n.startswith(prefix)
              for m in [_LSTM_KEY.match(n[len(prefix):])] if m}
    return sizes, len(layers), 2 if prefix + "weight_ih_l0_reverse" in tensors.names else 1


def _describe(tensors: _Tensors, prefix: str, kind: str) -> str:
    """One line about a candidate: prefix, kind and sizes (for error messages)."""
    sizes, num_layers, num_dirs = _group_sizes(tensors, prefix, kind)
    desc = f"{prefix or '<root>'!s} ({kind}"
    if sizes is not None:
        desc += f", hidden_size={sizes[1]}, input_size={sizes[0]}"
    if kind == "LSTM":
        desc += f", num_layers={num_layers}" + (", bidirectional" if num_dirs == 2 else "")
    return desc + ")"


def _num_layers(tensors: _Tensors, prefix: str) -> int:
    """How many layers the nn.LSTM under ``prefix`` has (distinct ``_l{k}`` indices)."""
    return len({int(m.group(2)) for n in tensors.names if n.startswith(prefix)
                for m in [_LSTM_KEY.match(n[len(prefix):])] if m})


def _looks_like_lstm(tensors: _Tensors, prefix: str, kind: str) -> bool:
    """True if the group's recurrent weights have LSTM shapes: (4H, H), or (4H, P) with weight_hr."""
    hh = prefix + ("weight_hh_l0" if kind == "LSTM" else "weight_hh")
    if hh not in tensors.names:
        return False
    shp = tensors.shape(hh)
    if len(shp) != 2:
        return False
    hr = prefix + "weight_hr_l0"
    if kind == "LSTM" and hr in tensors.names:
        return len(tensors.shape(hr)) == 2 and tensors.shape(hr) == (shp[1], shp[0] // 4)
    return shp[0] == 4 * shp[1]


def _find_prefix(tensors: _Tensors, prefix: Optional[str]) -> Tuple[str, str]:
    """(prefix, kind) of the LSTM to import; errors list what was found."""
    cands = _candidates(tensors)
    listing = "; ".join(_describe(tensors, p, k) for p, k in sorted(cands.items())) or "none"
    if prefix is not None:
        if prefix in cands:
            return prefix, cands[prefix]
        raise FormatError(
            f"no LSTM at prefix {prefix!r}: expected key {prefix}weight_ih_l0 (nn.LSTM) or "
            f"{prefix}weight_ih (nn.LSTMCell); LSTM-like groups found: {listing}"
        )
    if len(cands) > 1:
        # A GRU / vanilla RNN next to the LSTM has the same key names; its shapes give it away.
        plausible = {p: k for p, k in cands.items() if _looks_like_lstm(tensors, p, k)}
        if len(plausible) == 1:
            cands = plausible
    if len(cands) == 1:
        (p, k), = cands.items()
        return p, k
    if not cands:
        shown = ", ".join(sorted(tensors.names)[:12]) + (" ..." if len(tensors.names) > 12 else "")
        raise FormatError(
            "no LSTM found: expected keys like weight_ih_l0, weight_hh_l0[, bias_ih_l0, bias_hh_l0] "
            f"(nn.LSTM) or weight_ih, weight_hh (nn.LSTMCell), optionally under a prefix; got "
            f"{len(tensors.names)} tensors: {shown or 'none'}"
        )
    raise InputError(f"{len(cands)} LSTMs found, pass prefix= to choose one: {listing}")


# ---------------------------------------------------------------------------------------------
# Shape checking and conversion
# ---------------------------------------------------------------------------------------------
def _check_size(key: str, shape: Tuple[int, ...]) -> None:
    check_dims(shape, f"tensor {key!r}")


def _expect(tensors: _Tensors, key: str, expected: Tuple[Optional[int], ...], what: str) -> Tuple[int, ...]:
    """Shape of ``key`` checked against ``expected`` (None = any); FormatError otherwise."""
    if key not in tensors.names:
        raise FormatError(f"missing tensor {key!r} ({what}, expected shape {_fmt(expected)})")
    shp = tensors.shape(key)
    _check_size(key, shp)
    if len(shp) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shp)):
        hint = ""
        if what == "recurrent weights" and len(shp) == 2 and shp[0] == 3 * shp[1]:
            hint = " (3H rows: this looks like a GRU, not an LSTM)"
        raise FormatError(f"tensor {key!r} ({what}): expected shape {_fmt(expected)}, got {shp}{hint}")
    return shp


def _fmt(shape: Tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _hidden_from(key: str, rows: int) -> int:
    if rows == 0 or rows % 4:
        raise FormatError(f"tensor {key!r}: expected 4*hidden_size rows (a positive multiple of 4), got {rows}")
    return rows // 4


def _lstm_layers(tensors: _Tensors, prefix: str) -> Tuple[list, dict]:
    """Read an nn.LSTM under ``prefix`` -> (layers[l][d] of LayerParams, sizes)."""
    present: Dict[Tuple[int, int], set] = {}
    for n in tensors.names:
        if not n.startswith(prefix):
            continue
        m = _LSTM_KEY.match(n[len(prefix):])
        if m is None:
            continue
        k = int(m.group(2))
        if k >= MAX_LAYERS:
            raise FormatError(f"tensor {n!r}: layer index {k} is beyond the limit of {MAX_LAYERS} layers")
        present.setdefault((k, 1 if m.group(3) else 0), set()).add(m.group(1))
    num_layers = 1 + max(k for k, _ in present)
    num_dirs = 2 if any(d == 1 for _, d in present) else 1
    has_bias = (0, 0) in present and bool({"bias_ih", "bias_hh"} & present[(0, 0)])
    has_proj = (0, 0) in present and "weight_hr" in present[(0, 0)]

    def key(name, k, d):
        return f"{prefix}{name}_l{k}{'_reverse' if d else ''}"

    # Sizes come from layer 0 forward; every other tensor is checked against them.
    key_ih = key("weight_ih", 0, 0)
    w0 = _expect(tensors, key_ih, (None, None), "input weights")
    H = _hidden_from(key("weight_ih", 0, 0), w0[0])
    I = w0[1]
    if I == 0:
        raise FormatError(f"tensor {key_ih!r}: expected input_size >= 1 columns, got shape {w0}")
    if has_proj:
        P = _expect(tensors, key("weight_hr", 0, 0), (None, H), "projection weights")[0]
        if P == 0:
            raise FormatError(f"tensor {key('weight_hr', 0, 0)!r}: expected proj_size >= 1 rows, got 0")
    else:
        P = 0
    out = P or H
    layers = []
    for k in range(num_layers):
        in_k = I if k == 0 else num_dirs * out
        row = []
        for d in range(num_dirs):
            names = present.get((k, d), set())
            # Every (layer, direction) must have the same set of tensors as layer 0 forward.
            if "weight_ih" not in names:
                raise FormatError(
                    f"missing tensor {key('weight_ih', k, d)!r}: the model has "
                    f"{'2 directions' if num_dirs == 2 else 'layers up to ' + str(num_layers - 1)} "
                    f"but layer {k} {'reverse' if d else 'forward'} has no input weights (expected shape "
                    f"({4 * H}, {in_k}))"
                )
            _expect(tensors, key("weight_ih", k, d), (4 * H, in_k), "input weights")
            _expect(tensors, key("weight_hh", k, d), (4 * H, out), "recurrent weights")
            for b in ("bias_ih", "bias_hh"):
                if has_bias:
                    _expect(tensors, key(b, k, d), (4 * H,), "bias")
                elif b in names:
                    raise FormatError(
                        f"unexpected tensor {key(b, k, d)!r}: layer 0 has no bias but layer {k} has one"
                    )
            if has_proj:
                _expect(tensors, key("weight_hr", k, d), (P, H), "projection weights")
            elif "weight_hr" in names:
                raise FormatError(
                    f"unexpected tensor {key('weight_hr', k, d)!r}: layer 0 has no projection but layer {k} has one"
                )
            row.append(_params(tensors, key("weight_ih", k, d), key("weight_hh", k, d),
                               key("bias_ih", k, d) if has_bias else None,
                               key("bias_hh", k, d) if has_bias else None,
                               key("weight_hr", k, d) if has_proj else None))
        layers.append(row)
    sizes = dict(input_size=I, hidden_size=H, proj_size=P, num_layers=num_layers, num_directions=num_dirs)
    return layers, sizes


def _cell_layers(tensors: _Tensors, prefix: str) -> Tuple[list, dict]:
    """Read an nn.LSTMCell under ``prefix`` -> a one-layer, one-direction stack."""
    k_ih, k_hh, k_bi, k_bh = (prefix + n for n in _CELL_NAMES)
    key_ih = k_ih
    w0 = _expect(tensors, k_ih, (None, None), "input weights")
    H = _hidden_from(k_ih, w0[0])
    I = w0[1]
    if I == 0:
        raise FormatError(f"tensor {key_ih!r}: expected input_size >= 1 columns, got shape {w0}")
    _expect(tensors, k_hh, (4 * H, H), "recurrent weights")
    has_bias = k_bi in tensors.names or k_bh in tensors.names
    if has_bias:
        _expect(tensors, k_bi, (4 * H,), "bias")
        _expect(tensors, k_bh, (4 * H,), "bias")
    p = _params(tensors, k_ih, k_hh, k_bi if has_bias else None, k_bh if has_bias else None, None)
    return [[p]], dict(input_size=I, hidden_size=H, proj_size=0, num_layers=1, num_directions=1)


def _params(tensors: _Tensors, k_ih, k_hh, k_bi, k_bh, k_hr) -> LayerParams:
    """Load one direction's tensors (shapes already checked) into canonical LayerParams."""
    w_ih = reorder_gates(tensors.load(k_ih), TORCH_GATE_ORDER)  # (4H, in)
    w_hh = reorder_gates(tensors.load(k_hh), TORCH_GATE_ORDER)  # (4H, out)
    bias = None
    if k_bi is not None:
        # Folded in float64 so the one rounding happens when the model casts to its dtype.
        b = tensors.load(k_bi).astype(np.float64) + tensors.load(k_bh).astype(np.float64)  # (4H,)
        bias = reorder_gates(b, TORCH_GATE_ORDER)
    w_hr = tensors.load(k_hr) if k_hr is not None else None  # (P, H): no gate axis
    return LayerParams(w_ih=w_ih, w_hh=w_hh, bias=bias, w_hr=w_hr)


def _read_head(tensors: _Tensors, head, wrapper: str, in_features: int):
    """``head`` ("fc" name | (W, b) | None) -> (W (O, D*out), b (O,) | None) or None."""
    if head is None:
        return None
    if isinstance(head, str):
        name = head[:-1] if head.endswith(".") else head
        if wrapper and not name.startswith(wrapper):
            name = wrapper + name
        kw, kb = name + ".weight", name + ".bias"
        if kw not in tensors.names:
            linear = sorted(n[: -len(".weight")] for n in tensors.names if n.endswith(".weight")
                            and len(tensors.shape(n)) == 2)
            raise FormatError(
                f"head {head!r}: missing tensor {kw!r} (expected shape (O, {in_features})); "
                f"2-D '.weight' tensors found under: {', '.join(linear) or 'none'}"
            )
        O = _expect(tensors, kw, (None, in_features), f"head {head!r} weight (O, D*out)")[0]
        w = tensors.load(kw)
        b = None
        if kb in tensors.names:
            _expect(tensors, kb, (O,), f"head {head!r} bias")
            b = tensors.load(kb)
        return w, b
    if isinstance(head, (tuple, list)) and len(head) == 2:
        w = _to_numpy("head weight", head[0])
        b = None if head[1] is None else _to_numpy("head bias", head[1])
        if w.ndim != 2 or w.shape[1] != in_features:
            raise InputError(f"head weight: expected shape (O, {in_features}), got {w.shape}")
        if b is not None and b.shape != (w.shape[0],):
            raise InputError(f"head bias: expected shape ({w.shape[0]},), got {b.shape}")
        return w, b
    if hasattr(head, "weight") and hasattr(head, "in_features"):  # an nn.Linear module
        return _read_head(_dict_tensors({"h.weight": head.weight, "h.bias": head.bias}
                                        if head.bias is not None else {"h.weight": head.weight}),
                          "h", "", in_features)
    raise InputTypeError(
        f"head must be the name of an nn.Linear (e.g. 'fc'), a (weight, bias) pair or an nn.Linear, "
        f"got {type(head).__name__}"
    )


def _build(tensors: _Tensors, prefix, head, dtype, source: dict):
    """Find, check and convert the LSTM in ``tensors`` -> LSTMModel."""
    from lstm_cpu.model import LSTMModel  # the runtime, numpy + numba only

    wrapper = _strip_wrappers(tensors.names)
    user_prefix = prefix
    prefix = _norm_prefix(prefix, wrapper)
    p, kind = _find_prefix(tensors, prefix)
    if kind == "LSTM":
        layers, sizes = _lstm_layers(tensors, p)
    else:
        layers, sizes = _cell_layers(tensors, p)
    in_features = sizes["num_directions"] * (sizes["proj_size"] or sizes["hidden_size"])
    head_wb = _read_head(tensors, head, wrapper, in_features)
    src = dict(source)
    src.update(prefix=p[len(wrapper):] if wrapper and p.startswith(wrapper) else p, module=kind)
    if user_prefix is not None:
        src["requested_prefix"] = user_prefix
    if isinstance(head, str):
        src["head"] = head
    return LSTMModel(layers, dtype=dtype, head=head_wb, source=src)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def _is_torch_module(obj) -> bool:
    # Duck-typed first so plain dicts and numpy never pull torch in.
    return hasattr(obj, "state_dict") and hasattr(obj, "named_modules") and not isinstance(obj, Mapping)


def from_torch(obj, prefix: Optional[str] = None, head=None, dtype=np.float32):
    """An ``nn.LSTM`` / ``nn.LSTMCell``, a module holding one, or a state dict -> LSTMModel.

    ``obj``: the module or a mapping ``name -> tensor | ndarray``. ``prefix``: where the LSTM sits
    (``"encoder.rnn."``), found automatically when there is exactly one. ``head``: name of an
    ``nn.Linear`` applied to every output step (``"fc"`` reads ``fc.weight`` (O, D*out) and
    ``fc.bias`` (O,)), relative to the root of ``obj``. ``dtype``: float32 or float64 compute.

    Raises FormatError for missing/inconsistent tensors, InputError when several LSTMs match.
    """
    if isinstance(obj, Mapping):
        return _build(_dict_tensors(obj), prefix, head, dtype, {"format": "pytorch", "path": None})
    if _is_torch_module(obj):
        import torch  # only a real nn.Module gets here, so torch is already loaded

        if not isinstance(obj, torch.nn.Module):
            raise InputTypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")
        sd = obj.state_dict()
        src = {"format": "pytorch", "path": None, "class": type(obj).__name__}
        if prefix is None:
            # isinstance, not key names: a GRU next to the LSTM must not count as a candidate.
            found = [(n, m) for n, m in obj.named_modules()
                     if isinstance(m, (torch.nn.LSTM, torch.nn.LSTMCell))]
            if len(found) == 1:
                prefix = found[0][0] + "." if found[0][0] else ""
            elif len(found) > 1:
                listing = "; ".join(
                    f"{n or '<root>'}. ({type(m).__name__}, hidden_size={m.hidden_size}, "
                    f"input_size={m.input_size})" for n, m in found)
                raise InputError(f"{len(found)} LSTMs found, pass prefix= to choose one: {listing}")
            # none: fall through to the key search, which reports what was expected
            if len(found) == 1 and getattr(found[0][1], "batch_first", False):
                # The weights are the same; only the caller's tensors were (B, T, I). Our run is
                # time-major, so say so in info() rather than silently differ.
                src["batch_first"] = True
        return _build(_dict_tensors(sd), prefix, head, dtype, src)
    raise InputTypeError(
        f"from_torch expects an nn.LSTM / nn.LSTMCell, a module holding one, or a state dict "
        f"(mapping of name -> tensor), got {type(obj).__name__}"
    )


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch's weights-only error that says *what* was refused.

    torch's full message also suggests re-running with ``weights_only=False``, which is exactly
    what must not be done with an untrusted file, so it is not passed on.
    """
    lines = [ln.strip() for ln in str(exc).replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines()]
    for ln in lines:
        for tag in ("Unsupported global", "unsupported GLOBAL", "Unsupported operand", "WeightsUnpickler error: U"):
            if tag in ln:
                return ln.split("Please use")[0].strip()
    keep = [ln for ln in lines if ln and "weights_only" not in ln and "documentation" not in ln
            and "file an issue" not in ln and not ln.startswith("Weights only load failed")]
    return keep[0] if keep else type(exc).__name__


def _load_pt(path: str) -> Mapping:
    """A weights-only ``torch.load``; the state dict (possibly nested under "state_dict" etc.)."""
    try:
        import torch
    except ImportError as exc:
        raise UnsupportedModelError(
            f"reading {path!r} needs PyTorch (pip install torch==2.13.0); "
            "a .safetensors file can be read without it"
        ) from exc
    import pickle

    try:
        # weights_only=True ONLY: the restricted unpickler allows tensors and plain containers,
        # so a hostile __reduce__ is refused instead of run. Never fall back to full unpickling.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{path!r} is not a weights-only checkpoint (it pickles objects other than tensors and "
            f"plain containers, e.g. a whole nn.Module, or it is corrupt); nothing in it was executed. "
            f"Save model.state_dict() instead. Refused: {_unpickler_reason(exc)}"
        ) from None
    except MemoryError:
        raise FormatError(f"{path!r}: checkpoint declares more data than can be allocated") from None
    except Exception as exc:  # truncated zip, random bytes, EOF: torch raises many types
        raise FormatError(
            f"{path!r} is not a readable PyTorch checkpoint: {type(exc).__name__}: {_unpickler_reason(exc)}"
        ) from None
    if not isinstance(obj, Mapping):
        raise FormatError(f"{path!r}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    if not any(_shape_of(v) is not None for v in obj.values()):
        for k in _NESTED_STATE_KEYS:
            if isinstance(obj.get(k), Mapping):
                return obj[k]
        raise FormatError(
            f"{path!r}: no tensors at the top level and no nested state dict under "
            f"{', '.join(_NESTED_STATE_KEYS)}; keys: {', '.join(map(str, list(obj)[:12]))}"
        )
    return obj


@contextmanager
def _safetensors_tensors(path: str):
    """Header-first reading of a .safetensors file with numpy (torch is not needed); the tensors
    are readable inside the ``with``."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise UnsupportedModelError(f"reading {path!r} needs the safetensors package (pip install safetensors)") from exc
    try:
        handle = safe_open(path, framework="np")
    except Exception as exc:  # SafetensorError (bad header, truncated), OSError, ...
        raise FormatError(f"{path!r} is not a readable safetensors file: {exc}") from None
    with handle as f:
        try:
            names = list(f.keys())
            # Shapes come from the JSON header: every size check runs before any data is read.
            shapes = {n: tuple(int(s) for s in f.get_slice(n).get_shape()) for n in names}
            dtypes = {n: str(f.get_slice(n).get_dtype()).upper() for n in names}
        except Exception as exc:
            raise FormatError(f"{path!r} is not a readable safetensors file: {exc}") from None

        def load(name):
            _check_size(name, shapes[name])
            try:
                if dtypes[name] == "BF16":  # numpy has no bfloat16: widen it ourselves
                    arr = _read_bf16(path, name, shapes[name])
                else:
                    arr = f.get_tensor(name)
            except FormatError:
                raise
            except Exception as exc:  # e.g. an F8 type numpy cannot hold, or the data is cut short
                raise FormatError(
                    f"{path!r}: cannot read tensor {name!r} (dtype {dtypes[name]}): {exc}"
                ) from None
            return _to_numpy(name, arr)

        yield _Tensors(names, shapes.__getitem__, load)


def _read_bf16(path: str, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """One BF16 tensor of a safetensors file as float32 (bf16 is the top half of a float32).

    The layout is: u64 little-endian header length n, n bytes of JSON header, then the data;
    ``data_offsets`` are relative to the data start. safe_open has already validated the header.
    """
    import json

    count = int(np.prod(shape, dtype=np.int64))
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > 100 << 20:
            raise FormatError(f"{path!r}: safetensors header of {n} bytes is larger than 100 MiB")
        entry = json.loads(fh.read(n)).get(name) or {}
        begin, end = entry.get("data_offsets", (0, -1))
        if end - begin != 2 * count:
            raise FormatError(
                f"{path!r}: tensor {name!r} BF16 {shape} needs {2 * count} bytes, header says {end - begin}"
            )
        fh.seek(8 + n + begin)
        raw = fh.read(end - begin)
    if len(raw) != 2 * count:
        raise FormatError(f"{path!r}: tensor {name!r} is truncated ({len(raw)} of {2 * count} bytes)")
    return widen_bfloat16(np.frombuffer(raw, dtype="<u2")).reshape(shape)  # (count,) -> shape


@contextmanager
def _file_tensors(path: str):
    """(tensors, source) of a ``.pt``/``.pth``, ``.safetensors`` or TorchScript file; the tensors
    are readable inside the ``with``."""
    kind = sniff_checkpoint(path)
    if kind == "torchscript":
        from lstm_cpu.importers.torchscript import tensors  # no torch needed

        with tensors(path) as ts:
            yield ts, {"format": "torchscript", "path": path}
    elif kind == "safetensors":
        with _safetensors_tensors(path) as ts:
            yield ts, {"format": "safetensors", "path": path}
    else:
        yield _dict_tensors(_load_pt(path)), {"format": "pytorch", "path": path}


def load_torch_file(path, prefix: Optional[str] = None, head=None, dtype=np.float32):
    """A ``.pt``/``.pth`` (weights-only), ``.safetensors`` or TorchScript file -> LSTMModel.
    See :func:`from_torch`."""
    path = os.fspath(path)
    with _file_tensors(path) as (tensors, source):
        return _build(tensors, prefix, head, dtype, source)


def candidates(path) -> list:
    """Every LSTM in a ``.pt``/``.pth``, ``.safetensors`` or TorchScript file, as
    :class:`lstm_cpu.candidates.Candidate` records (``name`` is what ``prefix=`` accepts), read
    from key names and shapes only. Groups whose shapes are not an LSTM's (a GRU's 3H rows) are
    left out."""
    from lstm_cpu.candidates import Candidate

    path = os.fspath(path)
    out = []
    with _file_tensors(path) as (tensors, _source):
        wrapper = _strip_wrappers(tensors.names)
        for p, kind in sorted(_candidates(tensors).items()):
            sizes, num_layers, num_dirs = _group_sizes(tensors, p, kind)
            if sizes is None or not _looks_like_lstm(tensors, p, kind):
                continue
            name = p[len(wrapper):] if wrapper and p.startswith(wrapper) else p
            first = p + ("weight_ih_l0" if kind == "LSTM" else "weight_ih")
            n = sum(1 for k in tensors.names if k.startswith(p) and (
                _LSTM_KEY.match(k[len(p):]) if kind == "LSTM" else k[len(p):] in _CELL_NAMES))
            out.append(Candidate(name=name, kind="operator", input_size=sizes[0], hidden_size=sizes[1],
                                 num_layers=num_layers, num_directions=num_dirs,
                                 location=f"nn.{kind} keys {first}, ... ({n} tensors)"))
    return out


__all__ = ["from_torch", "load_torch_file", "candidates", "MAX_TENSOR_ELEMENTS", "MAX_DIM", "TORCH_GATE_ORDER"]
