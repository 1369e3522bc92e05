"""Run a compiled TVM artifact on a remote device through TVM's RPC.

The device runs a TVM RPC server (``pip install "apache-tvm[rpc]"`` and
``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090``, or any program that serves TVM's RPC
protocol with the TVM runtime, such as the AArch64 server of :mod:`.cross` under qemu). The client uploads
the artifact's ``lib.so``, loads it on the device, builds the Relax VM there and sends each batch over; the
outputs come back as NumPy arrays.

Before uploading, the device's architecture is checked against the artifact's target: the device is asked
for its LLVM triple (``target.llvm_get_system_triple``, present where the full TVM package is installed)
or, for bnnc's runtime-only server, for ``uname -m`` (``bnnc.rpc.machine``). An x86-64 artifact is also
checked for the instruction-set extensions its ``mcpu`` lets LLVM use (AVX-512, AVX2, POPCNT…): a device
whose CPU lacks one is refused instead of crashing on an illegal instruction.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from bnnc.errors import BnncError

from .graph import TVMModel, _meta_family, _quiet_scope_logs

__all__ = [
    "RPCConnectionError",
    "RemoteTVMModel",
    "RemoteTargetError",
    "check_remote_target",
    "connect",
    "parse_address",
    "remote_machine",
]

# x86-64 ISA extensions that LLVM's code for bnnc's kernels may use; an artifact compiled for an mcpu that
# has one of these only runs on a device that has it too (tuning-only features are ignored).
X86_ISA_FEATURES = ("sse4.2", "popcnt", "avx", "avx2", "fma", "bmi2", "f16c", "avx512f", "avx512bw", "avx512vl",
                    "avx512dq", "avx512cd", "avx512vpopcntdq", "avx512bitalg", "avx512vbmi", "avx512vbmi2",
                    "avx512vnni")

_ARCH_FAMILY = {"x86_64": "x86", "amd64": "x86", "i686": "x86", "i386": "x86", "aarch64": "arm", "arm64": "arm"}


class RPCConnectionError(BnncError):
    """The RPC server cannot be reached or does not speak TVM's RPC protocol."""


class RemoteTargetError(BnncError):
    """The artifact was compiled for a different device than the remote one."""


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:9090"`` for IPv6) → ``(host, port)``; ValueError naming the problem."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"RPC address must be HOST:PORT, got {address!r}")
    s = address.strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", s) or re.fullmatch(r"([^:\s]+):(\d+)", s)
    if m is None:
        raise ValueError(f"RPC address must be HOST:PORT (e.g. 192.168.1.20:9090), got {address!r}")
    host, port = m.group(1), int(m.group(2))
    if not 0 < port < 65536:
        raise ValueError(f"RPC port must be in 1..65535, got {port} in {address!r}")
    return host, port


def connect(address: str, timeout: float = 10.0, handshake_timeout: float = 30.0):
    """Open an RPC session with the server at ``HOST:PORT`` (a ``tvm.rpc.RPCSession``).

    The TCP connection is tried first with ``timeout`` seconds, so an unreachable host or closed port gives
    a clear :class:`RPCConnectionError` at once instead of TVM's retry loop."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as e:
        raise RPCConnectionError(f"RPC server {address}: cannot resolve host {host!r} ({e.strerror})") from None
    except TimeoutError:
        raise RPCConnectionError(f"RPC server {address} is unreachable (no answer in {timeout:g} s); start "
                                 "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT` on the device") from None
    except OSError as e:
        raise RPCConnectionError(f"RPC server {address} is unreachable ({e.strerror or e}); start "
                                 "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port PORT` on the device") from None
    import threading

    from tvm import rpc

    result: dict = {}

    def _handshake():
        try:
            result["session"] = rpc.connect(host, port, session_timeout=0)
        except Exception as e:  # not a TVM RPC server, key mismatch…
            result["error"] = e

    # TVM's Connect blocks without a deadline; python -m tvm.exec.rpc_server serves one client at a time, so a
    # busy server would hang us. The thread finishes (and its session is dropped) once the server answers.
    t = threading.Thread(target=_handshake, name="bnnc-rpc-connect", daemon=True)
    t.start()
    t.join(handshake_timeout)
    if t.is_alive():
        raise RPCConnectionError(f"{address} accepted the connection but did not answer TVM's RPC handshake in "
                                 f"{handshake_timeout:g} s: the server is busy with another session (TVM's RPC "
                                 "server serves one client at a time) or it is not a TVM RPC server")
    if "error" in result:
        e = result["error"]
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RPCConnectionError(f"{address} did not accept a TVM RPC session: {first}")
    return result["session"]


def _remote_func(remote, name):
    try:
        return remote.get_function(name)
    except Exception:
        return None


def remote_machine(remote) -> dict:
    """What the device says about itself: ``{"arch": "x86_64" | "aarch64" | … | None, "family": "x86" |
    "arm" | None, "cpu": LLVM CPU name or None, "triple": LLVM triple or None}``."""
    info = {"arch": None, "family": None, "cpu": None, "triple": None}
    f = _remote_func(remote, "target.llvm_get_system_triple")
    if f is not None:
        info["triple"] = str(f())
        info["arch"] = info["triple"].split("-", 1)[0]
        g = _remote_func(remote, "target.llvm_get_system_cpu")
        info["cpu"] = str(g()) if g is not None else None
    else:
        f = _remote_func(remote, "bnnc.rpc.machine")
        if f is not None:
            info["arch"] = str(f())
    if info["arch"]:
        info["family"] = _ARCH_FAMILY.get(info["arch"].lower(), info["arch"].lower())
    return info


def _x86_isa(mcpu: str) -> set:
    import tvm
    from tvm.target import codegen

    feats = {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))}
    return feats & set(X86_ISA_FEATURES)


def check_remote_target(meta: dict, machine: dict, what: str = "the artifact") -> None:
    """Refuse (:class:`RemoteTargetError`) an artifact whose target the remote device cannot run.

    ``meta``: the artifact's TVM metadata (``manifest["tvm"]``); ``machine``: :func:`remote_machine`.
    A device that reports nothing about itself is not checked (its loader will refuse foreign code)."""
    family = _meta_family(meta)
    if family == "cuda":
        return  # checked by the remote device's own CUDA runtime (remote.cuda(0).exist)
    remote = machine.get("family")
    if remote is None:
        return
    names = {"x86": "x86-64", "arm": "AArch64"}
    if remote != family:
        raise RemoteTargetError(f"{what} is compiled for {names.get(family, family)} (target "
                                f"{'arm' if family == 'arm' else 'cpu'}), but the remote device is "
                                f"{machine.get('arch')}; compile it for the device with "
                                + ("`bnnc compile --target arm`" if remote == "arm" else
                                   "`bnnc compile --target cpu` on an x86-64 machine like the device"))
    built = ((meta.get("target") or {}) if isinstance(meta.get("target"), dict) else {}).get("mcpu")
    if family == "x86" and built and machine.get("cpu"):
        if _same_cpu_as_here(built, machine["cpu"]):
            return
        try:
            missing = sorted(_x86_isa(built) - _x86_isa(machine["cpu"]))
        except Exception:  # pragma: no cover - LLVM does not know one of the names
            missing = []
        if missing:
            raise RemoteTargetError(f"{what} is compiled for CPU {built!r}, which uses {', '.join(missing)}; the "
                                    f"remote CPU ({machine['cpu']!r}) lacks them: compile it on the device, or "
                                    "for a CPU the device has")


def _same_cpu_as_here(built: str, remote_cpu: str) -> bool:
    """The device reports this host's CPU, and the artifact was compiled for this host (as ``bnnc.load``
    requires locally): LLVM's CPU name may undersell a virtual CPU, the /proc/cpuinfo flags do not."""
    try:
        from tvm.target import codegen

        from .target import cpu_target

        return str(codegen.llvm_get_system_cpu()) == remote_cpu and cpu_target()["mcpu"] == built
    except Exception:  # pragma: no cover
        return False


class RemoteTVMModel(TVMModel):
    """A compiled TVM library run on a remote device: same ``run``/``meta`` as :class:`TVMModel`."""

    def __init__(self, lib_path, meta: dict, address: str, *, num_threads: int | None = None,
                 timeout: float = 10.0, check_target: bool = True):
        from tvm import relax

        self.address = address
        self.lib_path = str(lib_path)
        self.remote = connect(address, timeout=timeout)
        self.machine = remote_machine(self.remote)
        if check_target:
            check_remote_target(meta, self.machine, what=f"{Path(lib_path).parent.name or lib_path}")
        family = _meta_family(meta)
        if family == "cuda":
            dev = self.remote.cuda(0)
            if not dev.exist:
                raise RemoteTargetError(f"the artifact is compiled for CUDA, but the device at {address} has no "
                                        "CUDA GPU (or its TVM runtime has no CUDA)")
        else:
            dev = self.remote.cpu(0)
        if num_threads:
            f = _remote_func(self.remote, "runtime.config_threadpool")
            if f is not None:
                f(1, int(num_threads))
        remote_name = f"bnnc_{os.getpid()}_{Path(lib_path).stat().st_mtime_ns}.so"
        try:
            self.remote.upload(str(lib_path), target=remote_name)
            with _quiet_scope_logs():
                rlib = self.remote.load_module(remote_name)
        except Exception as e:
            msg = str(e).strip().splitlines()
            raise RemoteTargetError(f"the device at {address} ({self.machine.get('arch') or 'unknown arch'}) could "
                                    f"not load the library built for {family}: {msg[-1] if msg else e}") from None
        self.executable = rlib
        self.info = dict(meta)
        self.family = family
        self.runnable, self._why_not = True, ""
        self.dev = dev
        self._inputs = {}  # the input tensors kept on the device between calls (TVMModel._run_batch)
        self.vm = relax.VirtualMachine(rlib, dev)
        self._main = self.vm["main"]

    def close(self) -> None:
        """End the RPC session (TVM's Python server then accepts the next client)."""
        import gc

        self.vm = self._main = self.executable = self.remote = self.dev = None  # the device holds the session too
        self._inputs = {}
        gc.collect()
        self._why_not = f"the RPC session with {self.address} is closed"

    def run(self, x: np.ndarray) -> np.ndarray:
        if self._main is None:
            raise RPCConnectionError(self._why_not)
        try:
            return super().run(x)
        except (ValueError, BnncError):
            raise
        except Exception as e:  # the session died (device rebooted, server killed…)
            msg = str(e).strip().splitlines()
            raise RPCConnectionError(f"running on the device at {self.address} failed: "
                                     f"{msg[-1] if msg else type(e).__name__}") from None

    __call__ = run

    def export_library(self, path: str, cc: str | None = None) -> str:
        """Copy the library that was uploaded (it is already built for the device)."""
        shutil.copyfile(self.lib_path, str(path))
        return str(path)

    def __repr__(self):
        return f"RemoteTVMModel({self.address!r}, {self.machine.get('arch')})"
