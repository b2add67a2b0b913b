"""The public API's boundary: wrong shapes, wrong types, odd-but-valid arrays, bad state.

Rules checked (lstm_cpu/errors.py): a wrong shape is an ``InputError`` (a ``ValueError``) whose
message names what was expected and what came; a non-numeric input is an ``InputTypeError`` (a
``TypeError``); any real dtype and any strides are accepted and give the same numbers as a clean
float array.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu.errors import InputError, InputTypeError, LSTMError, UnsupportedModelError
from lstm_cpu.model import LSTMModel
from lstm_cpu.spec import LayerParams

I, H, L = 3, 5, 2


def _model(D=1, P=0, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    out = P or H
    layers = []
    for l in range(L):
        fan_in = I if l == 0 else D * out
        layers.append([LayerParams(
            w_ih=rng.uniform(-0.5, 0.5, (4 * H, fan_in)),  # (4H, in)
            w_hh=rng.uniform(-0.5, 0.5, (4 * H, out)),  # (4H, out)
            bias=rng.uniform(-0.5, 0.5, 4 * H),  # (4H,)
            w_hr=rng.uniform(-0.5, 0.5, (P, H)) if P else None,  # (P, H)
        ) for _ in range(D)])
    return LSTMModel(layers, dtype=dtype)


@pytest.fixture(scope="module")
def model():
    return _model()


def _shape_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    assert isinstance(e.value, InputError), type(e.value)
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------
def test_run_wrong_shapes(model):
    _shape_error(lambda: model.run(np.zeros((4, I + 1))), str(I), "(4, 4)")
    _shape_error(lambda: model.run(np.zeros((4, 2, I + 2))), "(4, 2, 5)")
    _shape_error(lambda: model.run(np.zeros(I)), f"(T, {I})", f"({I},)")
    _shape_error(lambda: model.run(np.zeros((1, 1, 1, I))), "(1, 1, 1, 3)")


def test_step_wrong_shapes(model):
    s = model.stream()
    _shape_error(lambda: s.step(np.zeros(I + 1)), f"({I},)", f"({I + 1},)")
    _shape_error(lambda: s.step(np.zeros((1, I))), f"({I},)", f"(1, {I})")
    _shape_error(lambda: s.step(np.float32(1.0)), f"({I},)")
    sb = model.stream(batch=2)
    _shape_error(lambda: sb.step(np.zeros(I)), f"(2, {I})", f"({I},)")
    _shape_error(lambda: sb.step(np.zeros((3, I))), f"(2, {I})", f"(3, {I})")


def test_stream_run_wrong_shapes(model):
    s = model.stream()
    _shape_error(lambda: s.run(np.zeros((4, I + 1))), f"(T, {I})", "(4, 4)")
    _shape_error(lambda: s.run(np.zeros(I)), f"(T, {I})")
    sb = model.stream(batch=2)
    _shape_error(lambda: sb.run(np.zeros((4, 3, I))), f"(T, 2, {I})", "(4, 3, 3)")


def test_run_bad_lengths(model):
    x = np.zeros((4, 2, I))
    _shape_error(lambda: model.run(x, lengths=[1, 2, 3]), "(2,)", "(3,)")
    _shape_error(lambda: model.run(x, lengths=[5, 1]), "[0, 4]")
    _shape_error(lambda: model.run(x, lengths=[-1, 1]), "[0, 4]")
    with pytest.raises(TypeError):
        model.run(x, lengths=[1.5, 2])


def test_bad_batch_argument(model):
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(InputError):
            model.stream(batch=bad)


def test_bad_kernel_name(model):
    with pytest.raises(InputError):
        model.stream(kernel="gpu")
    with pytest.raises(InputError):
        model.run(np.zeros((2, I)), kernel="fast")


# ---------------------------------------------------------------------------------------------
# Types: non-numeric -> TypeError; any real dtype / strides accepted
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    np.array([["a", "b", "c"]]),
    np.array([[object(), object(), object()]], dtype=object),
    np.array([[1 + 2j, 0, 0]]),
    [["x", 1, 2]],
    "abc",
])
def test_non_numeric_is_type_error(model, bad):
    with pytest.raises(TypeError) as e:
        model.run(bad)
    assert isinstance(e.value, InputTypeError)
    s = model.stream()
    with pytest.raises(TypeError):
        s.step(np.asarray(bad)[0] if np.ndim(bad) == 2 else bad)
    with pytest.raises(TypeError):
        s.run(bad)


def test_object_array_of_numbers_is_still_rejected_or_read(model):
    """dtype=object holding floats is not numeric storage: a TypeError, not a silent copy."""
    with pytest.raises(TypeError):
        model.run(np.zeros((2, I)).astype(object))


def test_ragged_list_is_type_error(model):
    with pytest.raises((TypeError, ValueError)) as e:
        model.run([[1.0, 2.0, 3.0], [1.0]])
    assert isinstance(e.value, LSTMError)


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.float16, np.float32,
                                   np.float64, np.bool_])
def test_any_real_dtype_accepted(model, dtype):
    x = (np.random.default_rng(1).standard_normal((6, 2, I)) * 3).astype(dtype)  # (T, B, I)
    want, _ = model.run(x.astype(np.float64).astype(np.float32))
    y, _ = model.run(x)
    np.testing.assert_array_equal(y, want)
    s = model.stream(batch=2)
    ys = np.stack([s.step(x[t]) for t in range(6)])
    np.testing.assert_allclose(ys, want, rtol=0, atol=1e-6)


def test_non_contiguous_views_accepted(model):
    rng = np.random.default_rng(2)
    big = rng.standard_normal((12, 4, 2 * I)).astype(np.float32)
    x = big[::2, ::2, ::2]  # (6, 2, I), every axis strided
    assert not x.flags.c_contiguous
    want, _ = model.run(np.ascontiguousarray(x))
    y, _ = model.run(x)
    np.testing.assert_array_equal(y, want)
    xf = np.asfortranarray(np.ascontiguousarray(x))
    np.testing.assert_array_equal(model.run(xf)[0], want)
    s = model.stream(batch=2)
    ys = np.stack([s.step(x[t]) for t in range(6)])
    np.testing.assert_allclose(ys, want, rtol=0, atol=1e-6)
    s1 = model.stream()
    ys1 = s1.run(x[:, 1, :])  # (6, I) strided view
    np.testing.assert_allclose(ys1, want[:, 1], rtol=0, atol=1e-6)
    rev = np.ascontiguousarray(x[:, 0, :])[::-1]  # negative strides
    np.testing.assert_array_equal(model.run(rev)[0], model.run(rev.copy())[0])


def test_python_lists_accepted(model):
    x = np.random.default_rng(3).standard_normal((4, I))
    np.testing.assert_array_equal(model.run(x.tolist())[0], model.run(x)[0])
    s = model.stream()
    s.step(x[0].tolist())


def test_empty_sequence(model):
    y, (h, c) = model.run(np.zeros((0, I)))
    assert y.shape == (0, model.output_size)
    assert h.shape == (L, H) and c.shape == (L, H)
    s = model.stream()
    assert s.run(np.zeros((0, I))).shape == (0, model.output_size)


# ---------------------------------------------------------------------------------------------
# Bidirectional streaming, state shapes
# ---------------------------------------------------------------------------------------------
def test_streaming_bidirectional_is_a_clear_error():
    m = _model(D=2)
    with pytest.raises(LSTMError) as e:
        m.stream()
    assert isinstance(e.value, UnsupportedModelError)
    assert "bidirectional" in str(e.value) and "run" in str(e.value)
    y, (h, c) = m.run(np.zeros((3, I)))  # the whole-sequence path works
    assert y.shape == (3, 2 * H) and h.shape == (L * 2, H)


def test_stream_state_wrong_shapes(model):
    s = model.stream()
    good_h, good_c = np.zeros((L, H)), np.zeros((L, H))
    _shape_error(lambda: setattr(s, "state", (np.zeros((L, H + 1)), good_c)), f"({L}, {H})", f"({L}, {H + 1})")
    _shape_error(lambda: setattr(s, "state", (good_h, np.zeros((L + 1, H)))), f"({L}, {H})", f"({L + 1}, {H})")
    _shape_error(lambda: setattr(s, "state", (np.zeros((L, 1, H)), good_c)), f"({L}, {H})")
    with pytest.raises(InputError):
        s.state = good_h  # not a pair
    with pytest.raises(InputError):
        s.state = (good_h, good_c, good_c)
    with pytest.raises(TypeError):
        s.state = (np.full((L, H), "x"), good_c)
    sb = model.stream(batch=3)
    _shape_error(lambda: setattr(sb, "state", (good_h, good_c)), f"({L}, 3, {H})", f"({L}, {H})")
    sb.state = (np.zeros((L, 3, H)), np.zeros((L, 3, H)))  # the right shape works


def test_run_state_wrong_shapes(model):
    x = np.zeros((4, 2, I))
    _shape_error(lambda: model.run(x, state=(np.zeros((L, H)), np.zeros((L, H)))), f"({L}, 2, {H})")
    _shape_error(lambda: model.run(x[:, 0], state=(np.zeros((L, 2, H)), np.zeros((L, 2, H)))), f"({L}, {H})")
    with pytest.raises(InputError):
        model.run(x, state=np.zeros((L, 2, H)))


def test_projected_state_shapes():
    m = _model(P=2)
    s = m.stream()
    h, c = s.state
    assert h.shape == (L, 2) and c.shape == (L, H)
    _shape_error(lambda: setattr(s, "state", (np.zeros((L, H)), np.zeros((L, H)))), f"({L}, 2)", f"({L}, {H})")


def test_run_does_not_modify_caller_state(model):
    """``state=`` is an input: the caller's arrays must be left as they were."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 2, I)).astype(np.float32)
    for batched in (True, False):
        xb = x if batched else x[:, 0]
        shp = (L, 2, H) if batched else (L, H)
        h0 = rng.standard_normal(shp).astype(np.float32)  # same dtype: no conversion copy
        c0 = rng.standard_normal(shp).astype(np.float32)
        h_keep, c_keep = h0.copy(), c0.copy()
        model.run(xb, state=(h0, c0))
        np.testing.assert_array_equal(h0, h_keep, err_msg=f"run() overwrote state h (batched={batched})")
        np.testing.assert_array_equal(c0, c_keep, err_msg=f"run() overwrote state c (batched={batched})")


def test_step_does_not_modify_input(model):
    x = np.random.default_rng(5).standard_normal(I).astype(np.float32)
    keep = x.copy()
    s = model.stream()
    s.step(x)
    np.testing.assert_array_equal(x, keep)


def test_step_out_argument(model):
    s = model.stream()
    out = np.empty(model.output_size, np.float32)
    x = np.ones(I, np.float32)
    r = s.step(x, out=out)
    assert r is out
    with pytest.raises(InputError):
        s.step(x, out=np.empty(model.output_size + 1, np.float32))
    with pytest.raises(InputError):
        s.step(x, out=np.empty(model.output_size, np.float64))


def test_one_stream_fast_path_is_the_general_step(model):
    """A single float stream steps through a closure over its arrays (Stream._one_stream_step);
    every input it does not take as it is falls back to Stream.step itself. Both must give the
    same bits, keep the same state and raise the same errors."""
    from lstm_cpu.model import Stream

    rng = np.random.default_rng(6)
    xs = rng.standard_normal((8, I)).astype(np.float32)
    fast, slow = model.stream(), model.stream()
    assert "step" in vars(fast)  # the closure is installed on the instance
    out = np.empty(model.output_size, np.float32)
    ro = xs.copy()
    ro.flags.writeable = False  # read-only: not the kernel's type, so the general path copies it
    strided = np.empty(2 * model.output_size, np.float32)[::2]
    for t in range(8):
        want = Stream.step(slow, xs[t])
        x = (xs[t], ro[t], xs[t].tolist(), xs[t].astype(np.float64))[t % 4]
        got = fast.step(x, out=out) if t % 2 else fast.step(x)
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fast.state[0], slow.state[0])
    np.testing.assert_array_equal(fast.state[1], slow.state[1])
    for bad_out in (strided, np.empty(model.output_size + 1, np.float32)):
        with pytest.raises(InputError, match="out: expected"):
            fast.step(xs[0], out=bad_out)
    _shape_error(lambda: fast.step(np.ones(I + 1, np.float32)), "expected shape", str(I + 1))
    with pytest.raises(InputTypeError):
        fast.step(np.array(["a"] * I))


def test_model_construction_errors():
    rng = np.random.default_rng(0)
    good = LayerParams(w_ih=rng.standard_normal((4 * H, I)), w_hh=rng.standard_normal((4 * H, H)))
    with pytest.raises(InputError):
        LSTMModel([])
    with pytest.raises(InputError, match=r"\(20, 5\)"):
        LSTMModel([[LayerParams(w_ih=good.w_ih, w_hh=rng.standard_normal((4 * H, H + 1)))]])
    with pytest.raises(InputError):
        LSTMModel([[good]], dtype=np.int32)
    bad = LayerParams(w_ih=good.w_ih.copy(), w_hh=good.w_hh)
    bad.w_ih[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        LSTMModel([[bad]])
