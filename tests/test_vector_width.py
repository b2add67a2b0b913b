"""The gate products' register blocks follow the vector width; their bits do not (issue 12).

On hosts without AVX-512 the products run in explicit 8-lane blocks (``kernels._make_vblock``,
up to 6 streams x 16 columns); with AVX-512, plain-loop blocks of 4 streams x 64 columns. Every
element is the same chain of FMAs in ascending k either way, so:

* the 8-lane kernels, compiled on this host (any x86-64 with AVX2 runs them), equal the host's
  kernels bit for bit for every stream count and block remainder;
* the whole engine compiled for a Haswell CPU (``NUMBA_CPU_NAME``, in a child process with its own
  Numba cache) gives the host's bits for ``run`` (serial and parallel) and ``Stream.step`` over six
  model kinds (tests/isa_cases.py). On an AVX-512 host that compares two instruction sets; on
  an AVX2 host, the Haswell code against the host's own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lstm_cpu import kernels
from lstm_cpu.bench.asm import AVX2_ENV

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

V8_PRODUCT = kernels._make_product_v8()
V8_PROJECTION = kernels._make_projection_v8()


def _panels(rng, n, K, dtype=np.float32):
    return rng.standard_normal((n, K, kernels.PANEL)).astype(dtype)  # (n, K, PANEL)


# every block shape: 1 (whole panel), 2 (32 columns), 3 alone, 4-6 alone, and splits into
# 3..6-stream blocks (7 = 4 + 3, 13 = 5 + 4 + 4, 16 = 6 + 5 + 5, 64 = 11 blocks)
STREAMS = [1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 16, 17, 64]


@pytest.mark.parametrize("N", STREAMS)
def test_8_lane_product_equals_the_host_product(N):
    rng = np.random.default_rng(N)
    K, n = 77, 3
    Wp = _panels(rng, n, K)
    Z = rng.standard_normal((N, K)).astype(np.float32)
    for k0, k1, p0, p1 in ((0, K, 0, n), (30, K, 1, 3), (5, 6, 0, 1), (9, 9, 0, n)):
        A0 = rng.standard_normal((N, n * kernels.PANEL)).astype(np.float32)
        want, got = A0.copy(), A0.copy()
        kernels._product(Z[:, : k1 - k0], Wp, want, p0, p1, k0, k1)
        V8_PRODUCT(Z[:, : k1 - k0], Wp, got, p0, p1, k0, k1)
        np.testing.assert_array_equal(got, want)
        # and against float64 sums: the products are products (a wrong column or row fails)
        ref = A0.astype(np.float64)
        W = Wp[p0:p1, k0:k1].astype(np.float64).transpose(1, 0, 2).reshape(k1 - k0, (p1 - p0) * 64)
        ref[:, p0 * 64 : p1 * 64] += Z[:, : k1 - k0].astype(np.float64) @ W
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 16, 17, 40])
def test_8_lane_product_into_strided_views(N):
    """A and Z as column windows of wider arrays (rows apart by more than their length): the
    blocks address them through their strides, and write nothing outside the window."""
    rng = np.random.default_rng(100 + N)
    K, n = 33, 2
    Wp = _panels(rng, n, K)
    Zbig = rng.standard_normal((N, K + 9)).astype(np.float32)
    Abig = rng.standard_normal((N, n * 64 + 48)).astype(np.float32)
    want, got = Abig.copy(), Abig.copy()
    kernels._product(np.ascontiguousarray(Zbig[:, 4 : 4 + K]), Wp, want[:, 16 : 16 + n * 64], 0, n, 0, K)
    V8_PRODUCT(Zbig[:, 4 : 4 + K], Wp, got[:, 16 : 16 + n * 64], 0, n, 0, K)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("M", [1, 2, 3, 6, 15, 16, 17, 37, 100])
def test_8_lane_projection_equals_the_host_projection(M):
    rng = np.random.default_rng(200 + M)
    kin, K, n = 19, 40, 4
    Wp = _panels(rng, n, K)
    bias = rng.standard_normal(n * 64).astype(np.float32)  # (C,) the chains' start
    X = rng.standard_normal((M, kin)).astype(np.float32)
    want = np.full((M, n * 64), np.nan, np.float32)  # not pre-set: every element written
    got = want.copy()
    kernels._projection(X, Wp, bias, want, 0, n)
    V8_PROJECTION(X, Wp, bias, got, 0, n)
    np.testing.assert_array_equal(got, want)
    ref = bias + X.astype(np.float64) @ Wp[:, :kin].astype(np.float64).transpose(1, 0, 2).reshape(kin, -1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    part = np.full_like(want, np.nan)
    V8_PROJECTION(X, Wp, bias, part, 1, 3)  # a panel range: the other columns untouched
    np.testing.assert_array_equal(part[:, 64:192], want[:, 64:192])
    assert np.isnan(part[:, :64]).all() and np.isnan(part[:, 192:]).all()


def test_float64_runs_the_plain_blocks():
    """float64 weights take the plain-loop blocks (the 8-lane ones are float32): same results."""
    rng = np.random.default_rng(5)
    Wp = _panels(rng, 2, 21, np.float64)
    Z = rng.standard_normal((7, 21))
    want, got = np.zeros((7, 128)), np.zeros((7, 128))
    kernels._make_product(64, kernels.BLOCK_STREAMS)(Z, Wp, want, 0, 2, 0, 21)
    V8_PRODUCT(Z, Wp, got, 0, 2, 0, 21)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, Z @ Wp.transpose(1, 0, 2).reshape(21, -1), rtol=1e-12)


_CHILD = """
import sys
import numpy as np
sys.path.insert(0, {here!r})
import isa_cases
res = isa_cases.outputs()
np.savez({out!r}, **{{k.replace("/", "|"): v for k, v in res.items()}})
"""


def test_haswell_code_gives_the_host_bits(tmp_path):
    import isa_cases

    out = str(tmp_path / "haswell.npz")
    env = dict(os.environ, **AVX2_ENV, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    r = subprocess.run([sys.executable, "-c", _CHILD.format(here=HERE, out=out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = {k.replace("|", "/"): v for k, v in np.load(out).items()}
    ours = isa_cases.outputs()
    assert bool(theirs.pop("v8")), "the Haswell child did not run the 8-lane blocks"
    assert bool(ours.pop("v8")) == kernels.V8_BLOCKS
    assert sorted(theirs) == sorted(ours) and len(ours) > 100
    differ = [k for k in ours if not np.array_equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} of {len(ours)} outputs differ, e.g. {differ[:5]}"
