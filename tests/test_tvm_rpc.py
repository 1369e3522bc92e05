"""TVM artifacts run on a device through TVM's RPC (``bnnc.load(..., rpc=)``, ``bnnc eval --rpc``): a loopback
x86-64 server (``python -m tvm.exec.rpc_server``, as the README documents) and an AArch64 device emulated with qemu-user (bnnc's RPC
server on the official aarch64 TVM runtime). Predictions must be identical to local TVM and to the
reference (ONNX Runtime on the export form)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from bnnc.runtimes.tvm import cross
from bnnc.runtimes.tvm import rpc as brpc

import bnnc
from bnnc.cli import main



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """fmnist_bnn with random weights and BatchNorm statistics, exported, compiled for cpu and (when the
    cross compiler is present) arm: (export path, cpu artifact, arm artifact or None, inputs, reference)."""
    root = tmp_path_factory.mktemp("rpc")
    torch.manual_seed(0)
    net = bnnc.models.create("fmnist_bnn")
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    path = bnnc.export(net, root / "model.onnx", input_shape=(1, 1, 28, 28))
    cpu = bnnc.compile(path, target="cpu", batch_size=4).save(root / "cpu.bnnc")
    arm = None
    if not cross.missing_aarch64_tools(need_qemu=False):
        arm = bnnc.compile(path, target="arm", batch_size=4).save(root / "arm.bnnc")
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    ref = bnnc.compile(path, runtime="reference").run(x)
    return path, cpu, arm, x, ref


@pytest.fixture(scope="module")
def py_server(tmp_path_factory):
    """The device side the README documents: ``python -m tvm.exec.rpc_server`` (needs ``apache-tvm[rpc]``, in
    the test extra) on loopback, on a free port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("rpc_server") / "server.log"
    # its own process group: the per-session children it forks end with it
    with open(log, "w") as err:  # the server keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                                 str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once it accepts connections
            if proc.poll() is not None:
                raise RuntimeError(f"tvm.exec.rpc_server exited: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(y, local, ref):
    assert y.shape == ref.shape == (6, 10)
    assert np.array_equal(y, local)  # same library, same bits
    assert np.array_equal(y.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Addresses and errors


@pytest.mark.parametrize("addr,want", [("127.0.0.1:9090", ("127.0.0.1", 9090)), ("board.local:1", ("board.local", 1)),
                                       ("[::1]:9091", ("::1", 9091)), (" pi:65535 ", ("pi", 65535))])
def test_parse_address(addr, want):
    assert brpc.parse_address(addr) == want


@pytest.mark.parametrize("addr", ["", "9090", "host", "host:", "host:port", "host:0", "host:70000", ":9090",
                                  "a:b:9090"])
def test_parse_address_rejects(addr):
    with pytest.raises(ValueError, match="HOST:PORT|port"):
        brpc.parse_address(addr)


def test_unreachable_server_is_a_clear_error(models):
    port = _free_port()  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(brpc.RPCConnectionError, match=f"127.0.0.1:{port} is unreachable"):
        bnnc.load(models[1], rpc=f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="HOST:PORT"):
        bnnc.load(models[1], rpc="localhost")


def test_non_tvm_artifact_and_onnx_input_are_refused(models, tmp_path, capsys):
    path = models[0]
    art = bnnc.compile(path, runtime="numpy").save(tmp_path / "np.bnnc")
    with pytest.raises(bnnc.BnncError, match="TVM artifacts"):
        bnnc.load(art, rpc="127.0.0.1:9")
    assert main(["eval", str(path), "--rpc", "127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--rpc needs a compiled artifact" in err and len(err.splitlines()) == 1
    assert main(["eval", str(models[1]), "--rpc", "nohost"]) == 1
    assert "HOST:PORT" in capsys.readouterr().err


def test_x86_isa_check():
    """An artifact for a CPU with AVX-512 is refused on a device whose CPU has only AVX2 (LLVM's CPU tables)."""
    meta = {"target_family": "x86", "target": {"kind": "llvm", "mcpu": "skylake-avx512"}}
    with pytest.raises(brpc.RemoteTargetError, match="avx512"):
        brpc.check_remote_target(meta, {"family": "x86", "arch": "x86_64", "cpu": "haswell"})
    brpc.check_remote_target(meta, {"family": "x86", "arch": "x86_64", "cpu": "icelake-server"})
    brpc.check_remote_target({"target_family": "x86", "target": {"mcpu": "haswell"}},
                             {"family": "x86", "arch": "x86_64", "cpu": "skylake-avx512"})
    with pytest.raises(brpc.RemoteTargetError, match="AArch64.*x86_64"):
        brpc.check_remote_target({"target_family": "arm"}, {"family": "x86", "arch": "x86_64", "cpu": None})
    brpc.check_remote_target({"target_family": "arm"}, {"family": None, "arch": None})  # unknown: not checked


# --------------------------------------------------------------------------------------------------
# x86-64 device on loopback (TVM's Python RPC server)


def test_rpc_loopback_matches_local_and_reference(models, py_server):
    _, cpu, arm, x, ref = models
    local = bnnc.load(cpu).run(x)
    cm = bnnc.load(cpu, rpc=py_server)
    machine = cm._executor.machine
    assert machine["family"] == "x86" and machine["arch"] == "x86_64"
    y = cm.run(x)
    _check(y, local, ref)
    assert np.array_equal(cm.run(x[:1]), local[:1])  # a short batch is padded remotely like locally
    cm._executor.close()
    with pytest.raises(brpc.RPCConnectionError, match="closed"):
        cm.run(x)
    if arm is not None:  # an AArch64 artifact is refused by an x86-64 device before uploading
        with pytest.raises(brpc.RemoteTargetError, match="compiled for AArch64.*remote device is x86_64"):
            bnnc.load(arm, rpc=py_server)


def test_cli_eval_rpc(models, py_server, tiny_fmnist, capsys):
    _, cpu, _, _, _ = models
    assert main(["eval", str(cpu), "--rpc", py_server, "--data-path", str(tiny_fmnist), "--json",
                 "--compare-to", str(cpu), "--batch-size", "8"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["rpc"] == py_server and r["runtime"] == "tvm" and r["n"] == 32
    assert r["agreement"] == 1.0 and r["top1"] == r["compare_top1"]


# --------------------------------------------------------------------------------------------------
# AArch64 device under qemu-user


def _qemu_server():
    miss = cross.missing_aarch64_tools() + ([cross.AARCH64_CXX] if not __import__("shutil").which(cross.AARCH64_CXX)
                                            else [])
    if miss:
        pytest.skip(f"needs the AArch64 cross toolchain and qemu-user (missing: {', '.join(miss)}; apt-get install "
                    "g++-aarch64-linux-gnu qemu-user-static)")
    try:
        return cross.QemuRPCServer()
    except cross.AArch64RuntimeError as e:
        pytest.skip(f"no AArch64 TVM runtime: {str(e)[:300]}")


def test_arm_artifact_whole_network_under_qemu(models, capsys, tiny_fmnist):
    _, cpu, arm, x, ref = models
    with _qemu_server() as dev:
        local = bnnc.load(cpu).run(x)
        cm = bnnc.load(arm, rpc=dev.address)
        assert cm._executor.machine["arch"] == "aarch64"
        y = cm.run(x)
        _check(y, local, ref)  # AArch64 NEON kernels give the x86 kernels' exact bits
        cm._executor.close()
        with pytest.raises(brpc.RemoteTargetError, match="compiled for x86-64.*remote device is aarch64"):
            bnnc.load(cpu, rpc=dev.address)
        assert main(["eval", str(arm), "--rpc", dev.address, "--data-path", str(tiny_fmnist), "--json",
                     "--compare-to", str(cpu), "--batch-size", "16"]) == 0
        r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert r["n"] == 32 and r["agreement"] == 1.0 and r["top1"] == r["compare_top1"]
