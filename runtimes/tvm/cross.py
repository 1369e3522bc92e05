"""AArch64 cross-compilation of the deploy kernels, and running them under ``qemu-aarch64``.

TVM's LLVM backend emits, for each PrimFunc, a function with the TVM-FFI "safe call" ABI
(``int __tvm_ffi_<name>(void*, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret)``) whose only outside
dependencies are ``TVMFFIErrorSetRaisedFromCStrParts`` and three weak function-pointer slots
(``__TVMBackendParallelLaunch``, ``__TVMBackendAllocWorkspace``, ``__TVMBackendFreeWorkspace``) that
the TVM runtime fills when it loads a library. :class:`QemuKernel` links the kernel's AArch64 object file
with a small C harness that provides those (a serial parallel-launch that runs every task in turn,
``aligned_alloc`` workspaces), statically, with ``aarch64-linux-gnu-gcc``; it then runs the binary under
``qemu-aarch64-static`` on arrays passed through files. No TVM runtime is needed on the AArch64 side.

Tools (Debian/Ubuntu): ``apt-get install -y gcc-aarch64-linux-gnu qemu-user-static``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm

from . import kernels as K
from .target import arm_target

__all__ = ["AARCH64_CC", "QEMU", "missing_aarch64_tools", "aarch64_compile", "aarch64_assembly",
           "aarch64_object", "export_aarch64_library", "QemuKernel", "cross_fcompile"]

AARCH64_CC = os.environ.get("BNNC_AARCH64_CC", "aarch64-linux-gnu-gcc")
QEMU_CANDIDATES = ("qemu-aarch64-static", "qemu-aarch64")
QEMU = os.environ.get("BNNC_QEMU_AARCH64") or next((q for q in QEMU_CANDIDATES if shutil.which(q)),
                                                  QEMU_CANDIDATES[0])
SYMBOL = "bnnc_kernel"

_DTYPE_CODE = {"i": 0, "u": 1, "f": 2}


def missing_aarch64_tools(need_qemu: bool = True) -> list[str]:
    """Names of the missing tools among the AArch64 cross compiler and (optionally) qemu-aarch64."""
    miss = []
    if not shutil.which(AARCH64_CC):
        miss.append(AARCH64_CC)
    if need_qemu and not shutil.which(QEMU):
        miss.append(QEMU)
    return miss


def _target(target):
    if target is None or target == "arm":
        return tvm.target.Target(arm_target())
    if isinstance(target, dict):
        return tvm.target.Target(target)
    return target


def aarch64_compile(func, target=None, name: str = SYMBOL):
    """Compile an ARM-scheduled PrimFunc for AArch64: a TVM ``Executable`` (``.mod`` is the LLVM module)."""
    return K.compile_kernel(func, _target(target), name=name)


def aarch64_assembly(func, target=None) -> str:
    """AArch64 assembly of a kernel (``cnt``/``uadalp`` for the popcount, NEON ``v`` registers)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.s"
        aarch64_compile(func, target).mod.write_to_file(str(path))
        return path.read_text()


def aarch64_object(func, path, target=None, name: str = SYMBOL) -> str:
    """Write the kernel as an AArch64 ELF object file exporting ``__tvm_ffi_<name>``."""
    aarch64_compile(func, target, name=name).mod.write_to_file(str(path))
    return str(path)


def cross_fcompile(cc: str = AARCH64_CC):
    """``fcompile`` for ``export_library`` that links an AArch64 shared library with ``cc``."""
    from tvm.support import cc as _cc

    return _cc.cross_compiler(cc)


def export_aarch64_library(executable, path, cc: str = AARCH64_CC) -> str:
    """Export a compiled AArch64 ``Executable`` as a shared library loadable by an AArch64 TVM runtime."""
    executable.export_library(str(path), fcompile=cross_fcompile(cc))
    return str(path)


def _ffi_include() -> str:
    import tvm_ffi

    inc = Path(tvm_ffi.__file__).parent / "include"
    if not (inc / "tvm" / "ffi" / "c_api.h").exists():  # pragma: no cover
        raise FileNotFoundError(f"tvm_ffi C headers not found under {inc}")
    return str(inc)


_HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

/* The kernel (TVM-FFI safe-call ABI) and the runtime hooks it calls through weak pointer slots. */
extern int __tvm_ffi_bnnc_kernel(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* ret);
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendAllocWorkspace __attribute__((weak));
extern void* __TVMBackendFreeWorkspace __attribute__((weak));

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static int g_num_tasks = 1;

/* Serial "thread pool": runs every task of the parallel region in turn (task ids 0..n-1). */
static int parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  TVMParallelGroupEnv env;
  int n = num_task > 0 ? num_task : g_num_tasks;
  env.sync_handle = NULL;
  env.num_task = n;
  for (int t = 0; t < n; ++t) {
    int rc = f(t, &env, cdata);
    if (rc != 0) return rc;
  }
  return 0;
}

static void* alloc_workspace(int dev_type, int dev_id, uint64_t nbytes, int code, int bits) {
  (void)dev_type; (void)dev_id; (void)code; (void)bits;
  size_t n = (size_t)((nbytes + 63) / 64 * 64);
  return aligned_alloc(64, n ? n : 64);
}

static int free_workspace(int dev_type, int dev_id, void* ptr) {
  (void)dev_type; (void)dev_id;
  free(ptr);
  return 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  fprintf(stderr, "kernel error (%s): ", kind);
  for (int i = 0; i < n; ++i) fputs(parts[i], stderr);
  fputc('\n', stderr);
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* msg) {
  fprintf(stderr, "kernel error (%s): %s\n", kind, msg);
}

static void rd(void* p, size_t n, FILE* f) {
  if (fread(p, 1, n, f) != n) { fprintf(stderr, "short read\n"); exit(3); }
}

/* usage: runner IN OUT NUM_TASKS
   IN: int32 nargs; per argument: int32 code, int32 bits, int32 ndim, int64 shape[ndim], raw data.
   OUT: the raw data of the last argument (the output) after the call. */
int main(int argc, char** argv) {
  if (argc < 3) { fprintf(stderr, "usage: %s IN OUT [NUM_TASKS]\n", argv[0]); return 2; }
  if (argc > 3) g_num_tasks = atoi(argv[3]);
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = (void*)parallel_launch;
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = (void*)alloc_workspace;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = (void*)free_workspace;
  FILE* f = fopen(argv[1], "rb");
  if (!f) { perror(argv[1]); return 2; }
  int32_t nargs;
  rd(&nargs, 4, f);
  DLTensor* ts = (DLTensor*)calloc((size_t)nargs, sizeof(DLTensor));
  TVMFFIAny* args = (TVMFFIAny*)calloc((size_t)nargs, sizeof(TVMFFIAny));
  size_t* nbytes = (size_t*)calloc((size_t)nargs, sizeof(size_t));
  for (int i = 0; i < nargs; ++i) {
    int32_t hdr[3];
    rd(hdr, 12, f);
    int64_t* shape = (int64_t*)calloc((size_t)(hdr[2] > 0 ? hdr[2] : 1), sizeof(int64_t));
    rd(shape, sizeof(int64_t) * (size_t)hdr[2], f);
    size_t count = 1;
    for (int d = 0; d < hdr[2]; ++d) count *= (size_t)shape[d];
    nbytes[i] = count * (size_t)(hdr[1] / 8);
    void* data = aligned_alloc(64, (nbytes[i] + 63) / 64 * 64 + 64);
    memset(data, 0xA5, (nbytes[i] + 63) / 64 * 64 + 64); /* garbage, so unwritten outputs show */
    rd(data, nbytes[i], f);
    ts[i].data = data;
    ts[i].device.device_type = kDLCPU;
    ts[i].device.device_id = 0;
    ts[i].ndim = hdr[2];
    ts[i].dtype.code = (uint8_t)hdr[0];
    ts[i].dtype.bits = (uint8_t)hdr[1];
    ts[i].dtype.lanes = 1;
    ts[i].shape = shape;
    ts[i].strides = NULL;
    ts[i].byte_offset = 0;
    memset(&args[i], 0, sizeof(TVMFFIAny));
    args[i].type_index = kTVMFFIDLTensorPtr;
    args[i].v_ptr = &ts[i];
  }
  fclose(f);
  TVMFFIAny ret;
  memset(&ret, 0, sizeof(ret));
  ret.type_index = kTVMFFINone;
  int rc = __tvm_ffi_bnnc_kernel(NULL, args, nargs, &ret);
  if (rc != 0) { fprintf(stderr, "kernel returned %d\n", rc); return 1; }
  FILE* g = fopen(argv[2], "wb");
  if (!g) { perror(argv[2]); return 2; }
  fwrite(ts[nargs - 1].data, 1, nbytes[nargs - 1], g);
  fclose(g);
  return 0;
}
"""


def _write_args(path: Path, arrays) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(arrays)))
        for a in arrays:
            dt = a.dtype
            f.write(struct.pack("<iii", _DTYPE_CODE[dt.kind], dt.itemsize * 8, a.ndim))
            f.write(struct.pack(f"<{a.ndim}q", *a.shape))
            f.write(np.ascontiguousarray(a).astype(dt.newbyteorder("<"), copy=False).tobytes())


class QemuKernel:
    """An ARM-scheduled kernel cross-compiled for AArch64, callable on NumPy arrays through qemu-user.

    ``QemuKernel(func)(*inputs) -> output`` like :class:`~bnnc.runtimes.tvm.kernels.Kernel`.
    ``num_tasks``: how many tasks each parallel loop is split into (run one after another), so the
    per-task partitioning of the parallel loops is exercised too.
    """

    def __init__(self, func, target=None, workdir: str | None = None, num_tasks: int = 3,
                 timeout: float = 120.0):
        miss = missing_aarch64_tools()
        if miss:
            raise RuntimeError(f"missing AArch64 tools: {', '.join(miss)} "
                               "(apt-get install gcc-aarch64-linux-gnu qemu-user-static)")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="bnnc_a64_")
        self.dir = Path(workdir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out_shape, self.out_dtype = K.output_spec(func)
        self.num_tasks, self.timeout = int(num_tasks), float(timeout)
        obj = self.dir / "kernel.o"
        self.executable = aarch64_compile(func, target)
        self.executable.mod.write_to_file(str(obj))
        src = self.dir / "harness.c"
        src.write_text(_HARNESS)
        self.binary = self.dir / "runner"
        cmd = [AARCH64_CC, "-O1", "-static", "-I", _ffi_include(), str(src), str(obj), "-o", str(self.binary),
               "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the AArch64 runner failed ({' '.join(cmd)}):\n{r.stderr}")

    def __call__(self, *arrays) -> np.ndarray:
        ins = [np.ascontiguousarray(a) for a in arrays]
        out = np.zeros(self.out_shape, self.out_dtype)
        inp, res = self.dir / "in.bin", self.dir / "out.bin"
        _write_args(inp, ins + [out])
        r = subprocess.run([QEMU, str(self.binary), str(inp), str(res), str(self.num_tasks)],
                           capture_output=True, text=True, timeout=self.timeout)
        if r.returncode != 0:
            raise RuntimeError(f"AArch64 kernel failed under {QEMU} (rc={r.returncode}):\n{r.stderr}")
        return np.frombuffer(res.read_bytes(), dtype=np.dtype(self.out_dtype).newbyteorder("<")) \
            .astype(self.out_dtype).reshape(self.out_shape)
