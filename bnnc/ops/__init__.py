"""The ``ai.bnnc`` op set: every op is defined once here.

``export``: float-semantics ops (torch custom op + onnxscript function + NumPy reference).
``deploy``: bit-packed ops emitted by the passes (schema + NumPy reference kernels).
"""

DOMAIN = "ai.bnnc"
OPSET_VERSION = 1
WORD_BITS = 32
