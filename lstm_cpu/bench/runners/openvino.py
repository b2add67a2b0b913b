"""OpenVINO: the exported graph compiled for CPU with static shapes, the state fed back."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..config import BenchConfig
from ..machine import openvino_config
from .base import PeerUnavailable, Runner
from .onnx_graph import ExportedGraph


class OpenVINORunner(Runner):
    name = "openvino"

    def __init__(self, cfg: BenchConfig, graph: ExportedGraph, shape_x):
        try:
            import openvino as ov  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install openvino") from None
        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            with open(path, "wb") as f:
                f.write(graph.onnx_bytes)
            ovm = core.read_model(path)
        self.graph, self.cfg = graph, cfg
        # Static shapes: OpenVINO compiles one plan per shape, the shape of the timed input.
        sample = self.graph.feeds(np.zeros(shape_x, np.float32))
        ovm.reshape({name: list(a.shape) for name, a in sample.items()})
        self.compiled = core.compile_model(ovm, "CPU", openvino_config(cfg.threads))
        self.request = self.compiled.create_infer_request()
        self.y_port = self.compiled.output(graph.y_name)
        self.back = [(i, self.compiled.output(o)) for i, o in graph.state_pairs]  # (input, port)
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    def outputs(self, xs):
        infer = self.request.infer
        if self.cfg.mode == "sequence":
            return np.array(infer(self.graph.feeds(xs))[self.y_port])  # (T, B, out)
        feeds = self.graph.feeds(xs[:1])
        ys = []
        for t in range(xs.shape[0]):
            feeds[self.graph.x_name] = np.ascontiguousarray(xs[t : t + 1])  # (1, B, I)
            res = infer(feeds)
            ys.append(np.array(res[self.y_port][0]))  # (B, out)
            for name, port in self.back:
                feeds[name] = res[port].copy()  # the request reuses its output buffers
        return np.stack(ys)

    def make_call(self):
        feeds = self.graph.feeds(self.x)
        infer, back = self.request.infer, self.back
        if self.cfg.mode == "sequence":
            return lambda: infer(feeds)

        def call():
            res = infer(feeds)
            for name, port in back:
                feeds[name] = res[port].copy()  # the request reuses its output buffers

        return call
