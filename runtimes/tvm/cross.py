"""AArch64 cross-compilation of the deploy kernels, and running them under ``qemu-aarch64``.

TVM's LLVM backend emits, for each PrimFunc, a function with the TVM-FFI "safe call" ABI
(``int __tvm_ffi_<name>(void*, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret)``) whose only outside
dependencies are ``TVMFFIErrorSetRaisedFromCStrParts`` and three weak function-pointer slots
(``__TVMBackendParallelLaunch``, ``__TVMBackendAllocWorkspace``, ``__TVMBackendFreeWorkspace``) that
the TVM runtime fills when it loads a library. :class:`QemuKernel` links the kernel's AArch64 object file
with a small C harness that provides those (a serial parallel-launch that runs every task in turn,
``aligned_alloc`` workspaces), statically, with ``aarch64-linux-gnu-gcc``; it then runs the binary under
``qemu-aarch64-static`` on arrays passed through files. No TVM runtime is needed on the AArch64 side.

Whole networks: :class:`QemuRPCServer` runs a small TVM RPC server, cross-compiled with
``aarch64-linux-gnu-g++`` against the AArch64 TVM runtime (``libtvm_runtime.so`` + ``libtvm_ffi.so`` from the
official ``apache-tvm`` / ``apache-tvm-ffi`` aarch64 wheels, fetched once with ``pip download`` into
``~/.cache/bnnc/tvm-aarch64``, or taken from ``BNNC_AARCH64_TVM_RUNTIME``), under ``qemu-aarch64``. A
``--target arm`` artifact then runs as a whole (the artifact's own ``lib.so`` in the real Relax VM) through
``bnnc.load(artifact, rpc=server.address)``, exactly as on an AArch64 board.

Tools (Debian/Ubuntu): ``apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user-static``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import tvm

from . import kernels as K
from .target import arm_target

__all__ = [
    "AARCH64_CC",
    "AARCH64_CXX",
    "QEMU",
    "QemuKernel",
    "QemuRPCServer",
    "aarch64_assembly",
    "aarch64_compile",
    "aarch64_object",
    "aarch64_rpc_server",
    "aarch64_tvm_runtime",
    "cross_fcompile",
    "export_aarch64_library",
    "missing_aarch64_tools",
]

AARCH64_CC = os.environ.get("BNNC_AARCH64_CC", "aarch64-linux-gnu-gcc")
AARCH64_CXX = os.environ.get("BNNC_AARCH64_CXX", "aarch64-linux-gnu-g++")
AARCH64_SYSROOT = os.environ.get("BNNC_AARCH64_SYSROOT", "/usr/aarch64-linux-gnu")
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


# --------------------------------------------------------------------------------------------------
# Whole networks: the AArch64 TVM runtime and an RPC server for it, run under qemu-user

_RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
# wheel → the member holding each library
_WHEEL_MEMBERS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}
AARCH64_WHEEL_PLATFORM = "manylinux_2_28_aarch64"


class AArch64RuntimeError(RuntimeError):
    """The AArch64 TVM runtime is not available (and could not be fetched or built)."""


def cache_dir() -> Path:
    """``$BNNC_CACHE_DIR`` or ``~/.cache/bnnc``."""
    env = os.environ.get("BNNC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bnnc"


def _versions() -> dict:
    return {name: metadata.version(name) for name in _WHEEL_MEMBERS}


def aarch64_tvm_runtime(fetch: bool = True, log=print) -> Path:
    """Folder holding the AArch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so`` of this host's TVM version.

    ``BNNC_AARCH64_TVM_RUNTIME`` names such a folder (e.g. a TVM runtime built for the board). Otherwise they
    come from the official aarch64 wheels of the installed ``apache-tvm`` and ``apache-tvm-ffi`` versions,
    fetched once with ``pip download`` (no install) into :func:`cache_dir`; ``fetch=False`` only looks."""
    env = os.environ.get("BNNC_AARCH64_TVM_RUNTIME")
    if env:
        d = Path(env)
        miss = [n for n in _RUNTIME_LIBS if not (d / n).is_file()]
        if miss:
            raise AArch64RuntimeError(f"BNNC_AARCH64_TVM_RUNTIME={env} lacks {', '.join(miss)}")
        return d
    v = _versions()
    d = cache_dir() / "tvm-aarch64" / f"tvm{v['apache-tvm']}-ffi{v['apache-tvm-ffi']}"
    if all((d / n).is_file() for n in _RUNTIME_LIBS):
        return d
    if not fetch:
        raise AArch64RuntimeError(f"the AArch64 TVM runtime is not in {d}")
    from bnnc.util import atomic_path

    pins = [f"{name}=={ver}" for name, ver in v.items()]
    log(f"fetching the AArch64 TVM runtime: pip download {' '.join(pins)} ({AARCH64_WHEEL_PLATFORM})")
    with tempfile.TemporaryDirectory(prefix="bnnc-a64-wheels-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
               AARCH64_WHEEL_PLATFORM, "--python-version", f"{sys.version_info[0]}{sys.version_info[1]}",
               "-d", tmp, "--quiet", *pins]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise AArch64RuntimeError(f"`pip download` of the aarch64 TVM wheels failed (rc={r.returncode}): "
                                      f"{(r.stderr or r.stdout).strip()[-400:]}; set BNNC_AARCH64_TVM_RUNTIME to "
                                      "a folder with an AArch64 libtvm_runtime.so and libtvm_ffi.so instead")
        with atomic_path(d, is_dir=True) as out:
            for name, member in _WHEEL_MEMBERS.items():
                prefix = name.replace("-", "_") + "-"
                wheels = [w for w in Path(tmp).glob("*.whl") if w.name.startswith(prefix)]
                if not wheels:
                    raise AArch64RuntimeError(f"pip download produced no {name} wheel")
                with zipfile.ZipFile(wheels[0]) as z:
                    (out / Path(member).name).write_bytes(z.read(member))
            for n in _RUNTIME_LIBS:
                if _elf_machine(out / n) != 183:
                    raise AArch64RuntimeError(f"{n} from the {AARCH64_WHEEL_PLATFORM} wheel is not an AArch64 ELF")
    return d


def _elf_machine(path) -> int:
    head = Path(path).read_bytes()[:20]
    return int.from_bytes(head[18:20], "little") if head[:4] == b"\x7fELF" else -1


_RPC_SERVER = r"""
// bnnc's TVM RPC server: the TVM runtime's own RPC endpoint (rpc.ServerLoop) behind the handshake of
// python -m tvm.exec.rpc_server, each session in a forked child, with the file hooks the client uses.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

namespace ffi = tvm::ffi;
static const int32_t kRPCMagic = 0xff271;  // tvm.rpc.base.RPC_MAGIC (= RPC_CODE_SUCCESS)

static bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t r = recv(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

static bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t r = send(fd, p, n, 0);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s HOST PORT WORKDIR   (PORT 0: any free port; prints 'listening PORT')\n", argv[0]);
    return 2;
  }
  const std::string host = argv[1], workdir = argv[3];
  const int port = atoi(argv[2]);
  ffi::Function::SetGlobal("tvm.rpc.server.workpath", ffi::Function::FromTyped(
      [workdir](ffi::String name) -> ffi::String { return ffi::String(workdir + "/" + std::string(name)); }), true);
  ffi::Function::SetGlobal("tvm.rpc.server.load_module", ffi::Function::FromTyped(
      [workdir](ffi::String name) -> ffi::Module {
        return ffi::Module::LoadFromFile(ffi::String(workdir + "/" + std::string(name)));
      }), true);
  ffi::Function::SetGlobal("bnnc.rpc.machine", ffi::Function::FromTyped([]() -> ffi::String {
    struct utsname u;
    return ffi::String(uname(&u) == 0 ? std::string(u.machine) : std::string());
  }), true);
  ffi::Function server_loop = ffi::Function::GetGlobalRequired("rpc.ServerLoop");

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr;
  memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    fprintf(stderr, "bad IPv4 host %s\n", host.c_str());
    return 2;
  }
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) { perror("bind"); return 2; }
  if (listen(lfd, 4) != 0) { perror("listen"); return 2; }
  socklen_t alen = sizeof(addr);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &alen);
  printf("listening %d\n", ntohs(addr.sin_port));
  fflush(stdout);
  signal(SIGCHLD, SIG_IGN);  // sessions are forked children; no zombies
  for (;;) {
    int fd = accept(lfd, nullptr, nullptr);
    if (fd < 0) continue;
    int32_t magic = 0, keylen = 0;
    if (!RecvAll(fd, &magic, 4) || magic != kRPCMagic || !RecvAll(fd, &keylen, 4) || keylen < 0 ||
        keylen > 4096) {
      close(fd);
      continue;
    }
    std::string key(static_cast<size_t>(keylen), '\0');
    if (keylen > 0 && !RecvAll(fd, &key[0], key.size())) { close(fd); continue; }
    if (key.compare(0, 7, "client:") != 0) {
      int32_t mismatch = kRPCMagic + 2;  // RPC_CODE_MISMATCH
      SendAll(fd, &mismatch, 4);
      close(fd);
      continue;
    }
    const std::string server_key = "server:";
    int32_t code = kRPCMagic, slen = static_cast<int32_t>(server_key.size());
    if (!SendAll(fd, &code, 4) || !SendAll(fd, &slen, 4) || !SendAll(fd, server_key.data(), server_key.size())) {
      close(fd);
      continue;
    }
    pid_t pid = fork();
    if (pid == 0) {
      close(lfd);
      int rc = 0;
      try {
        server_loop(fd);
      } catch (const std::exception& e) {
        fprintf(stderr, "session ended: %s\n", e.what());
        rc = 1;
      }
      close(fd);
      _exit(rc);
    }
    if (pid < 0) perror("fork");
    close(fd);
  }
}
"""


def aarch64_rpc_server(runtime_dir=None, log=print) -> Path:
    """The AArch64 RPC server binary, built once (per source and runtime) with ``aarch64-linux-gnu-g++``
    against :func:`aarch64_tvm_runtime`, with that folder as its library path."""
    if not shutil.which(AARCH64_CXX):
        raise AArch64RuntimeError(f"{AARCH64_CXX} is missing (apt-get install g++-aarch64-linux-gnu)")
    rt = Path(runtime_dir) if runtime_dir else aarch64_tvm_runtime(log=log)
    key = hashlib.sha256(_RPC_SERVER.encode() + str(rt.resolve()).encode()).hexdigest()[:12]
    exe = cache_dir() / "tvm-aarch64" / f"bnnc_rpc_server-{key}"
    if exe.is_file():
        return exe
    from bnnc.util import atomic_path

    inc = _ffi_include()
    with tempfile.TemporaryDirectory(prefix="bnnc-a64-srv-") as tmp:
        src = Path(tmp) / "bnnc_rpc_server.cc"
        src.write_text(_RPC_SERVER)
        with atomic_path(exe) as out:
            cmd = [AARCH64_CXX, "-std=c++17", "-O1", "-I", inc, "-I", str(Path(inc) / "dlpack"), str(src),
                   "-o", str(out), "-L", str(rt), "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
                   f"-Wl,-rpath,{rt.resolve()}"]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise AArch64RuntimeError(f"building the AArch64 RPC server failed ({' '.join(cmd)}):\n"
                                          f"{r.stderr.strip()[-2000:]}")
            out.chmod(0o755)
    return exe


class QemuRPCServer:
    """bnnc's AArch64 TVM RPC server running under ``qemu-aarch64`` on loopback: an emulated AArch64 device.

    ``with QemuRPCServer() as dev: bnnc.load("model_arm.bnnc", rpc=dev.address).run(x)``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, num_threads: int = 1, start_timeout: float = 60.0,
                 log=print):
        miss = missing_aarch64_tools()
        if miss:
            raise AArch64RuntimeError(f"missing AArch64 tools: {', '.join(miss)} "
                                      "(apt-get install g++-aarch64-linux-gnu qemu-user-static)")
        self.binary = aarch64_rpc_server(log=log)
        self._tmp = tempfile.TemporaryDirectory(prefix="bnnc-a64-rpc-")
        env = dict(os.environ, TVM_NUM_THREADS=str(int(num_threads)))
        cmd = [QEMU, "-L", AARCH64_SYSROOT, str(self.binary), host, str(int(port)), self._tmp.name]
        self.log_path = Path(self._tmp.name) / "server.log"  # a file, so a chatty server never blocks on a pipe
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, env=env,
                                         start_new_session=True)  # a group: its session children end with it
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=start_timeout)
        sel.close()
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            err = self.log_path.read_text(errors="replace")
            self.close()
            raise AArch64RuntimeError(f"the AArch64 RPC server did not start under {QEMU} "
                                      f"(rc={self.proc.returncode}): {err.strip()[-1000:]}")
        self.host, self.port = host, int(line.split()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its forked sessions
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
