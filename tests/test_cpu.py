"""pipeline/cpu.py: what a stage pins before numpy and torch load, on each kind of machine.

The byte-for-byte claim (a training stage and evaluate under other kernel levels) is
tests/test_dvc_faults.py::test_cpu_kernel_levels_do_not_change_the_bytes; here, the rules."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from pipeline.cpu import AVX2_LEVEL, CAPS, THREADS, cpu_flags, pinned_environment, requested_mode

AVX2_MACHINE = {"sse2", "avx", "avx2", "fma"}


def test_an_avx2_machine_gets_every_pin_and_no_warning():
    env, warning = pinned_environment("portable", "x86_64", AVX2_MACHINE | {"avx512f"})
    assert warning is None
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and env["OPENBLAS_CORETYPE"] == "Haswell"
    assert "X86_V4" in env["NPY_DISABLE_CPU_FEATURES"].split()
    assert {env[key] for key in THREADS} == {"1"}


@pytest.mark.parametrize("flags, lacks", [({"sse2", "avx", "fma"}, "AVX2"), ({"sse2", "avx", "avx2"}, "FMA"),
                                          ({"sse2"}, "AVX2 and FMA")])
def test_a_cpu_without_avx2_is_warned_not_forced(flags, lacks):
    """ATEN_CPU_CAPABILITY=avx2 on such a CPU would crash torch (it does not check): leave torch's choice."""
    env, warning = pinned_environment("portable", "x86_64", flags)
    assert not set(AVX2_LEVEL) & set(env), env
    assert env["MKL_CBWR"] == "COMPATIBLE"  # the caps are safe anywhere
    assert warning == (f"pipeline: this CPU lacks {lacks}: torch runs slower generic kernels, "
                       "and results will differ from the committed ones")


def test_unreadable_flags_and_other_architectures_warn():
    env, warning = pinned_environment("portable", "x86_64", None)
    assert "ATEN_CPU_CAPABILITY" not in env and "/proc/cpuinfo" in warning
    env, warning = pinned_environment("portable", "aarch64", {"asimd"})
    assert set(env) == set(THREADS) | {"CUBLAS_WORKSPACE_CONFIG"} and "aarch64 CPU, not x86-64" in warning


def test_native_pins_threads_only():
    env, warning = pinned_environment("native", "x86_64", AVX2_MACHINE)
    assert warning is None and not (set(CAPS) | set(AVX2_LEVEL)) & set(env) and set(THREADS) <= set(env)


@pytest.mark.parametrize("text, mode", [("cpu_kernels: native\n", "native"), ("cpu_kernels: portable\n", "portable"),
                                        ("lr: 0.1\n", "portable"), ("cpu_kernels: [native\n", "portable"),
                                        ("- a list\n", "portable"), ("cpu_kernels: fast\n", "portable")])
def test_the_mode_comes_from_params_yaml(tmp_path, text, mode):
    (tmp_path / "params.yaml").write_text(text)
    assert requested_mode(tmp_path / "params.yaml") == mode
    assert requested_mode(tmp_path / "missing.yaml") == "portable"


def test_cpu_flags_reads_the_first_processor(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(tmp_path / "cpuinfo") == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_flags(tmp_path / "absent") is None


def run_python(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {*THREADS, *CAPS, *AVX2_LEVEL}}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env | env_extra, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not {"avx2", "fma"} <= (cpu_flags() or set()), reason="this CPU has no AVX2 and FMA")
def test_importing_the_package_overrides_the_environment():
    code = ("import os, pipeline, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'], "
            "os.environ['OMP_NUM_THREADS'])")
    proc = run_python(code, {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["AVX2", "COMPATIBLE", "1"] and proc.stderr == ""


def test_importing_torch_first_is_warned():
    proc = run_python("import torch, pipeline", {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ("pipeline: imported after torch and numpy: their kernels are not pinned, and results may "
                                   "differ from the committed ones (import pipeline first)")
