"""The runners: one module per runtime, each importing its runtime only when built."""

from .base import PeerUnavailable, Runner
from .bound import BoundRunner
from .onnx_graph import ExportedGraph
from .onnxruntime import OnnxRuntimeInt8Runner, OnnxRuntimeRunner
from .openvino import OpenVINORunner
from .ours import OursRunner
from .torch import TorchRunner

__all__ = ["PeerUnavailable", "Runner", "BoundRunner", "ExportedGraph", "OnnxRuntimeRunner", "OnnxRuntimeInt8Runner",
           "OpenVINORunner", "OursRunner", "TorchRunner"]
