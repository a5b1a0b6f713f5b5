"""What decides the rounding of a CPU stage, pinned in one place before numpy or torch loads.

pipeline/__init__.py calls `pin()`, so every `python -m pipeline.<stage>` (and pipeline.tune, and
any process that imports the package before torch) runs with the same kernels on every x86-64
machine with AVX2 and FMA, overriding whatever the environment says:

- torch's own vectorised kernels at the AVX2 level (ATEN_CPU_CAPABILITY), not AVX-512;
- MKL's matrix products and LAPACK on its one code path that Intel and AMD CPUs run alike
  (MKL_CBWR=COMPATIBLE: MKL's AVX2 branch is reproducible on Intel CPUs only, and elsewhere MKL
  silently takes its own choice; measured here, it is the pin's main cost: docs/scale.md);
- oneDNN at AVX2 at most (ONEDNN_MAX_CPU_ISA), numpy's dispatched loops (sorting, math) at AVX2 at
  most (NPY_DISABLE_CPU_FEATURES), numpy's OpenBLAS on its Haswell (AVX2) kernels;
- one thread for OpenMP, MKL and OpenBLAS (the stages also call torch.set_num_threads(1)).

`cpu_kernels: native` in params.yaml turns the pin off (threads stay pinned): faster, and results
that differ from the committed ones on another CPU. DVC records the key, so such a run is never
mistaken for a portable one. On a CPU without AVX2 and FMA, or not x86-64, torch's kernels are left
to torch (a forced AVX2 level would crash there) and one warning line says the results will differ.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# One thread wherever a library could start several: the same reduction order on any core count.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
# cuBLAS's deterministic workspace (read when CUDA starts; common.pick_device sets the rest of the GPU's determinism)
GPU = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# Safe on any x86-64 CPU: they only cap what the library may pick.
CAPS = {
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN's older name for the same switch
    "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",  # float32 stays float32 (no implicit bf16/tf32)
    "DNNL_DEFAULT_FPMATH_MODE": "STRICT",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX "
                                "AVX512_CNL AVX512_ICL AVX512_SPR",
}
# Force a level: only where the CPU has AVX2 and FMA (torch does not check, and would crash).
AVX2_LEVEL = {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell"}
NEEDED_FLAGS = ("avx2", "fma")
MODES = ("portable", "native")
PARAMS_KEY = "cpu_kernels"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The first CPU's flags from /proc/cpuinfo; None where the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def requested_mode(params_file: str | Path = "params.yaml") -> str:
    """params.yaml's `cpu_kernels` ("portable" unless it says "native"). A broken or absent file reads
    as portable here: the stage's own load_params reports what is wrong with it."""
    try:
        import yaml  # pure Python: does not load numpy

        raw = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - any problem is load_params' to report, with its file and line
        return "portable"
    value = raw.get(PARAMS_KEY) if isinstance(raw, dict) else None
    return "native" if str(value).strip() == "native" else "portable"


def pinned_environment(mode: str, machine: str, flags: set[str] | None) -> tuple[dict[str, str], str | None]:
    """The variables to set for `mode` on a CPU of this `machine` and `flags`, and a warning (or None)."""
    env = THREADS | GPU
    if mode == "native":
        return env, None
    if machine.lower() not in ("x86_64", "amd64"):
        return env, f"pipeline: this is a {machine} CPU, not x86-64: results will differ from the committed ones"
    env |= CAPS
    if flags is None:
        return env, ("pipeline: cannot read this CPU's flags (/proc/cpuinfo): torch picks its own kernels, "
                     "and results may differ from the committed ones")
    missing = [flag for flag in NEEDED_FLAGS if flag not in flags]
    if missing:
        return env, (f"pipeline: this CPU lacks {' and '.join(flag.upper() for flag in missing)}: torch runs slower generic kernels, "
                     "and results will differ from the committed ones")
    return env | AVX2_LEVEL, None


def pin() -> None:
    """Set the pinned variables in os.environ (before numpy and torch load); warn in one line where it can't hold."""
    mode = requested_mode()
    env, warning = pinned_environment(mode, platform.machine(), cpu_flags())
    os.environ.update(env)
    loaded = [name for name in ("torch", "numpy") if name in sys.modules]
    if mode == "portable" and loaded:
        warning = (f"pipeline: imported after {' and '.join(loaded)}: their kernels are not pinned, "
                   "and results may differ from the committed ones (import pipeline first)")
    if warning:
        print(warning, file=sys.stderr)
