"""The sweep: every (device, threads, dtype, shape, sparsity, batch) cell, every method
timed interleaved in it, one result row per method with its derived figures."""

import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .machine import Roofline, describe_machine, measure_roofline
from .methods import available_methods, grouped_method, layer_methods, method_description, random_layer
from .timing import speedup, time_interleaved

Progress = Callable[[str], None]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class SweepConfig:
    """What to sweep. ``threads`` None entries mean "torch's default" (and CUDA ignores them)."""

    shapes: Sequence[Tuple[int, int]] = ((768, 3072), (3072, 768))  # (in_features, out_features)
    sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99)
    batches: Sequence[int] = (1, 4, 16, 64, 256, 1024, 4096)
    dtypes: Sequence[torch.dtype] = (torch.float32,)
    devices: Sequence[torch.device] = (torch.device("cpu"),)
    threads: Sequence[Optional[int]] = (None,)
    methods: Optional[Sequence[str]] = None  # None: every method the device has
    group_sizes: Sequence[int] = ()  # grouped layouts timed beside the methods (grouped<g>)
    training: bool = False
    rounds: int = 15
    max_seconds_per_cell: float = 5.0
    quick_roofline: bool = False

    def as_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["dtypes"] = [dtype_name(t) for t in self.dtypes]
        d["devices"] = [str(t) for t in self.devices]
        return d

    def cells(self) -> int:
        per_device = len(self.dtypes) * len(self.shapes) * len(self.sparsities) * len(self.batches)
        return sum(per_device * (len(self.threads) if device.type == "cpu" else 1) for device in self.devices)


def _compute_kind(method: str, dtype: torch.dtype) -> Tuple[torch.dtype, bool]:
    """The dtype (and TF32 switch) whose matmul peak bounds ``method``."""
    if method == "dense_tf32":
        return torch.float32, True
    if method == "dense_bf16" or (method == "semi_structured" and dtype not in (torch.float16, torch.bfloat16)):
        return torch.bfloat16, False
    return dtype, False


@dataclass
class _RooflineCache:
    quick: bool
    measured: Dict[Tuple[str, str, bool, Optional[int]], Roofline] = field(default_factory=dict)

    def get(self, device: torch.device, dtype: torch.dtype, tf32: bool, threads: Optional[int]) -> Roofline:
        key = (device.type, dtype_name(dtype), tf32, threads)
        if key not in self.measured:
            self.measured[key] = measure_roofline(device, dtype, threads, allow_tf32=tf32, quick=self.quick)
        return self.measured[key]


def _cell_rows(cell: Dict[str, object], methods, timings, rooflines: Dict[str, Roofline]) -> List[Dict[str, object]]:
    rows = []
    for method in methods:
        row: Dict[str, object] = dict(cell, method=method.name)
        if method.call is None:
            row["unavailable"] = method.unavailable
            rows.append(row)
            continue
        timing = timings[method.name]
        t = timing.kernel_seconds
        roofline = rooflines[method.name]
        row.update(
            seconds=timing.seconds,
            graph_seconds=timing.graph_seconds,
            graph_error=timing.graph_error,
            kernel_seconds=t,
            rounds=timing.rounds,
            bytes=method.bytes_moved,
            flops=method.flops,
            gb_per_s=method.bytes_moved / t / 1e9,
            gflop_per_s=method.flops / t / 1e9,
            roofline_kind=roofline.dtype,
            roofline_fraction=roofline.bound_seconds(method.bytes_moved, method.flops) / t,
        )
        rows.append(row)
    by_name = {row["method"]: row for row in rows if "seconds" in row}
    for row in by_name.values():
        for baseline in ("dense", "csr"):
            row[f"speedup_vs_{baseline}"] = speedup(by_name[baseline], row) if baseline in by_name else None
    return rows


def run_sweep(config: SweepConfig, progress: Optional[Progress] = None, on_cell: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> Dict[str, object]:
    """Runs the sweep; returns ``{"machine", "config", "methods", "rooflines", "rows"}``.

    ``progress(label)`` is called before each cell, ``on_cell(rows)`` after it.
    """
    rooflines = _RooflineCache(quick=config.quick_roofline)
    rows: List[Dict[str, object]] = []
    default_threads = torch.get_num_threads()
    try:
        for device in config.devices:
            for threads in config.threads if device.type == "cpu" else [None]:
                torch.set_num_threads(threads or default_threads)
                for dtype, (in_features, out_features), sparsity in itertools.product(config.dtypes, config.shapes, config.sparsities):
                    layer = random_layer(in_features, out_features, sparsity, dtype, device)
                    names = list(config.methods or available_methods(device, dtype))
                    names += [grouped_method(g) for g in config.group_sizes if grouped_method(g) not in names]
                    for batch in config.batches:
                        cell = {
                            "device": device.type,
                            "threads": torch.get_num_threads() if device.type == "cpu" else None,
                            "dtype": dtype_name(dtype),
                            "in_features": in_features,
                            "out_features": out_features,
                            "sparsity": sparsity,
                            "fan_in": layer.fan_in,
                            "batch": batch,
                            "training": config.training,
                        }
                        if progress is not None:
                            progress(f"{device.type} {dtype_name(dtype)} {in_features}→{out_features} {sparsity:.0%} batch {batch}")
                        methods = layer_methods(layer, batch, names, training=config.training)
                        runnable = {m.name: m.call for m in methods if m.call is not None}
                        timings = time_interleaved(runnable, device, config.rounds, max_seconds=config.max_seconds_per_cell)
                        roof = {
                            m.name: rooflines.get(device, *_compute_kind(m.name, dtype), cell["threads"]) for m in methods if m.call is not None
                        }
                        new_rows = _cell_rows(cell, methods, timings, roof)
                        rows.extend(new_rows)
                        if on_cell is not None:
                            on_cell(new_rows)
    finally:
        torch.set_num_threads(default_threads)
    return {
        "machine": describe_machine(),
        "config": config.as_dict(),
        "methods": {name: method_description(name) for name in sorted({row["method"] for row in rows})},
        "rooflines": [r.as_dict() for r in rooflines.measured.values()],
        "rows": rows,
    }
