"""What the benchmarks ran on, and the machine's roofline measured in the same run.

The roofline has two numbers per device, dtype and thread count: memory
bandwidth from a device copy much larger than the last-level cache (bytes read +
written per second), and compute from a large dense matmul (FLOP/s). A result's
roofline fraction is ``max(bytes / bandwidth, flops / compute) / time``: 1 means
the method ran as fast as the machine's own copy and matmul allow; above 1 is
possible when a working set stays in cache.
"""

import datetime
import os
import platform
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from .timing import time_interleaved, with_tf32

# Large enough to spill any L3 here (the dev VM reports a 300 MiB shared L3)
# and any GPU's L2, small enough for a 24 GiB machine: source + destination.
_COPY_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}
# Square matmul size for the compute peak: far past the size where GEMM
# efficiency flattens, and a fraction of a second per call.
_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


def _cpu_model() -> str:
    """The model name, with family and model numbers (a VM may say only "AMD EPYC")."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine() -> Dict[str, object]:
    """The facts a reader needs to judge the numbers: CPU, GPU, versions, date."""
    from .. import _C, __version__

    description: Dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "condensed_ops": __version__,
        "cpu_kernels": dict(_C.cpu_capabilities()),
        "with_cuda": bool(_C.with_cuda),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        description["gpu"] = {
            "name": properties.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": properties.total_memory,
            "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "l2_cache_bytes": getattr(properties, "L2_cache_size", None),
            "cuda": torch.version.cuda,
        }
    return description


@dataclass(frozen=True)
class Roofline:
    """Measured peaks of one device, dtype and thread count."""

    device: str
    dtype: str
    threads: Optional[int]
    copy_bytes_per_second: float
    matmul_flops_per_second: float
    matmul_size: int

    def bound_seconds(self, bytes_moved: int, flops: int) -> float:
        """The least time the roofline allows for this much traffic and arithmetic."""
        return max(bytes_moved / self.copy_bytes_per_second, flops / self.matmul_flops_per_second)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def measure_roofline(device: torch.device, dtype: torch.dtype, threads: Optional[int], allow_tf32: bool = False, quick: bool = False) -> Roofline:
    """Copy bandwidth and dense matmul FLOP/s on ``device`` in ``dtype``, now.

    ``allow_tf32`` measures a float32 matmul with TF32 allowed (CUDA).
    """
    kind = device.type
    copy_bytes = _COPY_BYTES[kind] // (4 if quick else 1)
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    destination = torch.empty_like(source)
    n = _MATMUL_SIZE[kind] // (2 if quick else 1)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    matmul = with_tf32(lambda: torch.mm(a, b, out=out), allow_tf32)
    timings = time_interleaved(
        {"copy": lambda: destination.copy_(source), "matmul": matmul}, device, rounds=5, min_rounds=3, max_seconds=4.0
    )
    name = "tf32" if allow_tf32 and dtype == torch.float32 else str(dtype).removeprefix("torch.")
    return Roofline(
        device=kind,
        dtype=name,
        threads=threads,
        copy_bytes_per_second=2 * copy_bytes / timings["copy"].kernel_seconds,
        matmul_flops_per_second=2 * n**3 / timings["matmul"].kernel_seconds,
        matmul_size=n,
    )
