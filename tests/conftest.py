"""Shared fixtures: seeded RNGs, random torch LSTMs, canonical weights, hypothesis profiles.

torch is imported lazily (inside the helpers) so that collecting tests that do not need it stays
fast, and so ``tests/test_import_light.py`` can check ``import lstm_cpu`` in a clean subprocess.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

#: "Many" streams or sequences in the tests: where batched products went through numpy's BLAS
#: until 2026-11-27 (and stopped being bit-identical to a lone stream; now they all are).
MANY = 40

# tests/ on sys.path so `import naive` (tests/naive.py) works. lstm_cpu and lstm_cpu.importers
# (the repository folder importers/, mapped by pyproject's package-dir) come from the installed
# package: `pip install -e ".[test]"`, as .ci/run does.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE,):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# A skip or xfail not on tests/skip_allowlist.py's explicit list fails the run (no silent passes).
import skip_allowlist  # noqa: E402
from skip_allowlist import (  # noqa: E402,F401 - pytest finds these hooks by name in this module
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
)

_MEASURED = pytest.StashKey[list]()


@pytest.fixture
def measured(request):
    """``measured(line)`` records a figure a test measured (not a check: the test asserts its own
    bound); ``pytest -v`` lists them after the run, grouped by module."""
    rows = request.config.stash.setdefault(_MEASURED, [])
    return lambda line: rows.append((request.node.module.__name__, line))


def pytest_terminal_summary(terminalreporter, config):
    skip_allowlist.pytest_terminal_summary(terminalreporter)
    rows = config.stash.get(_MEASURED, [])
    if rows and config.getoption("verbose") > 0:
        terminalreporter.section("measured")
        for module, line in rows:
            terminalreporter.line(f"{module}: {line}")

try:
    from hypothesis import HealthCheck, settings

    # "ci": a handful of examples per property, no per-example deadline (the first example pays
    # for Numba compilation). "dev": more examples for a local soak: HYPOTHESIS_PROFILE=dev.
    settings.register_profile(
        "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile(
        "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; only test_properties.py needs it
    pass


SEED = 20240611


@pytest.fixture
def rng():
    """A fresh, seeded numpy Generator per test (tests never share random state)."""
    return np.random.default_rng(SEED)


def torch_lstm(input_size, hidden_size, num_layers=1, proj_size=0, bidirectional=False, bias=True,
               seed=0, scale=None):
    """A random ``torch.nn.LSTM`` in eval mode, float32, reproducible from ``seed``.

    ``scale``: if given, weights are redrawn uniform in [-scale, scale] (PyTorch's own init is
    U(-1/sqrt(H), 1/sqrt(H))); biases are always redrawn so that gates are not centred at 0.
    """
    import torch

    torch.manual_seed(seed)
    m = torch.nn.LSTM(input_size, hidden_size, num_layers=num_layers, proj_size=proj_size,
                      bidirectional=bidirectional, bias=bias)
    _randomize(m, scale, seed)
    return m.eval()


def torch_cell(input_size, hidden_size, bias=True, seed=0, scale=None):
    """A random ``torch.nn.LSTMCell`` (see :func:`torch_lstm`)."""
    import torch

    torch.manual_seed(seed)
    m = torch.nn.LSTMCell(input_size, hidden_size, bias=bias)
    _randomize(m, scale, seed)
    return m.eval()


def _randomize(m, scale, seed):
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if scale is not None and name.startswith("weight"):
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * scale)
            if name.startswith("bias"):
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * 0.5)


def canonical_layers(state_dict, num_layers, bidirectional=False, bias=True, proj=False):
    """LayerParams straight from a torch state dict, written independently of the importer.

    PyTorch's gate order is the canonical one, so this is the identity mapping plus bias folding;
    it lets tests feed tests/naive.py without going through lstm_cpu.importers.torch_lstm.
    """
    from lstm_cpu.spec import LayerParams

    def a(k):
        return state_dict[k].detach().double().numpy()

    layers = []
    for k in range(num_layers):
        row = []
        for sfx in ("", "_reverse") if bidirectional else ("",):
            row.append(LayerParams(
                w_ih=a(f"weight_ih_l{k}{sfx}"),
                w_hh=a(f"weight_hh_l{k}{sfx}"),
                bias=(a(f"bias_ih_l{k}{sfx}") + a(f"bias_hh_l{k}{sfx}")) if bias else None,
                w_hr=a(f"weight_hr_l{k}{sfx}") if proj else None,
            ))
        layers.append(row)
    return layers


def torch_run(module, x, double=False):
    """Run an nn.LSTM on time-major ``x`` (T, I) or (T, B, I) numpy -> (y, (h, c)) numpy.

    ``double``: run a float64 copy of the module on float64 input (the precision oracle).
    """
    import copy

    import torch

    m = copy.deepcopy(module).double() if double else module
    xt = torch.from_numpy(np.asarray(x, np.float64 if double else np.float32))
    with torch.no_grad():
        y, (h, c) = m(xt)
    return y.numpy(), (h.numpy(), c.numpy())


@pytest.fixture
def make_torch_lstm():
    """The :func:`torch_lstm` factory as a fixture (a missing torch skips the test, which fails
    the run: tests/skip_allowlist.py)."""
    pytest.importorskip("torch")
    return torch_lstm
