"""Builds tests/cuda_emulator/check_kernels: the CUDA kernels of
csrc/kernels/cuda compiled as host C++ against cuda_emulator.h.

Two CUDA-only syntaxes are rewritten first (nothing else in the kernels
changes): `kernel<<<grid, block, shared, stream>>>(args)` becomes
`::emu::launch(kernel, grid, block, shared, stream)(args)`, and
`extern __shared__ T name[];` becomes a pointer to the block's emulated
dynamic shared memory. The cub include is dropped (the emulator provides the
one cub call the kernels make). The .cuh headers are rewritten too, and the
rewritten files include each other's rewritten copies.

    python tests/cuda_emulator/build.py [--sanitize address|thread] [--out DIR]

Needs g++ (C++20) and the CUDA toolkit's headers (cuda_runtime.h,
cuda_fp16.h, cuda_bf16.h); no GPU and no CUDA library.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parents[1] / "csrc" / "kernels" / "cuda"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")
_CUB_INCLUDE = re.compile(r"^#include <cub/.*>$", re.M)
_CUH_INCLUDE = re.compile(r'^#include "(\w+)\.cuh"$', re.M)

SANITIZERS = {
    None: [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}


def translate(source: str) -> str:
    """The .cu source as host C++ for the emulator."""
    source = _LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})(", source)
    source = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* const {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::emu::dynamic_shared());",
        source,
    )
    source = _CUB_INCLUDE.sub("", source)
    source = _CUH_INCLUDE.sub(r'#include "\1.emulated.h"', source)
    if "<<<" in source or "__shared__" in source:
        raise ValueError("CUDA syntax the emulator cannot rewrite is left in the source")
    return source


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory, found next to nvcc or at the usual places."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate) / "include"
    return None


def build(out_dir: Path, sanitize: str | None = None, kernels: Path = KERNELS) -> Path:
    """Compiles the checker against the .cu files in `kernels` into out_dir
    and returns the executable's path."""
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("no CUDA toolkit headers found (set CUDA_HOME)")
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "check_kernels.cpp"]
    for header in sorted(kernels.glob("*.cuh")):
        (out_dir / (header.stem + ".emulated.h")).write_text(f'#line 1 "{header}"\n' + translate(header.read_text()))
    for cu in sorted(kernels.glob("*.cu")):
        translated = out_dir / (cu.stem + ".emulated.cpp")
        translated.write_text(f'#line 1 "{cu}"\n' + translate(cu.read_text()))
        sources.append(translated)
    flags = [
        "-std=c++20", "-O1", "-g", "-pthread", "-Wno-attributes",
        "-include", str(HERE / "cuda_emulator.h"),
        f"-I{include}", f"-I{out_dir}", f"-I{kernels}",
        *SANITIZERS[sanitize],
    ]  # fmt: skip
    objects = [out_dir / (source.stem + ".o") for source in sources]
    procs = [  # one compiler per file: the kernel files compile in parallel
        subprocess.Popen(["g++", *flags, "-c", str(s), "-o", str(o)], stderr=subprocess.PIPE, text=True)
        for s, o in zip(sources, objects)
    ]
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("compiling the emulated kernels failed:\n" + "\n".join(errors))
    executable = out_dir / "check_kernels"
    subprocess.run(["g++", *flags, *map(str, objects), "-o", str(executable)], check=True)
    return executable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", choices=["address", "thread"])
    parser.add_argument("--out", type=Path, default=Path("build/cuda_emulator"))
    args = parser.parse_args()
    print(build(args.out, args.sanitize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
