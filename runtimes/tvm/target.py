"""Host CPU detection → a TVM (0.27) target dict.

TVM 0.27 rejects string targets, and ``mcpu: "native"`` is silently ignored (LLVM then emits baseline
x86-64 code whose popcount is ~30x slower), so the target must NAME a CPU. :func:`choose_mcpu` maps a
set of ``/proc/cpuinfo`` flags plus the vendor string to an LLVM CPU name; :func:`cpu_target` applies it
to the running host.
"""

from __future__ import annotations

import os
from functools import lru_cache

__all__ = ["choose_mcpu", "cpu_info", "cpu_target", "num_cores", "llvm_knows_cpu", "arm_target", "cuda_target",
           "resolve_target", "target_family", "host_family", "AARCH64_TRIPLE", "CUDA_ARCHS"]

AARCH64_TRIPLE = "aarch64-linux-gnu"
CUDA_ARCHS = ("sm_80", "sm_90")

# Ordered from most to least capable: (mcpu, required /proc/cpuinfo flags). The first entry whose
# flags are all present (and that the bundled LLVM knows) wins. Every required set is a subset of
# what that LLVM CPU model enables for codegen that matters here (AVX-512 VPOPCNTDQ/BW/VL, AVX2, POPCNT).
_INTEL = [
    ("sapphirerapids", {"avx512_vpopcntdq", "avx512_bitalg", "avx512_fp16", "avx512_bf16", "amx_tile",
                        "avx512bw", "avx512vl", "avx512_vnni"}),
    ("icelake-server", {"avx512_vpopcntdq", "avx512_bitalg", "avx512_vbmi2", "avx512bw", "avx512vl",
                        "avx512_vnni"}),
    ("cascadelake", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
    ("skylake-avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ("haswell", {"avx2", "fma", "bmi2", "popcnt"}),
    ("nehalem", {"popcnt", "sse4_2"}),
]
_AMD = [
    ("znver5", {"avx512_vpopcntdq", "avx512_bitalg", "avx512_vp2intersect", "avx512bw", "avx512vl",
                "avx_vnni"}),
    ("znver4", {"avx512_vpopcntdq", "avx512_bitalg", "avx512bw", "avx512vl"}),
    ("znver3", {"avx2", "vaes", "vpclmulqdq", "popcnt"}),
    ("znver2", {"avx2", "fma", "bmi2", "popcnt"}),
    ("btver2", {"avx", "popcnt"}),
]
# Vendor-neutral fallbacks (other vendors, e.g. Hygon/Zhaoxin, or an unknown vendor string).
_GENERIC = [
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    ("x86-64-v3", {"avx2", "fma", "bmi2", "popcnt", "movbe"}),
    ("x86-64-v2", {"popcnt", "sse4_2", "ssse3", "cx16"}),
]
_BASELINE = "x86-64"


def llvm_knows_cpu(name: str) -> bool:
    """Whether the LLVM bundled with TVM knows ``name`` as an x86 CPU (True if the query is unavailable)."""
    return name in _llvm_cpu_list() if _llvm_cpu_list() else True


@lru_cache(maxsize=1)
def _llvm_cpu_list() -> frozenset:
    try:
        import tvm
        from tvm.target import codegen

        return frozenset(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})))
    except Exception:  # pragma: no cover - older/newer TVM without the query
        return frozenset()


def choose_mcpu(flags, vendor: str = "GenuineIntel", known=None) -> str:
    """Pick an LLVM ``-mcpu`` name from a set of ``/proc/cpuinfo`` flags and the ``vendor_id`` string.

    ``known``: optional predicate ``name -> bool`` (default: ask TVM's LLVM) to skip CPU names the
    bundled LLVM does not know. Non-x86 flag sets end at ``"x86-64"``, which callers on other
    architectures should not use (see :func:`cpu_target`).
    """
    flags = {str(f).lower() for f in flags}
    known = llvm_knows_cpu if known is None else known
    v = (vendor or "").lower()
    if "intel" in v:
        table = _INTEL + _GENERIC
    elif "amd" in v or "hygon" in v:
        table = _AMD + _GENERIC
    else:
        table = _GENERIC
    for name, need in table:
        if need <= flags and known(name):
            return name
    return _BASELINE


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[set, str]:
    """(flags, vendor_id) of the first processor listed in ``path``; (empty set, "") if unreadable."""
    flags: set = set()
    vendor = ""
    try:
        with open(path) as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return flags, vendor


def num_cores() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def cpu_target(num_threads: int | None = None) -> dict:
    """TVM target dict for the host CPU, e.g. ``{"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}``."""
    import platform

    cores = int(num_threads) if num_threads else num_cores()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        flags, vendor = cpu_info()
        mcpu = choose_mcpu(flags, vendor)
        return {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}
    # Non-x86 hosts (aarch64…): let LLVM's host detection name the CPU.
    try:
        from tvm.target import codegen

        mcpu = str(codegen.llvm_get_system_cpu())
        triple = str(codegen.llvm_get_system_triple())
        return {"kind": "llvm", "mtriple": triple, "mcpu": mcpu, "num-cores": cores}
    except Exception:  # pragma: no cover
        return {"kind": "llvm", "num-cores": cores}


# --------------------------------------------------------------------------------------------------
# Cross targets: aarch64 (NEON) and CUDA


def arm_target(num_threads: int | None = None, mcpu: str | None = None,
               mtriple: str = AARCH64_TRIPLE) -> dict:
    """TVM target dict for 64-bit ARM with NEON (Advanced SIMD), e.g. for cross-compilation.

    ``mcpu`` (e.g. ``"cortex-a76"``, ``"neoverse-n1"``) is optional: without it LLVM targets generic
    ARMv8-A + NEON, which every AArch64 core runs. ``num-cores`` only sizes TVM's parallel loops.
    """
    t = {"kind": "llvm", "mtriple": mtriple, "mattr": ["+neon"]}
    if mcpu:
        t["mcpu"] = str(mcpu)
    if num_threads:
        t["num-cores"] = int(num_threads)
    return t


def cuda_target(arch: str | None = "sm_80", host: dict | None = None) -> dict:
    """TVM target dict for CUDA, ``{"kind": "cuda", "arch": "sm_80", "host": {...}}``.

    ``arch=None`` asks the CUDA driver of the local GPU (falls back to sm_80 when none is present).
    ``host`` is the target of the host-side code (default: a plain x86-64/host LLVM target).
    """
    if arch is None:
        arch = _local_cuda_arch() or "sm_80"
    arch = str(arch)
    if not arch.startswith("sm_"):
        arch = "sm_" + arch.replace(".", "")
    return {"kind": "cuda", "arch": arch, "host": dict(host) if host else {"kind": "llvm"}}


def _local_cuda_arch() -> str | None:
    try:
        import tvm

        if not tvm.runtime.enabled("cuda"):
            return None
        dev = tvm.cuda(0)
        if not dev.exist:
            return None
        return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # pragma: no cover
        return None


def host_family() -> str:
    """``"x86"`` or ``"arm"`` (aarch64) for the running machine; ``"other"`` otherwise."""
    import platform

    m = platform.machine().lower()
    if m in ("x86_64", "amd64", "i686", "x86"):
        return "x86"
    if m in ("aarch64", "arm64"):
        return "arm"
    return "other"


def target_family(target) -> str:
    """Which schedule family a target uses: ``"x86"``, ``"arm"`` (AArch64/NEON) or ``"cuda"``.

    Accepts ``None``/``"cpu"``/``"host"`` (the running machine), ``"arm"``/``"aarch64"``, ``"cuda"``,
    a target dict or a ``tvm.target.Target``. Other LLVM targets count as ``"x86"`` (generic CPU schedule).
    """
    if target is None or (isinstance(target, str) and target in ("cpu", "host", "llvm")):
        fam = host_family()
        return "arm" if fam == "arm" else "x86"
    if isinstance(target, str):
        t = target.lower()
        if t in ("arm", "aarch64", "arm64", "neon"):
            return "arm"
        if t.startswith("cuda"):
            return "cuda"
        if t in ("x86", "x86_64", "x86-64"):
            return "x86"
        raise ValueError(f"unknown target name {target!r} (expected 'cpu', 'arm' or 'cuda')")
    if isinstance(target, dict):
        kind = str(target.get("kind", "llvm"))
        triple = str(target.get("mtriple", ""))
        keys = [str(k) for k in target.get("keys", [])]
    else:  # tvm.target.Target
        kind = str(target.kind.name)
        triple = str(target.attrs.get("mtriple", "")) if "mtriple" in target.attrs else ""
        keys = [str(k) for k in target.keys]
    if kind == "cuda":
        return "cuda"
    if kind != "llvm":
        raise ValueError(f"unsupported target kind {kind!r}")
    if triple.startswith(("aarch64", "arm64")) or "arm_cpu" in keys:
        return "arm"
    if not triple and host_family() == "arm":
        return "arm"
    return "x86"


def resolve_target(target, num_threads: int | None = None):
    """A target name (``"cpu"``, ``"arm"``, ``"cuda"``, ``"cuda:sm_90"``), dict or Target → dict/Target."""
    if target is None or target in ("cpu", "host"):
        return cpu_target(num_threads)
    if isinstance(target, str):
        t = target.lower()
        if t in ("arm", "aarch64", "arm64", "neon"):
            return arm_target(num_threads)
        if t == "cuda":
            return cuda_target(None)
        if t.startswith("cuda:"):
            return cuda_target(t.split(":", 1)[1])
        raise ValueError(f"target must be 'cpu', 'arm', 'cuda', 'cuda:sm_XX', a dict or a tvm.target.Target, "
                         f"got {target!r}")
    if isinstance(target, dict):
        return dict(target)
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    raise ValueError(f"target must be 'cpu', 'arm', 'cuda', a dict or a tvm.target.Target, got {target!r}")
