"""The reference runtime: the export form on stock ONNX Runtime, which runs each ``ai.bnnc`` op through
its ONNX function body (``bnnc.ops.export``), with graph optimizations off so the ops compute exactly
what their bodies say."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


class OrtReferenceRunner:
    def __init__(self, model: onnx.ModelProto, num_threads: int | None = None):
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
        opts.log_severity_level = 3
        # No graph rewrites: ORT's Conv-Mul fusion would fold the weight scale into the ±1 weights and
        # round sums that are exact integers, moving ties (D = 0) off the threshold.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.asarray(x, np.float32)})[0]
