"""lstm_cpu/layout.py: the typed plan, its views, and the version that guards Numba's cache."""

from __future__ import annotations

import numpy as np
import pytest

from lstm_cpu import LayerParams, LSTMModel, layout
from lstm_cpu.spec import Activation

# LAYOUT_VERSION -> the fingerprint of every layout constant at that version. A change to a
# constant in layout.py without a version bump (and a matching edit of kernels.py, whose file
# Numba's cache keys on) fails here. To bump: raise LAYOUT_VERSION, update the assert in
# kernels.py, and add the new pair below.
KNOWN = {
    6: "dacda13566beaa747b21c853e76d6f1c396406133842947288c02208a49e4598",
    7: "22ee52a580ed7e9962af2e766b5ce0a7a350c117ed80d348d6a6d002806e4c5f",
}


def test_layout_constants_change_only_with_a_version_bump():
    assert layout.LAYOUT_VERSION in KNOWN, "new LAYOUT_VERSION: record its fingerprint in KNOWN"
    assert layout.layout_fingerprint() == KNOWN[layout.LAYOUT_VERSION], (
        "layout.py's constants changed without a LAYOUT_VERSION bump")


def test_kernels_file_names_the_layout_version():
    """Numba's cache keys on kernels.py: it must be edited whenever the layout version moves."""
    import inspect

    from lstm_cpu import kernels

    assert f"LAYOUT_VERSION == {layout.LAYOUT_VERSION}" in inspect.getsource(kernels)


def _layers(rng, I, H, L, D, P=0, peep=False):
    out = P or H
    rows = []
    for l in range(L):
        fan_in = I if l == 0 else D * out
        rows.append([LayerParams(rng.normal(size=(4 * H, fan_in)), rng.normal(size=(4 * H, out)),
                                 rng.normal(size=4 * H),
                                 rng.normal(size=(P, H)) if P else None,
                                 rng.normal(size=3 * H) if peep else None,
                                 (Activation("Sigmoid"), Activation("Tanh"), Activation("Relu")))
                     for _ in range(D)])
    return rows


@pytest.mark.parametrize("I,H,L,D,P,peep", [(3, 5, 1, 1, 0, False), (7, 33, 2, 2, 4, True),
                                           (16, 64, 3, 1, 0, True)])
def test_plan_views_invert_pack(I, H, L, D, P, peep):
    """pack -> the plan's views -> unpack gives the canonical weights back exactly (float64)."""
    rng = np.random.default_rng(1)
    layers = _layers(rng, I, H, L, D, P, peep)
    head = (rng.normal(size=(5, D * (P or H))), rng.normal(size=5))
    plan, wbuf, fpar = layout.pack(layers, clip=None, input_forget=False, dtype=np.float64, head=head)
    assert plan.Hp % layout.UNIT_ALIGN == 0 and plan.Hp >= H and plan.C == 4 * plan.Hp
    assert wbuf.size == plan.total
    for l in range(L):
        for d in range(D):
            p = layers[l][d]
            w_cat, bias, pp, w_hr = layout.unpack_layer(plan, wbuf, l, d)
            np.testing.assert_array_equal(w_cat, np.concatenate([p.w_ih, p.w_hh], axis=1))
            np.testing.assert_array_equal(bias, p.bias)
            if peep:
                np.testing.assert_array_equal(pp, p.peephole)
            if P:
                np.testing.assert_array_equal(w_hr, p.w_hr)
            # gate g of unit u sits at column g*Hp + u; padded units are zero
            W = plan.gate_matrix(wbuf, l, d)
            np.testing.assert_array_equal(W[:, 2 * plan.Hp + H - 1], w_cat[2 * H + H - 1])
            assert not W[:, H:plan.Hp].any()
            assert plan.act_codes[l * D + d] == (0, 1, 2)
    hw, hb = plan.head(wbuf)
    np.testing.assert_array_equal(hw.T, head[0])
    np.testing.assert_array_equal(hb, head[1])


def test_plan_from_meta_rebuilds_or_refuses():
    rng = np.random.default_rng(2)
    plan, _, _ = layout.pack(_layers(rng, 4, 20, 2, 2, 3, True), clip=None, input_forget=True,
                             dtype=np.float32)
    again = layout.Plan.from_meta(plan.meta.copy())
    assert again.records == plan.records and again.act_codes == plan.act_codes
    assert np.array_equal(again.meta, plan.meta)
    for field, value in ((layout.M_H, 2**31), (layout.M_D, 3), (layout.M_PEEP, 2),
                         (layout.M_LD + layout.LD_W, 7), (layout.M_HEAD_W, 1)):
        bad = plan.meta.copy()
        bad[field] = value
        with pytest.raises(layout.PlanError):
            layout.Plan.from_meta(bad)
    with pytest.raises(layout.PlanError):
        layout.Plan.from_meta(plan.meta[:-1].copy())


def test_packing_does_not_depend_on_the_kernel_or_the_threads():
    """The plan is a function of the model alone: kernel="parallel" packs the same bytes."""
    rng = np.random.default_rng(3)
    layers = _layers(rng, 8, 300, 2, 1)
    a = LSTMModel(layers, kernel="serial")
    b = LSTMModel(layers, kernel="parallel")
    assert np.array_equal(a._wbuf, b._wbuf) and np.array_equal(a._meta, b._meta)
