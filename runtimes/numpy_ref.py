"""The NumPy reference executor for the deploy form: slow, obviously correct.

Standard ONNX ops run on ``onnx.reference.ReferenceEvaluator``; every ``ai.bnnc`` op runs its NumPy
reference kernel from ``bnnc.ops.deploy`` (export-form ops run their ONNX function bodies). Tests use it
to check each pass on its own, independent of any compiled kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from bnnc.ops import DOMAIN
from bnnc.ops import deploy as K


class PackSign(OpRun):
    op_domain = DOMAIN

    def _run(self, x, t=None):
        return (K.pack_sign(x, t),)


class UnpackSign(OpRun):
    op_domain = DOMAIN

    def _run(self, x, channels=None):
        return (K.unpack_sign(x, channels),)


class BinaryConv2dPacked(OpRun):
    op_domain = DOMAIN

    def _load_attributes(self):
        # OpRun reserves the name ``output`` (a property): load the others, keep this one aside.
        node = self.onnx_node
        saved = list(node.attribute)
        self.output_mode = next(a.s.decode() for a in saved if a.name == "output")
        del node.attribute[:]
        node.attribute.extend(a for a in saved if a.name != "output")
        try:
            super()._load_attributes()
        finally:
            del node.attribute[:]
            node.attribute.extend(saved)

    def _run(self, x, w, e, rc, cc, p0, p1, in_channels=None, out_channels=None, kernel_shape=None,
             strides=None, pads=None, dilations=None, output=None, source=None):
        output = self.output_mode
        return (K.binary_conv2d_packed(x, w, e, rc, cc, p0, p1, in_channels=in_channels,
                                       out_channels=out_channels, kernel_shape=list(kernel_shape),
                                       strides=list(strides), pads=list(pads), dilations=list(dilations),
                                       output=output),)


class MaxPoolBits(OpRun):
    op_domain = DOMAIN

    def _run(self, x, channels=None, kernel_shape=None, strides=None, pads=None, mode=None):
        return (K.maxpool_bits(x, channels=channels, kernel_shape=list(kernel_shape), strides=list(strides),
                               pads=list(pads), mode=mode),)


DEPLOY_KERNELS = [PackSign, UnpackSign, BinaryConv2dPacked, MaxPoolBits]


class NumpyDeployRunner:
    """Run an ONNX model (deploy or export form) with the NumPy references."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self._sess = ReferenceEvaluator(model, new_ops=DEPLOY_KERNELS)
        self.input_name = model.graph.input[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(None, {self.input_name: np.asarray(x, np.float32)})[0]

    def run_all(self, x: np.ndarray) -> dict:
        names = [o.name for o in self.model.graph.output]
        return dict(zip(names, self._sess.run(None, {self.input_name: np.asarray(x, np.float32)})))
