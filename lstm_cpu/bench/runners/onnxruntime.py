"""onnxruntime: one InferenceSession on the exported graph, the state fed back every call."""

from __future__ import annotations

import numpy as np

from ..config import BenchConfig
from ..machine import onnxruntime_options
from .base import PeerUnavailable, Runner
from .onnx_graph import ExportedGraph


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, cfg: BenchConfig, graph: ExportedGraph):
        try:
            import onnxruntime as ort  # noqa: PLC0415 - optional peer
        except ImportError as e:
            raise PeerUnavailable(f"not installed ({e.name}); pip install onnxruntime") from None
        self.sess = ort.InferenceSession(self._model_bytes(graph), onnxruntime_options(ort, cfg.threads),
                                         providers=["CPUExecutionProvider"])
        self.graph, self.cfg = graph, cfg
        names = graph.output_names
        self.back = [(i, names.index(o)) for i, o in graph.state_pairs]  # (input, output index)
        if cfg.mode == "sequence":
            self.steps_per_call = cfg.seq_len

    @staticmethod
    def _model_bytes(graph: ExportedGraph) -> bytes:
        return graph.onnx_bytes

    def outputs(self, xs):
        run, names = self.sess.run, self.graph.output_names
        if self.cfg.mode == "sequence":
            return run(names, self.graph.feeds(xs))[0]  # (T, B, out)
        feeds = self.graph.feeds(xs[:1])
        ys = []
        for t in range(xs.shape[0]):
            feeds[self.graph.x_name] = xs[t : t + 1]  # (1, B, I)
            outs = run(names, feeds)
            ys.append(outs[0][0])  # (B, out)
            for name, k in self.back:
                feeds[name] = outs[k]
        return np.stack(ys)

    def make_call(self):
        feeds = self.graph.feeds(self.x)
        run, names, back = self.sess.run, self.graph.output_names, self.back
        if self.cfg.mode == "sequence":
            return lambda: run(names, feeds)

        def call():
            outs = run(names, feeds)
            for name, k in back:
                feeds[name] = outs[k]

        return call


class OnnxRuntimeInt8Runner(OnnxRuntimeRunner):
    """onnxruntime on ``quantize_dynamic`` of the same export: its DynamicQuantizeLSTM, int8
    weights with activations quantized per step (the int8 peer of ``--weights int8``)."""

    name = "onnxruntime-int8"

    @staticmethod
    def _model_bytes(graph: ExportedGraph) -> bytes:
        import os  # noqa: PLC0415
        import tempfile  # noqa: PLC0415

        try:
            from onnxruntime.quantization import quantize_dynamic  # noqa: PLC0415
        except ImportError as e:
            raise PeerUnavailable(f"onnxruntime.quantization is not available ({e})") from None
        with tempfile.TemporaryDirectory(prefix="lstm-cpu-bench-") as d:
            src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
            with open(src, "wb") as f:
                f.write(graph.onnx_bytes)
            quantize_dynamic(src, dst)
            with open(dst, "rb") as f:
                return f.read()
