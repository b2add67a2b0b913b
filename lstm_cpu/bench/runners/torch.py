"""torch: an ``nn.LSTM`` (and ``nn.Linear`` head) with the canonical weights copied in.

torch's gate order is the canonical one, so no permutation; the folded bias goes to ``bias_ih``
and ``bias_hh`` is zero. One call per step (or per sequence) under ``torch.inference_mode()``.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ...spec import is_default_activations
from ..config import BenchConfig
from .base import PeerUnavailable, Runner, initial_state


class TorchRunner(Runner):
    name, threads_of = "torch", "torch"

    def __init__(self, model, layers, cfg: BenchConfig):
        """``layers``: the model's float32 canonical weights, ``[[LayerParams per direction]]``."""
        try:
            import torch  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install torch") from None
        for dirs in layers:
            for p in dirs:
                if p.peephole is not None:
                    raise PeerUnavailable("nn.LSTM has no peepholes")
                if not is_default_activations(p.activations):
                    raise PeerUnavailable("nn.LSTM has only sigmoid/tanh/tanh activations")
        if model.clip or model.input_forget:
            raise PeerUnavailable("nn.LSTM has no cell clip or coupled input-forget gate")
        if model.reverse:
            raise PeerUnavailable("nn.LSTM has no reverse-only direction")
        with contextlib.suppress(RuntimeError):  # only allowed before any parallel work
            torch.set_num_interop_threads(1)
        self.torch = torch
        H, P, D = model.hidden_size, model.proj_size, model.num_directions
        lstm = torch.nn.LSTM(model.input_size, H, num_layers=model.num_layers, bias=True,
                             proj_size=P, bidirectional=D == 2)

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a, np.float32))

        with torch.no_grad():
            for k, dirs in enumerate(layers):
                for d, p in enumerate(dirs):
                    sfx = f"l{k}" + ("_reverse" if d else "")
                    getattr(lstm, f"weight_ih_{sfx}").copy_(t(p.w_ih))  # (4H, in)
                    getattr(lstm, f"weight_hh_{sfx}").copy_(t(p.w_hh))  # (4H, out)
                    b = np.zeros(4 * H, np.float32) if p.bias is None else p.bias  # (4H,)
                    getattr(lstm, f"bias_ih_{sfx}").copy_(t(b))
                    getattr(lstm, f"bias_hh_{sfx}").zero_()  # biases are folded in ours
                    if P:
                        getattr(lstm, f"weight_hr_{sfx}").copy_(t(p.w_hr))  # (P, H)
        self.lstm = lstm.eval()
        self.linear = None
        if model.head is not None:
            w, b = model.head  # (O, D*out), (O,) or None
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(t(w))
                if b is not None:
                    lin.bias.copy_(t(b))
            self.linear = lin.eval()
        self.model, self.cfg = model, cfg
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def contexts(self):
        return [self.torch.inference_mode()]

    def _state(self, batch):
        h0, c0 = initial_state(self.model, batch)
        return self.torch.from_numpy(h0), self.torch.from_numpy(c0)

    def outputs(self, xs):
        torch = self.torch
        with torch.inference_mode():
            st = self._state(xs.shape[1])
            if self.cfg.mode == "sequence":
                y, _ = self.lstm(torch.from_numpy(xs), st)
                if self.linear is not None:
                    y = self.linear(y)
                return y.numpy().copy()  # (T, B, out)
            ys = []
            for t in range(xs.shape[0]):
                y, st = self.lstm(torch.from_numpy(xs[t : t + 1]), st)
                if self.linear is not None:
                    y = self.linear(y)
                ys.append(y.numpy()[0].copy())  # (B, out)
            return np.stack(ys)

    def make_call(self):
        x = self.torch.from_numpy(self.x)  # (1|T, B, I)
        lstm, linear = self.lstm, self.linear
        box = [self._state(self.x.shape[1])]
        if self.cfg.mode == "sequence":
            if linear is None:
                return lambda: lstm(x, box[0])
            return lambda: linear(lstm(x, box[0])[0])

        def call():
            y, box[0] = lstm(x, box[0])
            if linear is not None:
                linear(y)

        return call
