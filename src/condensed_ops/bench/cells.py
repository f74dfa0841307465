"""The sweep's live Markdown table: a header and one line per cell (every method's
time, then the condensed method's ratios, bandwidth and roofline fraction)."""

from typing import Dict, Iterable, List, Optional, Sequence

Row = Dict[str, object]


def _us(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e6:.1f}" if seconds < 1e-2 else f"{seconds * 1e6:.0f}"


def time_text(row: Row) -> str:
    if row.get("unavailable"):
        return "n/a"
    if row["device"] == "cuda":  # graph replay (the device's time) / eager per call
        return f"{_us(row.get('graph_seconds'))} / {_us(row['seconds'])}"
    return _us(row["seconds"])


def ratio_text(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _shape(row: Row) -> str:
    return f"{row['in_features']}→{row['out_features']}"


def methods_by_name(rows: Iterable[Row]) -> Dict[str, Row]:
    return {str(row["method"]): row for row in rows}


def context_columns(row: Row) -> List[str]:
    threads = "" if row["threads"] is None else str(row["threads"])
    return [str(row["device"]), str(row["dtype"]), threads, _shape(row), f"{row['sparsity']:.0%}", str(row["batch"])]


def cell_header(rows: Sequence[Row]) -> str:
    """The header of :func:`format_cell` lines for cells with these methods."""
    unit = "µs (graph / eager)" if rows[0]["device"] == "cuda" else "µs"
    step = " fwd+bwd" if rows[0].get("training") else ""
    names = [f"{row['method']}{step} {unit}" for row in rows]
    columns = ["device", "dtype", "threads", "in→out", "sparsity", "batch", *names, "vs dense", "vs CSR", "condensed GB/s", "roofline"]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def format_cell(rows: Sequence[Row]) -> str:
    """One Markdown table line for one cell's rows (all methods)."""
    condensed = methods_by_name(rows).get("condensed", {})
    available = bool(condensed) and not condensed.get("unavailable")
    figures = [
        ratio_text(condensed.get("speedup_vs_dense")) if available else "–",
        ratio_text(condensed.get("speedup_vs_csr")) if available else "–",
        f"{condensed['gb_per_s']:.1f}" if available else "–",
        f"{condensed['roofline_fraction']:.0%}" if available else "–",
    ]
    return "| " + " | ".join(context_columns(rows[0]) + [time_text(row) for row in rows] + figures) + " |"
