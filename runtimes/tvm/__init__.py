"""TVM backend: bit-packed XNOR-popcount kernels and whole-network Relax compilation.

Public API::

    from bnnc.runtimes.tvm import compile_model, TVMModel, cpu_target, choose_mcpu

    tm = compile_model(onnx_model, target="cpu", batch_size=1, num_threads=None)
    y = tm.run(x)                      # any N: chunks of batch_size, last chunk zero-padded
    tm.export_library("model.so"); meta = tm.meta()   # meta: JSON-serializable dict
    tm2 = TVMModel.load("model.so", meta)

    compile_model(m, target="arm")     # AArch64 + NEON, cross-compiled: tm.export_library() (aarch64 .so)
    compile_model(m, target="cuda")    # CUDA (nvcc; "cuda:sm_90" for Hopper): runs where a GPU is

Kernels (one TE compute per op, schedules for x86, AArch64/NEON and CUDA) live in :mod:`.kernels`;
AArch64 cross-compilation and qemu-user execution of single kernels in :mod:`.cross`.

All kernels are bit-exact vs ``bnnc.ops.deploy``.
"""

from .graph import TVMModel, compile_model, set_num_threads, translate
from .target import arm_target, choose_mcpu, cpu_target, cuda_target, resolve_target, target_family

__all__ = ["compile_model", "TVMModel", "translate", "set_num_threads", "cpu_target", "choose_mcpu",
           "arm_target", "cuda_target", "resolve_target", "target_family"]
