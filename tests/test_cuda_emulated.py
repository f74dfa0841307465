"""The CUDA kernels run on the CPU: csrc/kernels/cuda compiled as host C++
against tests/cuda_emulator/cuda_emulator.h (one OS thread per CUDA thread,
real barriers and warp shuffles), checked element by element against a float64
reference by tests/cuda_emulator/check_kernels.cpp.

This checks the kernels' logic, planners and launch configurations without a
GPU, under AddressSanitizer + UBSan (out-of-bounds global and shared accesses,
misaligned packed loads) and ThreadSanitizer (shared-memory races between
barriers). It says nothing about speed; tests/test_cuda.py runs the real thing
on a GPU. Needs g++ and the CUDA toolkit's headers, as CI's compile check does.
"""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

# Loaded by path under its own name: "build" alone could be pypa's package.
_spec = importlib.util.spec_from_file_location(
    "condensed_ops_cuda_emulator_build", Path(__file__).parent / "cuda_emulator" / "build.py"
)
emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emulator)

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or emulator.cuda_include_dir() is None,
    reason="needs g++ and the CUDA toolkit's headers",
)


def run_checker(executable: Path, mode: str, seed: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run([str(executable), mode, str(seed)], capture_output=True, text=True, timeout=900)


def assert_clean(result: subprocess.CompletedProcess) -> None:
    report = result.stdout[-4000:] + result.stderr[-8000:]
    assert result.returncode == 0, report
    assert "0 failures" in result.stdout, report
    assert "Sanitizer" not in result.stderr and "runtime error" not in result.stderr, report


def build_mutant(out: Path, tmp_path: Path, file: str, original: str, mutation: str) -> Path:
    """The checker built against a copy of the kernels with `original` (found once in `file`) replaced."""
    kernels = tmp_path / "kernels"
    shutil.copytree(emulator.KERNELS, kernels)
    source = (kernels / file).read_text()
    assert source.count(original) == 1
    (kernels / file).write_text(source.replace(original, mutation))
    return emulator.build(out, kernels=kernels)


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emulator")


def test_every_kernel_matches_float64_under_address_sanitizer(build_dir):
    executable = emulator.build(build_dir / "address", sanitize="address")
    assert_clean(run_checker(executable, "quick", seed=0))


def test_no_shared_memory_race_under_thread_sanitizer(build_dir):
    executable = emulator.build(build_dir / "thread", sanitize="thread")
    assert_clean(run_checker(executable, "races", seed=1))


def test_checker_catches_a_dropped_tail_entry(build_dir, tmp_path):
    """The checker can fail: a forward kernel that skips the last entry of
    rows whose length is not a multiple of the 16-byte pack gives wrong
    outputs (and a wrong grad_x, which runs the forward kernel over CSR rows)."""
    tail_test = "has_tail = tail < end;"
    executable = build_mutant(build_dir / "mutant", tmp_path, "condensed_linear_forward.cu", tail_test,
                              "has_tail = tail + 1 < end;")
    result = run_checker(executable, "rows")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAIL forward" in result.stdout and "FAIL grad_x columns" in result.stdout


def test_checker_catches_a_grouped_pipeline_that_does_not_wait(build_dir, tmp_path):
    """The emulated cp.async lands a copy only when a wait retires its group:
    a grouped kernel that waits for one group too few multiplies a stage whose
    copies have not landed (NaN garbage in the emulator's shared memory)."""
    executable = build_mutant(build_dir / "grouped_mutant", tmp_path, "grouped_forward.cu",
                              "cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();")
    result = run_checker(executable, "grouped")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAIL grouped" in result.stdout


def test_translation_rewrites_only_the_cuda_syntax():
    source = (
        "extern __shared__ __align__(16) unsigned char shared_bytes[];\n"
        "kernel<float, int><<<dim3(a, b), 256, shared, stream>>>(p, 1);\n"
        "#include <cub/device/device_radix_sort.cuh>\n"
        "int x = a < b ? c : d;\n"
    )
    translated = emulator.translate(source)
    assert "unsigned char* const shared_bytes = reinterpret_cast<unsigned char*>(::emu::dynamic_shared());" in translated
    assert "::emu::launch(kernel<float, int>, dim3(a, b), 256, shared, stream)(p, 1);" in translated
    assert "cub/" not in translated
    assert "int x = a < b ? c : d;" in translated
    with pytest.raises(ValueError):
        emulator.translate("__shared__ float tile[32];")
