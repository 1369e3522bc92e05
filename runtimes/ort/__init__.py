"""The ONNX Runtime backend: the ``ai.bnnc`` deploy form on stock ONNX Runtime.

Two ways to run a deploy-form model:

* **library** (default): ``libbnnc_ort.so``, a custom-op library with bit-packed kernels (AMX-INT8 on ±1
  bytes, AVX-512 VPOPCNTDQ, AVX2, NEON or portable C++ XOR-popcount, picked at run time; ``BNNC_ORT_ISA``
  forces one), loaded with ``SessionOptions.register_custom_ops_library``. Built from ``src/`` on first use
  (:func:`library_path`; ``python -m bnnc.runtimes.ort.build`` does it ahead of time). Before creating the
  session, :func:`fuse_chains` folds the element-wise ops after each float binary conv (residual Add,
  per-channel Add/Mul, PRelu) and the next PackSign into one library node (bit-identical outputs), and on
  CPUs where the library runs AVX-512 or AMX kernels :func:`fuse_stem` replaces the float stem (a stride-2
  7×7 conv and its max pool) with the library's Winograd kernel (float32 rounding differs, about twice the
  direct conv's error).
* **portable**: :func:`to_portable` rewrites the deploy ops into standard ONNX ops, for ONNX Runtime
  builds (or other engines) that cannot load a library. Same outputs; slower.

Both agree bit for bit with the NumPy references in ``bnnc.ops.deploy`` on the binary ops.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import onnx

from bnnc.util import cpu_call_batch

from .fuse import fuse_chains, fuse_stem
from .portable import PortableError, to_portable

__all__ = [
    "OrtDeployRunner",
    "OrtLibraryError",
    "PortableError",
    "fuse_chains",
    "fuse_stem",
    "library_path",
    "resolve_isa",
    "runs_winograd_stem",
    "to_portable",
]

_LIB_CACHE: str | None = None


class OrtLibraryError(RuntimeError):
    """The custom-op library is missing, cannot be built here, or does not load in this ONNX Runtime."""


def library_path(build: bool = True) -> str:
    """Path of ``libbnnc_ort.so``; built (once, idempotently) if missing or stale.

    ``BNNC_ORT_LIBRARY=/path/libbnnc_ort.so`` uses a prebuilt library as is. Raises
    :class:`OrtLibraryError` when it is missing and cannot be built (no g++, no headers and no npm...).
    """
    global _LIB_CACHE
    env = os.environ.get("BNNC_ORT_LIBRARY")
    if env:
        if not Path(env).is_file():
            raise OrtLibraryError(f"BNNC_ORT_LIBRARY={env}: no such file")
        return env
    if _LIB_CACHE and Path(_LIB_CACHE).is_file():
        return _LIB_CACHE
    from . import build as _build

    if not build:
        p = _build.lib_file()
        if not p.is_file():
            raise OrtLibraryError(f"{p} is not built; run `python -m bnnc.runtimes.ort.build`")
        return str(p)
    try:
        _LIB_CACHE = str(_build.build(log=lambda *_: None))
    except _build.BuildError as e:
        raise OrtLibraryError(f"cannot build the bnnc ONNX Runtime library: {e}; use mode='portable' "
                              "(standard ONNX ops) or set BNNC_ORT_LIBRARY to a prebuilt libbnnc_ort.so") from None
    return _LIB_CACHE


def resolve_isa(request: str | None = None, lib: str | None = None) -> str:
    """The kernel family the library picks for ``request`` (None: ``$BNNC_ORT_ISA``, else the best the CPU
    has): 'amx', 'avx512', 'avx2', 'neon' or 'portable'. Raises ValueError for an unknown/unsupported request."""
    if request is None:
        request = os.environ.get("BNNC_ORT_ISA", "auto")
    handle = ctypes.CDLL(lib or library_path())
    fn = handle.bnnc_ort_resolve_isa
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_char_p]
    out = fn(request.encode()).decode()
    if out.startswith("error: "):
        raise ValueError(out[len("error: "):])
    return out


def runs_winograd_stem(lib: str | None = None) -> bool:
    """Whether the library runs :func:`fuse_stem`'s ``WinogradConvMaxPool`` op here (an AVX-512 kernel: where it
    picks its AVX-512 or AMX kernels), so the deploy runner rewrites the stem."""
    return resolve_isa(lib=lib) in ("amx", "avx512")


_ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm"}


def _check_library_file(path: str) -> None:
    """Refuse files that dlopen would reject or crash on (a truncated ELF can SIGBUS the process)."""
    import platform
    import struct

    p = Path(path)
    if not p.is_file():
        raise OrtLibraryError(f"bnnc ONNX Runtime library {p} does not exist; build it with "
                              "`python -m bnnc.runtimes.ort.build` or use mode='portable'")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        raise OrtLibraryError(f"bnnc ONNX Runtime library {p} is not a 64-bit shared library (corrupt or wrong "
                              "file); rebuild it with `python -m bnnc.runtimes.ort.build --force`")
    end = "<" if head[5] == 1 else ">"
    machine = struct.unpack_from(end + "H", head, 0x12)[0]
    shoff = struct.unpack_from(end + "Q", head, 0x28)[0]
    shentsize, shnum = struct.unpack_from(end + "HH", head, 0x3A)
    if shoff + shentsize * shnum > size:
        raise OrtLibraryError(f"bnnc ONNX Runtime library {p} is truncated ({size} bytes; its header says at "
                              f"least {shoff + shentsize * shnum}); rebuild it with "
                              "`python -m bnnc.runtimes.ort.build --force`")
    host = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    arch = _ELF_MACHINES.get(machine, f"machine {machine}")
    if host in _ELF_MACHINES.values() and arch != host:
        raise OrtLibraryError(f"bnnc ONNX Runtime library {p} is built for {arch}, this machine is {host}")


class OrtDeployRunner:
    """Run a deploy-form (``ai.bnnc``) ONNX model on ONNX Runtime.

    ``mode="library"`` loads ``libbnnc_ort.so`` (``lib`` overrides its path) and raises
    :class:`OrtLibraryError` if it is missing, cannot be built or does not load; ``mode="portable"`` runs
    :func:`to_portable` of the model with no library; ``mode="auto"`` tries the library and falls back to
    portable with a warning. ``mode=None`` reads ``$BNNC_ORT_MODE`` (default ``library``).
    ``num_threads`` sets ORT's intra-op threads (None: ORT's default). ``run(x)`` returns the first output;
    ``self.mode`` is the mode actually used. In library mode the session runs :func:`fuse_chains` of the
    model (element-wise chains after float binary convs folded into the conv; bit-identical outputs) and,
    where the library runs its AVX-512 or AMX kernels, :func:`fuse_stem` (the float stem conv + max pool as
    one Winograd op; outputs equal up to float32 rounding); ``fuse=False`` or ``BNNC_ORT_FUSE=0`` turns both
    off, ``winograd_stem=False`` only the stem (then every output is bit-identical to the unfused graph's);
    ``self.model`` stays the deploy form as given.
    """

    def __init__(self, model: onnx.ModelProto, num_threads: int | None = None, *, mode: str | None = None,
                 lib: str | None = None, fuse: bool | None = None, winograd_stem: bool = True):
        if fuse is None:
            fuse = os.environ.get("BNNC_ORT_FUSE", "1") not in ("0", "false", "no", "off")
        self.fuse = bool(fuse)
        self.winograd_stem = bool(winograd_stem)
        if mode is None:
            mode = os.environ.get("BNNC_ORT_MODE", "library")
        if mode not in ("library", "portable", "auto"):
            raise ValueError(f"mode must be 'library', 'portable' or 'auto', got {mode!r}")
        if mode == "auto":
            try:
                self._init(model, num_threads, "library", lib)
            except OrtLibraryError as e:
                import warnings

                warnings.warn(f"{e}; running the portable (standard ONNX ops) form instead", RuntimeWarning,
                              stacklevel=2)
                self._init(model, num_threads, "portable", None)
        else:
            self._init(model, num_threads, mode, lib)

    def _init(self, model, num_threads, mode, lib):
        import onnxruntime as ort

        self.mode = mode
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if num_threads:
            opts.intra_op_num_threads = int(num_threads)
            opts.inter_op_num_threads = 1
        if mode == "portable":
            self.model = to_portable(model)
            self.library = None
        else:
            self.model = model
            self.library = lib or library_path()
            _check_library_file(self.library)
            try:
                opts.register_custom_ops_library(self.library)
            except Exception as e:  # noqa: BLE001 - ORT raises various types here
                raise OrtLibraryError(f"ONNX Runtime {ort.__version__} cannot load the bnnc library "
                                      f"{self.library}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}; "
                                      "rebuild it (`python -m bnnc.runtimes.ort.build --force`) or use "
                                      "mode='portable'") from None
        run_model, self.fused_nodes, self.fused_stems = self.model, 0, 0
        if mode == "library" and self.fuse:
            run_model, self.fused_nodes = fuse_chains(self.model)
            if self.winograd_stem and runs_winograd_stem(self.library):
                run_model, self.fused_stems = fuse_stem(run_model)
        try:
            self.session = ort.InferenceSession(run_model.SerializeToString(), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ONNX Runtime cannot create a session for this model ({mode} mode): {e}") from None
        self.input_name = self.session.get_inputs()[0].name
        shp = self.session.get_inputs()[0].shape
        self._free_batch = bool(shp) and not isinstance(shp[0], int)  # a symbolic batch: calls may split it

    def run(self, x) -> np.ndarray:
        """The first output for input ``x``; a batch above ``bnnc.util.CPU_CALL_BATCH_MAX`` runs as session
        calls of ``cpu_call_batch`` images (activations stay in cache between layers; IR-Net ResNet-20,
        ONNX Runtime library, batch 128, 1 thread: 29.4 → 28.1 ms)."""
        x = np.asarray(x, np.float32)
        if x.ndim < 2 or not self._free_batch or (c := cpu_call_batch(len(x), x.shape)) >= len(x):
            return self.session.run(None, {self.input_name: x})[0]
        return np.concatenate([self.session.run(None, {self.input_name: x[s:s + c]})[0]
                               for s in range(0, len(x), c)], axis=0)

    def run_feeds(self, feeds: dict) -> list[np.ndarray]:
        """All outputs for an explicit feed dict (any input dtypes), e.g. single-op test graphs."""
        return self.session.run(None, feeds)

    __call__ = run
