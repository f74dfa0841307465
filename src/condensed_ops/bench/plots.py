"""PNG figures from sweep results (matplotlib, no display needed).

- ``headline_*.png``: condensed's speed-up over each baseline at 90% sparsity,
  batch 1 and 256 — the figure to look at first;
- ``speedup_*.png``: speed-up over dense against batch size, one line per
  sparsity and method, one panel per layer shape;
- ``roofline_*.png``: achieved GFLOP/s against arithmetic intensity, under the
  measured copy-bandwidth and matmul ceilings.
"""

import os
from typing import Dict, List, Sequence, Tuple

from .timing import speedup

Row = Dict[str, object]
_LINESTYLES = {"condensed": "-", "csr": "--", "gather": ":", "dense_tf32": "-.", "dense_bf16": "-.", "semi_structured": (0, (5, 1, 1, 1))}
_MARKERS = {"condensed": "o", "dense": "s", "csr": "^", "gather": "v", "dense_tf32": "D", "dense_bf16": "P", "semi_structured": "X"}
# Methods whose speed does not depend on the layer's sparsity: drawn once, in grey.
_SPARSITY_FREE = ("dense_tf32", "dense_bf16", "semi_structured")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(rows: Sequence[Row]) -> Dict[Tuple, List[Row]]:
    groups: Dict[Tuple, List[Row]] = {}
    for row in rows:
        if not row.get("unavailable"):
            groups.setdefault((row["device"], row["dtype"], row["threads"], row["training"]), []).append(row)
    return groups


def _suffix(key: Tuple) -> str:
    device, dtype, threads, training = key
    return f"{device}_{dtype}" + (f"_{threads}t" if threads is not None else "") + ("_train" if training else "")


def _title(key: Tuple) -> str:
    device, dtype, threads, training = key
    threads_text = f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else ""
    return f"{device}, {dtype}{threads_text}, {'forward + backward' if training else 'forward'}"


def _shapes(rows: Sequence[Row]) -> List[Tuple[int, int]]:
    return list(dict.fromkeys((r["in_features"], r["out_features"]) for r in rows))


def _headline(plt, key, rows, path, sparsity, batches) -> bool:
    """Bars: condensed's speed-up over each baseline, per shape, batch and thread count."""
    cell = lambda r: (r["in_features"], r["out_features"], r["batch"], r["threads"])  # noqa: E731
    condensed = {cell(r): r for r in rows if r["method"] == "condensed" and r["sparsity"] == sparsity and r["batch"] in batches}
    if not condensed:
        return False
    others = [m for m in ("dense", "csr", "gather", "dense_tf32", "dense_bf16", "semi_structured") if any(r["method"] == m for r in rows)]
    by_cell = {(*cell(r), r["method"]): r for r in rows if r["sparsity"] == sparsity}
    labels = [f"{i}→{o}\nbatch {b}" + ("" if t is None else f"\n{t} thread{'s' if t != 1 else ''}") for (i, o, b, t) in condensed]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(labels) * max(1, len(others)) / 3, 4))
    width = 0.8 / max(1, len(others))
    for j, method in enumerate(others):
        ratios = [speedup(by_cell[(*k, method)], c) if (*k, method) in by_cell else float("nan") for k, c in condensed.items()]
        bars = ax.bar([x + (j - (len(others) - 1) / 2) * width for x in range(len(labels))], ratios, width, label=f"vs {method}")
        ax.bar_label(bars, labels=[f"{r:.1f}×" if r == r else "" for r in ratios], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")  # the paper's gather is often 100× slower; log keeps the others readable
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("condensed speed-up (×)")
    ax.set_title(f"{_title(key)}: {sparsity:.0%} sparse (higher is better)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _speedup_vs_batch(plt, key, rows, path) -> None:
    shapes = _shapes(rows)
    sparsities = sorted({r["sparsity"] for r in rows})
    colors = plt.get_cmap("viridis")([i / max(1, len(sparsities) - 1) * 0.9 for i in range(len(sparsities))])
    dense = {(r["in_features"], r["out_features"], r["sparsity"], r["batch"]): r for r in rows if r["method"] == "dense"}
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        methods = [m for m in _LINESTYLES if any(r["method"] == m for r in rows)]
        for method in methods:
            for s, color in zip(sparsities, colors):
                if method in _SPARSITY_FREE and s != sparsities[0]:
                    continue
                points = sorted((r["batch"], speedup(dense[(*shape, s, r["batch"])], r)) for r in rows
                                if r["method"] == method and (r["in_features"], r["out_features"]) == shape and r["sparsity"] == s and (*shape, s, r["batch"]) in dense)
                if points:
                    label = method if method in _SPARSITY_FREE else f"{method} {s:.0%}"
                    ax.plot(*zip(*points), linestyle=_LINESTYLES[method], marker=_MARKERS[method], markersize=3,
                            color="grey" if method in _SPARSITY_FREE else color, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (rows of x)")
        ax.set_ylabel("speed-up over dense F.linear (×)")
        ax.set_title(f"{shape[0]}→{shape[1]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(len(labels), 6), loc="lower center")
    fig.suptitle(_title(key), fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 6), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roofline(plt, key, rows, rooflines, path, sparsity) -> bool:
    device, dtype, threads, _ = key
    roof = next((r for r in rooflines if r["device"] == device and r["dtype"] == dtype and r["threads"] == threads), None)
    chosen = [r for r in rows if r["sparsity"] == sparsity] or rows
    if roof is None or not chosen:
        return False
    bandwidth, peak = roof["copy_bytes_per_second"] / 1e9, roof["matmul_flops_per_second"] / 1e9
    intensities = [r["flops"] / r["bytes"] for r in chosen]
    lo, hi = min(intensities + [bandwidth and peak / bandwidth]) / 4, max(intensities + [peak / bandwidth]) * 4
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ridge = peak / bandwidth
    ax.plot([lo, ridge, hi], [lo * bandwidth, peak, peak], color="black", linewidth=1.2,
            label=f"roofline: copy {bandwidth:.0f} GB/s, matmul {peak:.0f} GFLOP/s")
    for method in dict.fromkeys(r["method"] for r in chosen):
        points = [(r["flops"] / r["bytes"], r["gflop_per_s"], r["batch"]) for r in chosen if r["method"] == method]
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=_MARKERS.get(method, "o"), s=22, label=method)
        for ai, gflops, batch in points:
            ax.annotate(str(batch), (ai, gflops), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("GFLOP/s (performed)")
    ax.set_title(f"{_title(key)}: {chosen[0]['sparsity']:.0%} sparse, labels = batch", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_figures(results: Dict[str, object], directory: str, sparsity: float = 0.9, batches: Sequence[int] = (1, 256)) -> List[str]:
    """Writes the figures for every (device, dtype, threads, pass) group; returns their paths."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    written = []
    threads_merged: Dict[Tuple, List[Row]] = {}
    for (device, dtype, _, training), rows in _groups(results["rows"]).items():
        threads_merged.setdefault((device, dtype, None, training), []).extend(rows)
    for key, rows in threads_merged.items():
        path = os.path.join(directory, f"headline_{_suffix(key)}.png")
        if _headline(plt, key, rows, path, sparsity, batches):
            written.append(path)
    for key, rows in _groups(results["rows"]).items():
        suffix = _suffix(key)
        if len({r["batch"] for r in rows}) > 1:
            path = os.path.join(directory, f"speedup_{suffix}.png")
            _speedup_vs_batch(plt, key, rows, path)
            written.append(path)
        path = os.path.join(directory, f"roofline_{suffix}.png")
        if _roofline(plt, key, rows, results["rooflines"], path, sparsity):
            written.append(path)
    return written
