"""Build ``libbnnc_ort.so``, the ONNX Runtime custom-op library of the ``ai.bnnc`` deploy ops.

    python -m bnnc.runtimes.ort.build [--force] [--cross aarch64] [--build-dir DIR] [--selftest]

Steps (each skipped when already done):

1. ONNX Runtime C/C++ API headers. The ``onnxruntime`` wheel ships none, so they are taken from the npm
   package ``com.github.asus4.onnxruntime@0.4.9`` (MIT; ``npm pack`` into a temp dir, only the
   ``Headers/`` folder is extracted) into ``<build>/include``. ``BNNC_ORT_INCLUDE=/dir`` uses a folder
   that already holds ``onnxruntime_cxx_api.h`` instead.
2. ``g++ -O3 -fPIC -shared -ffp-contract=off`` of ``src/*.cc`` for baseline x86-64 (AMX-INT8, AVX-512
   and AVX2 kernels carry per-function targets and are chosen at run time) or aarch64 (NEON).
3. The library is written atomically to ``<build>/libbnnc_ort[.<arch>].so`` with a stamp holding the
   hash of the sources, flags and compiler; an unchanged stamp means nothing to do.

``<build>`` is ``runtimes/ort/build`` beside this file when writable (git-ignored), else
``~/.cache/bnnc/ort``; ``BNNC_ORT_BUILD_DIR`` overrides both.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
NPM_HEADERS = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"
HEADER_CHECK = "onnxruntime_cxx_api.h"
LIB_NAME = "libbnnc_ort.so"

CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fvisibility=hidden", "-Wall",
            "-Wno-unused-function"]
CROSS = {"aarch64": {"cxx": "aarch64-linux-gnu-g++", "flags": ["-march=armv8-a"]}}


class BuildError(RuntimeError):
    """The library cannot be built here (no compiler, no headers, a compile error)."""


def build_dir() -> Path:
    env = os.environ.get("BNNC_ORT_BUILD_DIR")
    if env:
        return Path(env)
    local = HERE / "build"
    with contextlib.suppress(OSError):
        local.mkdir(parents=True, exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    return Path.home() / ".cache" / "bnnc" / "ort"


def lib_file(cross: str | None = None, bdir: Path | None = None) -> Path:
    bdir = bdir or build_dir()
    return bdir / (LIB_NAME if cross is None else f"libbnnc_ort.{cross}.so")


@contextlib.contextmanager
def _lock(bdir: Path):
    """Serialize concurrent builds (several test workers may ask at once)."""
    import fcntl

    bdir.mkdir(parents=True, exist_ok=True)
    with open(bdir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_headers(bdir: Path, log=print) -> Path:
    env = os.environ.get("BNNC_ORT_INCLUDE")
    if env:
        inc = Path(env)
        if not (inc / HEADER_CHECK).is_file():
            raise BuildError(f"BNNC_ORT_INCLUDE={env} does not contain {HEADER_CHECK}")
        return inc
    inc = bdir / "include"
    if (inc / HEADER_CHECK).is_file():
        return inc
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "the ONNX Runtime C++ headers are missing and npm is not installed to fetch them "
            f"({NPM_PACKAGE}); install npm, or set BNNC_ORT_INCLUDE to a folder holding {HEADER_CHECK}")
    log(f"fetching ONNX Runtime headers: npm pack {NPM_PACKAGE}")
    with tempfile.TemporaryDirectory(prefix="bnnc-ort-npm-") as tmp:
        r = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if r.returncode != 0 or not tgz:
            raise BuildError(f"`npm pack {NPM_PACKAGE}` failed (rc={r.returncode}): {r.stderr.strip()[-500:]}")
        staging = Path(tempfile.mkdtemp(prefix=".include.", dir=bdir))
        try:
            with tarfile.open(tgz[0]) as tf:
                n = 0
                for m in tf.getmembers():
                    if m.isfile() and m.name.startswith(NPM_HEADERS) and "/" not in m.name[len(NPM_HEADERS):]:
                        data = tf.extractfile(m).read()
                        (staging / m.name[len(NPM_HEADERS):]).write_bytes(data)
                        n += 1
            if not (staging / HEADER_CHECK).is_file():
                raise BuildError(f"{NPM_PACKAGE} has no {NPM_HEADERS}{HEADER_CHECK}")
            if inc.exists():
                shutil.rmtree(inc)
            os.replace(staging, inc)
            log(f"  {n} headers → {inc}")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return inc


def _sources() -> list[Path]:
    return sorted(SRC_DIR.glob("*.cc")) + sorted(SRC_DIR.glob("*.h"))


def _compiler(cross: str | None) -> str:
    cxx = CROSS[cross]["cxx"] if cross else os.environ.get("CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        hint = "apt-get install -y g++-aarch64-linux-gnu" if cross else "install g++ (build-essential)"
        raise BuildError(f"C++ compiler {cxx!r} not found; {hint}")
    return path


def _fingerprint(cxx: str, flags: list[str], inc: Path | None, extra: tuple[Path, ...] = ()) -> str:
    h = hashlib.sha256()
    for f in _sources() + list(extra):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join(flags).encode())
    if inc is not None:
        h.update((inc / "onnxruntime_c_api.h").read_bytes())
    ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h.update((cxx + " " + " ".join(ver)).encode())
    return h.hexdigest()


def build(force: bool = False, cross: str | None = None, bdir: Path | None = None, log=print) -> Path:
    """Build the library if missing or stale; return its path. Raises :class:`BuildError`."""
    if cross is not None and cross not in CROSS:
        raise BuildError(f"unknown cross target {cross!r} (known: {', '.join(CROSS)})")
    if cross is None and platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        log(f"warning: untested host architecture {platform.machine()}; only the portable kernels apply")
    bdir = Path(bdir) if bdir else build_dir()
    with _lock(bdir):
        cxx = _compiler(cross)
        inc = ensure_headers(bdir, log=log)
        flags = CXXFLAGS + (CROSS[cross]["flags"] if cross else [])
        out = lib_file(cross, bdir)
        stamp = out.with_suffix(out.suffix + ".stamp")
        fp = _fingerprint(cxx, flags, inc)
        if not force and out.is_file() and stamp.is_file() and stamp.read_text().strip() == fp:
            return out
        srcs = [str(f) for f in sorted(SRC_DIR.glob("*.cc"))]
        t0 = time.time()
        _compile_atomic([cxx, *flags, f"-I{inc}", f"-I{SRC_DIR}", *srcs], out, LIB_NAME, log)
        stamp.write_text(fp + "\n")
        log(f"built {out} in {time.time() - t0:.1f} s")
        return out


def _compile_atomic(cmd: list, out: Path, what: str, log) -> None:
    """Run the compiler ``cmd`` writing to a temp file beside ``out``, then rename it onto ``out``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    cmd = [*cmd, "-o", tmp]
    log("compiling: " + " ".join(cmd))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"compiling {what} failed:\n{r.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build_selftest(cross: str | None = None, bdir: Path | None = None, log=print) -> Path:
    """Build ``selftest/kernel_selftest.cc`` with the kernels (no ONNX Runtime needed): an executable
    comparing every ISA the CPU has with a direct-loop reference. Cross builds are static (run them
    with ``qemu-aarch64-static``)."""
    bdir = Path(bdir) if bdir else build_dir()
    with _lock(bdir):
        cxx = _compiler(cross)
        out = bdir / ("kernel_selftest" if cross is None else f"kernel_selftest.{cross}")
        main_src = HERE / "selftest" / "kernel_selftest.cc"
        srcs = [str(f) for f in sorted(SRC_DIR.glob("kernels_*.cc"))] + [str(main_src)]
        flags = [f for f in CXXFLAGS if f not in ("-shared", "-fPIC", "-fvisibility=hidden")]
        flags += (CROSS[cross]["flags"] + ["-static"]) if cross else []
        stamp = out.with_name(out.name + ".stamp")
        fp = _fingerprint(cxx, flags, None, (main_src,))
        if out.is_file() and stamp.is_file() and stamp.read_text().strip() == fp:
            return out
        _compile_atomic([cxx, *flags, f"-I{SRC_DIR}", *srcs], out, "the kernel self-test", log)
        stamp.write_text(fp + "\n")
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bnnc.runtimes.ort.build", description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp is current")
    ap.add_argument("--cross", choices=sorted(CROSS), help="cross-compile (e.g. aarch64)")
    ap.add_argument("--build-dir", type=Path, help="output folder (default: see module docstring)")
    ap.add_argument("--selftest", action="store_true",
                    help="also build and run the native kernel self-test (cross: under qemu-<arch>-static)")
    args = ap.parse_args(argv)
    try:
        path = build(force=args.force, cross=args.cross, bdir=args.build_dir)
        if args.selftest:
            exe = build_selftest(cross=args.cross, bdir=args.build_dir)
            runner = [] if args.cross is None else [shutil.which(f"qemu-{args.cross}-static") or f"qemu-{args.cross}"]
            r = subprocess.run([*runner, str(exe)])
            if r.returncode != 0:
                print("error: kernel self-test failed", file=sys.stderr)
                return 1
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
