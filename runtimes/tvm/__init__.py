"""TVM backend: bit-packed XNOR-popcount kernels and whole-network Relax compilation.

Public API::

    from bnnc.runtimes.tvm import compile_model, TVMModel, cpu_target, choose_mcpu

    tm = compile_model(onnx_model, target="cpu", batch_size=1, num_threads=None)
    y = tm.run(x)                      # any N: chunks of batch_size, last chunk zero-padded
    tm.export_library("model.so"); meta = tm.meta()   # meta: JSON-serializable dict
    tm2 = TVMModel.load("model.so", meta)

Kernels (TE definitions + CPU schedules, bit-exact vs ``bnnc.ops.deploy``) live in :mod:`.kernels`.
"""

from .graph import TVMModel, compile_model, set_num_threads, translate
from .target import choose_mcpu, cpu_target

__all__ = ["compile_model", "TVMModel", "translate", "set_num_threads", "cpu_target", "choose_mcpu"]
