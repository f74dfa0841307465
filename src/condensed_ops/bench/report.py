"""Markdown from benchmark JSON: the sweep's live table lines, and the README's
Results section (tables + figures) rendered from one or more result files.

    python -m condensed_ops.bench.report results.json [more.json] --readme README.md --figures docs/figures

replaces what sits between the README's ``<!-- bench-results:begin -->`` and
``<!-- bench-results:end -->`` markers (or prints the section without ``--readme``).
"""

import argparse
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

from .timing import speedup

Row = Dict[str, object]
BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
_RATIO_METHODS = ("dense", "csr", "gather")


def _us(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e6:.1f}" if seconds < 1e-2 else f"{seconds * 1e6:.0f}"


def _time_cell(row: Row) -> str:
    if row.get("unavailable"):
        return "n/a"
    if row["device"] == "cuda":  # graph replay (the device's time) / eager per call
        return f"{_us(row.get('graph_seconds'))} / {_us(row['seconds'])}"
    return _us(row["seconds"])


def _ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _shape(row: Row) -> str:
    return f"{row['in_features']}→{row['out_features']}"


def _by_method(rows: Iterable[Row]) -> Dict[str, Row]:
    return {str(row["method"]): row for row in rows}


def _context(row: Row) -> List[str]:
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
    condensed = _by_method(rows).get("condensed", {})
    available = bool(condensed) and not condensed.get("unavailable")
    figures = [
        _ratio(condensed.get("speedup_vs_dense")) if available else "–",
        _ratio(condensed.get("speedup_vs_csr")) if available else "–",
        f"{condensed['gb_per_s']:.1f}" if available else "–",
        f"{condensed['roofline_fraction']:.0%}" if available else "–",
    ]
    return "| " + " | ".join(_context(rows[0]) + [_time_cell(row) for row in rows] + figures) + " |"


# ---- the README section ------------------------------------------------------------------


def _cells(rows: Iterable[Row]) -> Dict[tuple, List[Row]]:
    cells: Dict[tuple, List[Row]] = {}
    for row in rows:
        key = tuple(row[k] for k in ("device", "dtype", "threads", "training", "in_features", "out_features", "sparsity", "batch"))
        cells.setdefault(key, []).append(row)
    return cells


def _machine_line(result: Dict[str, object]) -> str:
    m = result["machine"]
    gpu = m.get("gpu")
    where = f"{gpu['name']} (CUDA {gpu['cuda']}) + " if gpu else ""
    return (
        f"{where}{m['cpu']} ({m['logical_cpus']} logical CPUs), torch {m['torch']}, condensed_ops {m['condensed_ops']} "
        f"(CPU kernels: {m['cpu_kernels']['active_isa']}), {m['date'][:10]}"
    )


def _roofline_table(results: Sequence[Dict[str, object]]) -> List[str]:
    lines = ["| device | dtype | threads | copy GB/s | dense matmul GFLOP/s |", "|---|---|---|---|---|"]
    seen = set()
    for result in results:
        for r in result["rooflines"]:
            key = (r["device"], r["dtype"], r["threads"])
            if key not in seen:
                seen.add(key)
                threads = "" if r["threads"] is None else r["threads"]
                lines.append(f"| {r['device']} | {r['dtype']} | {threads} | {r['copy_bytes_per_second'] / 1e9:.1f} | {r['matmul_flops_per_second'] / 1e9:.0f} |")
    return lines


def _comparison_table(cells: Iterable[List[Row]]) -> List[str]:
    """condensed against every other method, per cell: times, then condensed's ratios and efficiency."""
    cells = list(cells)
    methods = list(dict.fromkeys(str(row["method"]) for rows in cells for row in rows))
    step = " fwd+bwd" if cells and cells[0][0].get("training") else ""
    unit = "µs (graph / eager)" if cells and cells[0][0]["device"] == "cuda" else "µs"
    others = [m for m in methods if m != "condensed"]
    header = ["device", "dtype", "threads", "in→out", "sparsity", "batch", *(f"{m}{step} {unit}" for m in methods)]
    header += [f"vs {m}" for m in others] + ["condensed GB/s", "GFLOP/s", "roofline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rows in cells:
        by = _by_method(rows)
        c = by.get("condensed", {})
        ok = bool(c) and not c.get("unavailable")
        ratios = []
        for m in others:
            other = by.get(m)
            good = ok and other is not None and not other.get("unavailable")
            ratios.append(_ratio(speedup(other, c)) if good else "–")
        tail = [f"{c['gb_per_s']:.1f}", f"{c['gflop_per_s']:.1f}", f"{c['roofline_fraction']:.0%}"] if ok else ["–"] * 3
        times = [_time_cell(by[m]) if m in by else "–" for m in methods]
        lines.append("| " + " | ".join(_context(rows[0]) + times + ratios + tail) + " |")
    return lines


def render_markdown(
    results: Sequence[Dict[str, object]],
    figures: Sequence[str] = (),
    sources: Sequence[str] = (),
    headline_sparsity: float = 0.9,
    headline_batches: Sequence[int] = (1, 256),
) -> str:
    """The Results section: setup, headline table and figures, every cell, ViT end to end.

    ``sources`` (the JSON paths) go into a comment, so a test can re-render the
    section from them and compare.
    """
    out = [f"<!-- results from: {' '.join(sources)} -->"] if sources else []
    for result in results:
        out.append(f"- {_machine_line(result)}: `{result['command']}`")
    out += ["", "Measured peaks (the roofline; a copy much larger than the caches, a large dense matmul):", ""]
    out += _roofline_table(results)
    out += ["", "Methods: " + "; ".join(f"**{k}**: {v}" for k, v in _merged_methods(results).items()) + "."]

    rows = [row for result in results for row in result["rows"]]
    groups: Dict[tuple, List[List[Row]]] = {}
    for key, cell in _cells(rows).items():
        groups.setdefault(key[:4], []).append(cell)
    headline = [cell for cells in groups.values() for cell in cells if cell[0]["sparsity"] == headline_sparsity and cell[0]["batch"] in headline_batches]
    names = {path: os.path.splitext(os.path.basename(path))[0] for path in figures}
    pick = lambda kind, training: [p for p, n in names.items() if n.startswith(kind) and n.endswith("_train") == training]  # noqa: E731
    if headline:
        out += ["", f"### {headline_sparsity:.0%} sparse, batch {' and '.join(map(str, headline_batches))}", ""]
        for training in (False, True):
            cells = [c for c in headline if c[0]["training"] == training]
            out += [f"![{names[p]}]({p})" for p in pick("headline", training)] + [""]
            if cells:
                out += _comparison_table(cells) + [""]
    if figures:
        shown = pick("speedup", False)
        out += ["### Speed-up over dense against batch size", ""] + [f"![{names[p]}]({p})" for p in shown] + [""]
        more = [p for p in figures if p not in shown and not names[p].startswith("headline")]
        if more:
            out += ["<details>", "<summary>More figures: rooflines, forward + backward</summary>", ""]
            out += [f"![{names[p]}]({p})" for p in more] + ["", "</details>", ""]
    vits = [vit for result in results for vit in result.get("vit", [])]
    if vits:
        from .vit import format_markdown

        out += ["### End to end: ViT-B/16-sized encoder, condensed against masked dense", ""]
        out += [line for vit in vits for line in (format_markdown(vit), "")]
    for key, cells in groups.items():
        device, dtype, threads, training = key
        title = f"{device}, {dtype}" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else "")
        title += ", forward + backward" if training else ", forward"
        out += ["<details>", f"<summary>Every cell: {title}</summary>", ""] + _comparison_table(cells) + ["", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"


def _merged_methods(results: Sequence[Dict[str, object]]) -> Dict[str, str]:
    merged: Dict[str, str] = {}
    for result in results:
        merged.update(result.get("methods", {}))
    return merged


def update_readme(readme: str, section: str) -> None:
    with open(readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} markers to replace")
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{section}{END}", text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m condensed_ops.bench.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by python -m condensed_ops.bench --json")
    parser.add_argument("--readme", help="replace the marked section of this file (else print it)")
    parser.add_argument("--figures", help="write the PNG figures here and embed them (paths relative to the README)")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    base = os.path.dirname(os.path.abspath(args.readme)) if args.readme else os.getcwd()
    figures: List[str] = []
    if args.figures:
        from .plots import write_figures

        merged = dict(results[0], rows=[row for r in results for row in r["rows"]], rooflines=[x for r in results for x in r["rooflines"]])
        figures = [os.path.relpath(p, base) for p in write_figures(merged, args.figures)]
    section = render_markdown(results, figures, [os.path.relpath(path, base) for path in args.results])
    if args.readme:
        update_readme(args.readme, section)
        print(f"updated {args.readme}")
    else:
        print(section)


if __name__ == "__main__":
    main()
