"""``bnnc.compile`` / ``bnnc.load``: turn an ONNX model into a runnable, saveable ``CompiledModel``.

Runtimes:
* ``reference`` — the export form on stock ONNX Runtime (the ``ai.bnnc`` function bodies): the truth.
* ``numpy`` — the deploy form on the NumPy reference executor (slow; for checking passes).
* ``tvm`` — the deploy form compiled by TVM with bit-packed XNOR-popcount kernels.
* ``ort`` — the deploy form on ONNX Runtime with bnnc's custom-op library (bit-packed kernels).
* ``ort-portable`` — the deploy form rewritten into standard ONNX ops only, for any ONNX Runtime.

An artifact (``model.bnnc``) is a folder: ``manifest.json`` (format, bnnc version, runtime, target,
input/output specs, SHA-256 of the source model and of every file) plus the files the runtime needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .errors import BnncError, ModelFormatError
from .util import atomic_path

ARTIFACT_FORMAT = "bnnc-artifact-1"
RUNTIMES = ("tvm", "reference", "numpy", "ort", "ort-portable")
TARGETS = ("cpu", "arm", "cuda")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_onnx(source) -> tuple[onnx.ModelProto, bytes]:
    """Load an ONNX model from a path or ``ModelProto``, with a clear error for anything else."""
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception:
        model = None
    if model is None or not model.graph.node:
        raise ModelFormatError(f"{path} is not an ONNX model (cannot parse it as onnx.ModelProto)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelFormatError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    return model, data


def _io_spec(model: onnx.ModelProto) -> dict:
    def spec(v):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            v.type.tensor_type.elem_type).name}

    inits = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise BnncError(f"bnnc models take exactly one input; this graph has {len(inputs)}")
    return {"inputs": inputs, "outputs": [spec(v) for v in model.graph.output]}


class CompiledModel:
    """A model ready to run on one runtime. ``run(x)``: float32 NCHW numpy in, first output out."""

    def __init__(self, runtime: str, target: str, model: onnx.ModelProto, manifest: dict, executor):
        self.runtime = runtime
        self.target = target
        self.model = model
        self.manifest = manifest
        self._executor = executor

    @property
    def input_spec(self) -> dict:
        return self.manifest["io"]["inputs"][0]

    def run(self, x) -> np.ndarray:
        if self.runtime == "tvm" and not getattr(self._executor, "runnable", True):
            raise BnncError(f"this artifact is built for target {self.target!r} and cannot run on this machine; "
                            "copy it to such a device (see the README) or compile for target 'cpu'")
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        expect = self.input_spec["shape"]
        if x.ndim != len(expect) or any(e is not None and e != s for e, s in zip(expect[1:], x.shape[1:])):
            raise ValueError(f"input shape {list(x.shape)} does not match the model's {expect} (batch first)")
        return self._executor.run(x)

    __call__ = run

    def save(self, path) -> Path:
        """Write the artifact folder atomically (a temp folder renamed into place)."""
        path = Path(path)
        with atomic_path(path, is_dir=True) as tmp:
            files = {"model.onnx": self.model.SerializeToString()}
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            if self.runtime == "tvm":
                self._executor.export_library(str(tmp / "lib.so"))
            manifest = dict(self.manifest)
            manifest["files"] = {p.name: _sha256(p.read_bytes()) for p in sorted(tmp.iterdir())}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return path

    def __repr__(self):
        return f"CompiledModel(runtime={self.runtime!r}, target={self.target!r})"


def _executor(runtime: str, model: onnx.ModelProto, target: str, batch_size: int, num_threads, lib_path=None,
              tvm_meta=None, rpc=None):
    if runtime == "reference":
        from bnnc.runtimes.reference import OrtReferenceRunner

        return OrtReferenceRunner(model, num_threads=num_threads)
    if runtime == "numpy":
        from bnnc.runtimes.numpy_ref import NumpyDeployRunner

        return NumpyDeployRunner(model)
    if runtime == "tvm":
        from bnnc.runtimes import tvm as tvm_rt

        if rpc is not None:
            from bnnc.runtimes.tvm.rpc import RemoteTVMModel

            return RemoteTVMModel(lib_path, tvm_meta, rpc, num_threads=num_threads)
        num_threads = num_threads or len(os.sched_getaffinity(0))
        if lib_path is not None:
            return tvm_rt.TVMModel.load(lib_path, tvm_meta, num_threads=num_threads)
        return tvm_rt.compile_model(model, target=target, batch_size=batch_size, num_threads=num_threads)
    if runtime in ("ort", "ort-portable"):
        from bnnc.runtimes.ort import OrtDeployRunner, OrtLibraryError

        try:
            return OrtDeployRunner(model, num_threads=num_threads,
                                   mode="library" if runtime == "ort" else "portable")
        except OrtLibraryError as e:
            raise BnncError(f"ONNX Runtime custom-op library: {e}") from None
    raise BnncError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def compile(model, target: str = "cpu", runtime: str = "tvm", *, batch_size: int = 1,
            num_threads: int | None = None) -> CompiledModel:
    """Compile an ONNX model (path or ``ModelProto``) for ``runtime`` on ``target``.

    ``reference`` runs the export form as given; ``tvm`` and ``numpy`` first run the deploy passes.
    ``batch_size``: the batch the model is meant for; any batch runs. On CPUs a batch above 8 runs in calls of
    up to 8 images (fewer for large inputs, :func:`bnnc.util.cpu_call_batch`), which keeps each call's
    activations in cache.
    """
    from bnnc.passes.pipeline import check_bnnc_ops, form_of, to_deploy

    if runtime not in RUNTIMES:
        raise BnncError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if target.split(":")[0] not in TARGETS:
        raise BnncError(f"unknown target {target!r}; choose one of cpu, arm (AArch64 NEON), cuda or cuda:sm_XX")
    if target != "cpu" and runtime != "tvm":
        raise BnncError(f"target {target!r} needs runtime 'tvm'; runtime {runtime!r} runs on this CPU only")
    proto, data = read_onnx(model)
    check_bnnc_ops(proto)
    form = form_of(proto)
    if runtime == "reference":
        if form == "deploy":
            raise BnncError("the reference runtime runs the export form (ONNX Runtime with the ai.bnnc function "
                            "bodies); this model is already in the deploy form: use runtime 'numpy' or 'tvm'")
        run_model = proto
    else:
        run_model = to_deploy(proto)
        if runtime == "ort-portable":
            from bnnc.runtimes.ort import to_portable

            run_model = to_portable(run_model)  # the artifact's model.onnx runs on any ONNX Runtime
    executor = _executor(runtime, run_model, target, batch_size, num_threads)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "bnnc_version": __version__,
        "runtime": runtime,
        "target": target,
        "form": form_of(run_model),
        "source_sha256": _sha256(data),
        "io": _io_spec(run_model),
        "batch_size": batch_size,
    }
    if runtime == "tvm":
        manifest["tvm"] = executor.meta()
    return CompiledModel(runtime, target, run_model, manifest, executor)


def load(path, num_threads: int | None = None, rpc: str | None = None) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save``, refusing corrupted or mismatched ones.

    ``rpc="HOST:PORT"``: run a TVM artifact on the device serving TVM's RPC there (``python -m
    tvm.exec.rpc_server``): its library is uploaded and run on the device, inputs and outputs travel over the
    connection. The artifact's target must match the device (checked before uploading)."""
    path = Path(path)
    if rpc is not None:
        from bnnc.runtimes.tvm.rpc import parse_address

        parse_address(rpc)  # a bad HOST:PORT fails before anything is read
    if not path.exists():
        raise FileNotFoundError(f"artifact {path} does not exist")
    mpath = path / "manifest.json"
    if not path.is_dir() or not mpath.is_file():
        raise ModelFormatError(f"{path} is not a bnnc artifact (no manifest.json); create one with `bnnc compile`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{mpath}: corrupted manifest ({e})") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ModelFormatError(f"{path}: artifact format {manifest.get('format')!r} is not {ARTIFACT_FORMAT!r}")
    if manifest.get("bnnc_version") != __version__:
        raise ModelFormatError(f"{path}: built by bnnc {manifest.get('bnnc_version')}, this is {__version__}; "
                               "recompile it with `bnnc compile`")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ModelFormatError(f"{path}: file {name} listed in the manifest is missing")
        if _sha256(f.read_bytes()) != digest:
            raise ModelFormatError(f"{path}: file {name} is corrupted (SHA-256 mismatch)")
    runtime = manifest["runtime"]
    family = (manifest.get("tvm") or {}).get("target_family", "x86")
    if rpc is not None and runtime != "tvm":
        raise BnncError(f"{path}: --rpc runs TVM artifacts on a device; this one is for runtime {runtime!r} "
                        "(compile with `bnnc compile --runtime tvm --target arm|cpu`)")
    if rpc is not None:
        model = onnx.load(str(path / "model.onnx"))
        executor = _executor(runtime, model, manifest["target"], manifest.get("batch_size", 1), num_threads,
                             lib_path=str(path / "lib.so"), tvm_meta=manifest.get("tvm"), rpc=rpc)
        return CompiledModel(runtime, manifest["target"], model, manifest, executor)
    if runtime == "tvm":
        from bnnc.runtimes.tvm.graph import runnable_here

        ok, why = runnable_here(family)
        if not ok:
            raise BnncError(f"{path}: built for target {manifest['target']!r}; it cannot run here: {why}")
    if runtime == "tvm" and family == "x86":
        from bnnc.runtimes.tvm import cpu_target

        built, here = (manifest.get("tvm") or {}).get("target", {}).get("mcpu"), cpu_target()["mcpu"]
        if built != here:
            raise ModelFormatError(f"{path}: compiled for CPU {built!r}, but this machine is {here!r}; "
                                   "recompile it here with `bnnc compile`")
    model = onnx.load(str(path / "model.onnx"))
    lib = str(path / "lib.so") if runtime == "tvm" else None
    executor = _executor(runtime, model, manifest["target"], manifest.get("batch_size", 1), num_threads,
                         lib_path=lib, tvm_meta=manifest.get("tvm"))
    return CompiledModel(runtime, manifest["target"], model, manifest, executor)


def file_size(path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return os.path.getsize(path)
