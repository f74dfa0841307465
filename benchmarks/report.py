"""Repository tooling, not part of the package: the README's short "when it pays"
summary and the full results document (tables + figures), rendered from one or
more result files of ``python -m condensed_ops.bench --json``.

    python benchmarks/report.py a.json [b.json ...] --readme README.md --results-doc docs/results.md --figures docs/figures

replaces what sits between ``<!-- bench-summary:begin -->`` and ``<!-- bench-summary:end -->``
in the README, and between ``<!-- bench-results:begin -->`` and ``<!-- bench-results:end -->``
in the results document (or prints both without those options).
"""

import argparse
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence

from condensed_ops.bench.cells import Row, context_columns, methods_by_name, ratio_text, time_text
from condensed_ops.bench.methods import group_size_of
from condensed_ops.bench.timing import speedup

BEGIN, END = "<!-- bench-results:begin -->", "<!-- bench-results:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- bench-summary:begin -->", "<!-- bench-summary:end -->"
_RATIO_METHODS = ("dense", "csr", "gather")


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


def _forced_options(result: Dict[str, object]) -> Dict[str, str]:
    """The kernel options a result was measured with that are not "auto"."""
    options = result["machine"].get("cpu_kernels", {}).get("kernel_options", {})
    return {name: value for name, value in options.items() if value != "auto"}


def _split_forced(results: Sequence[Dict[str, object]]):
    """(results with the automatic choice, results with a forced kernel path)."""
    return [r for r in results if not _forced_options(r)], [r for r in results if _forced_options(r)]


def _forced_paths_table(forced: Sequence[Dict[str, object]]) -> List[str]:
    """One line per (forced path, cell): the row and window layouts' times and ratios to dense."""
    lines = ["| kernel options | threads | in→out | sparsity | batch | condensed µs | condensed_packed µs | dense µs | condensed vs dense | packed vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in forced:
        label = ", ".join(f"{k}={v}" for k, v in _forced_options(result).items())
        for rows in _cells(result["rows"]).values():
            by = methods_by_name(rows)
            times = [time_text(by[m]) if m in by else "–" for m in ("condensed", "condensed_packed", "dense")]
            ratios = []
            for m in ("condensed", "condensed_packed"):
                ok = m in by and "dense" in by and not by[m].get("unavailable") and not by["dense"].get("unavailable")
                ratios.append(ratio_text(speedup(by["dense"], by[m])) if ok else "–")
            context = context_columns(rows[0])
            lines.append("| " + " | ".join([label, context[2], *context[3:]] + times + ratios) + " |")
    return lines


def _has_grouped(result: Dict[str, object]) -> bool:
    return any(group_size_of(str(row["method"])) is not None for row in result["rows"])


def _split_grouped(results: Sequence[Dict[str, object]]):
    """(results without grouped layouts, results with them): a grouped run's cells go to the
    grouped tables only, so that no cell mixes rows from two runs."""
    return [r for r in results if not _has_grouped(r)], [r for r in results if _has_grouped(r)]


def _grouped_table(cells: Sequence[List[Row]]) -> List[str]:
    """Per cell: dense, the row layout (g = 1) and each grouped layout, times then speed-ups over dense."""
    sizes = sorted({g for rows in cells for row in rows if (g := group_size_of(str(row["method"]))) is not None})
    methods = ["dense", "condensed"] + [f"grouped{g}" for g in sizes]
    labels = ["dense", "g=1"] + [f"g={g}" for g in sizes]
    step = " fwd+bwd" if cells[0][0].get("training") else ""
    unit = "µs (graph / eager)" if cells[0][0]["device"] == "cuda" else "µs"
    header = ["device", "dtype", "threads", "in→out", "sparsity", "batch", *(f"{label}{step} {unit}" for label in labels)]
    header += [f"{label} vs dense" for label in labels[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rows in cells:
        by = methods_by_name(rows)
        dense = by.get("dense")
        times = [time_text(by[m]) if m in by else "–" for m in methods]
        ratios = []
        for m in methods[1:]:
            good = dense is not None and not dense.get("unavailable") and m in by and not by[m].get("unavailable")
            ratios.append(ratio_text(speedup(dense, by[m])) if good else "–")
        lines.append("| " + " | ".join(context_columns(rows[0]) + times + ratios) + " |")
    return lines


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
        by = methods_by_name(rows)
        c = by.get("condensed", {})
        ok = bool(c) and not c.get("unavailable")
        ratios = []
        for m in others:
            other = by.get(m)
            good = ok and other is not None and not other.get("unavailable")
            ratios.append(ratio_text(speedup(other, c)) if good else "–")
        tail = [f"{c['gb_per_s']:.1f}", f"{c['gflop_per_s']:.1f}", f"{c['roofline_fraction']:.0%}"] if ok else ["–"] * 3
        times = [time_text(by[m]) if m in by else "–" for m in methods]
        lines.append("| " + " | ".join(context_columns(rows[0]) + times + ratios + tail) + " |")
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
        out.append(f"- {_machine_line(result)}: {_command_line(result)}")
    results, forced_results = _split_forced(results)
    results, grouped_results = _split_grouped(results)
    out += ["", "Measured peaks (the roofline; a copy much larger than the caches, a large dense matmul):", ""]
    out += _roofline_table(results)
    out += ["", "Methods: " + "; ".join(f"**{k}**: {v}" for k, v in _merged_methods(results).items()) + "."]

    rows = [row for result in results for row in result["rows"]]
    grouped_cells = list(_cells(row for result in grouped_results for row in result["rows"]).values())
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
    if forced_results:
        out += ["### Each kernel path forced", "",
                "The same cells with one CPU kernel path forced (environment variables, as listed above): the "
                "gather-free paths are what a CPU with slow gathers runs.", ""]
        out += _forced_paths_table(forced_results) + [""]
    if grouped_cells:
        out += ["### The grouped layout", "",
                "Runs of g output rows share their columns (`values [out/g, g, fan_in]`, `idx [out/g, fan_in]`; "
                "see docs/kernels.md), timed in the same interleaved rounds as dense and the row layout (g = 1). "
                "Accuracy of grouped SRigL against per-row SRigL: [accuracy.md](accuracy.md).", ""]
        for training in (False, True):
            cells = [cell for cell in grouped_cells if cell[0]["training"] == training]
            if cells:
                out += _grouped_table(cells) + [""]
    vits = [vit for result in results for vit in result.get("vit", [])]
    if vits:
        from condensed_ops.bench.vit import format_markdown

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


# ---- the README's summary: when it pays ------------------------------------------------------


def _inference_row(rows: Sequence[Row], window_max_batch: int) -> Optional[Row]:
    """What CondensedLinear runs for this cell's batch: the window layout up to
    window_max_batch rows (where measured), the row layout above."""
    by = methods_by_name(rows)
    use_window = rows[0]["batch"] <= window_max_batch and "condensed_packed" in by and not by["condensed_packed"].get("unavailable")
    row = by.get("condensed_packed" if use_window else "condensed")
    return None if row is None or row.get("unavailable") else row


def _speedup_text(cells: Sequence[List[Row]], baseline: str, window_max_batch: int) -> str:
    """'a / b' over the cells (one per thread count): inference path vs baseline."""
    texts = []
    for rows in cells:
        ours, base = _inference_row(rows, window_max_batch), methods_by_name(rows).get(baseline)
        good = ours is not None and base is not None and not base.get("unavailable")
        texts.append(f"{speedup(base, ours):.1f}×" if good else "–")
    return " / ".join(texts)


def _command_line(result: Dict[str, object]) -> str:
    forced = _forced_options(result)
    prefix = " ".join(f"CONDENSED_OPS_{k.upper()}={v}" for k, v in forced.items()) + (" " if forced else "")
    return f"`{prefix}{result['command']}`"


def render_summary(results: Sequence[Dict[str, object]], sources: Sequence[str] = (), details: str = "docs/results.md") -> str:
    """The README's "when it pays" tables: speed-up of what ``CondensedLinear`` runs
    (window layout up to ``WINDOW_MAX_BATCH`` rows, row layout above) over dense
    ``F.linear`` on the first CPU shape, per sparsity x batch; 16-bit and training
    lines when the results have them. Each table comes from one result file, the
    first that has its rows, and names the command that produced it."""
    out = [f"<!-- summary from: {' '.join(sources)} -->"] if sources else []
    results, _ = _split_forced(results)
    results, grouped_results = _split_grouped(results)
    cpu_rows = lambda result: [row for row in result["rows"] if row["device"] == "cpu"]  # noqa: E731
    rows = [row for result in results for row in cpu_rows(result)]
    if not rows:
        return "\n".join(out + ["No CPU results."]) + "\n"

    def source(wanted) -> tuple:
        """(the first result with rows matching `wanted`, those rows' cells)."""
        for result in results:
            matching = [row for row in cpu_rows(result) if wanted(row)]
            if matching:
                return result, _cells(matching)
        return None, {}

    kernels = results[0]["machine"]["cpu_kernels"]
    window_max_batch = int(kernels.get("window_max_batch", 0))
    threads = sorted({row["threads"] for row in rows})
    per_thread = " / ".join(f"{t} thread{'s' if t != 1 else ''}" for t in threads)
    out.append(f"Measured on {_machine_line(results[0])}; cells are {per_thread}. "
               f"Small-batch kernel here: {kernels.get('small_batch_kernel')} ({kernels.get('small_batch_reason')}). "
               f"Every number, and how to reproduce it: [{details}]({details}).")

    def grid(cells: Dict[tuple, List[Row]], shape: tuple) -> Dict[tuple, List[List[Row]]]:
        """(sparsity, batch) -> the cells of `shape`, one per thread count."""
        found: Dict[tuple, List[List[Row]]] = {}
        for (device, d, t, train, i, o, sparsity, batch), cell in cells.items():
            if (i, o) == shape:
                found.setdefault((sparsity, batch), []).append(cell)
        for key in found:
            found[key].sort(key=lambda cell: cell[0]["threads"])
        return found

    result, cells = source(lambda row: row["dtype"] == "float32" and not row["training"])
    if cells:
        first = next(iter(cells.values()))[0]
        shape = (first["in_features"], first["out_features"])
        g = grid(cells, shape)
        batches = sorted({k[1] for k in g})
        out += ["", f"**Forward, float32, {shape[0]}→{shape[1]}: speed-up over dense `F.linear`**", "",
                f"Command: {_command_line(result)}", ""]
        out += ["| sparsity | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for sparsity in sorted({k[0] for k in g}):
            out.append(f"| {sparsity:.0%} | " + " | ".join(_speedup_text(g.get((sparsity, b), []), "dense", window_max_batch) for b in batches) + " |")
    result, cells = source(lambda row: row["dtype"] in ("bfloat16", "float16") and not row["training"])
    if cells:
        cells32 = _cells(row for row in cpu_rows(result) if row["dtype"] == "float32" and not row["training"])
        lines: Dict[tuple, Dict[int, str]] = {}
        for (device, d, t, train, i, o, sparsity, batch), cell in cells.items():
            if t != threads[0]:
                continue
            f32 = cells32.get((device, "float32", t, train, i, o, sparsity, batch))
            ours = _inference_row(cell, window_max_batch)
            ours32 = _inference_row(f32, window_max_batch) if f32 else None
            vs32 = f"{speedup(ours32, ours):.2f}×" if ours is not None and ours32 is not None else "–"
            lines.setdefault((d, i, o, sparsity), {})[batch] = f"{_speedup_text([cell], 'dense', window_max_batch)} · {vs32}"
        batches16 = sorted({b for per_batch in lines.values() for b in per_batch})
        out += ["", f"**16-bit, forward, {per_thread.split(' / ')[0]}: speed-up over dense `F.linear` in the same dtype · "
                "over the float32 condensed layer**", "", f"Command: {_command_line(result)}", ""]
        out += ["| dtype | in→out | sparsity | " + " | ".join(f"batch {b}" for b in batches16) + " |", "|---|---|---|" + "---|" * len(batches16)]
        for (d, i, o, sparsity), per_batch in sorted(lines.items()):
            out.append(f"| {d} | {i}→{o} | {sparsity:.0%} | " + " | ".join(per_batch.get(b, "–") for b in batches16) + " |")
    result, cells = source(lambda row: row["dtype"] == "float32" and row["training"])
    if cells:
        out += ["", "**Forward + backward, float32: speed-up over `nn.Linear`**", "", f"Command: {_command_line(result)}", ""]
        shapes = list(dict.fromkeys(key[4:6] for key in cells))
        keys = sorted({key[6:8] for key in cells})
        out += ["| sparsity | batch | " + " | ".join(f"{i}→{o}" for i, o in shapes) + " |", "|---|---|" + "---|" * len(shapes)]
        for sparsity, batch in keys:
            out.append(f"| {sparsity:.0%} | {batch} | " + " | ".join(_speedup_text(grid(cells, shape).get((sparsity, batch), []), "dense", 0) for shape in shapes) + " |")
    out += _grouped_summary(grouped_results)
    return "\n".join(out).rstrip() + "\n"


def _grouped_summary(results: Sequence[Dict[str, object]]) -> List[str]:
    """Speed-up over dense of the row layout and each grouped layout (CPU, float32, forward),
    from the first result that has grouped rows; cells are the thread counts."""
    for result in results:
        rows = [row for row in result["rows"] if row["device"] == "cpu" and row["dtype"] == "float32" and not row["training"]]
        cells = list(_cells(rows).values())
        if cells:
            break
    else:
        return []
    sizes = sorted({g for cell in cells for row in cell if (g := group_size_of(str(row["method"]))) is not None})
    per_thread: Dict[tuple, List[List[Row]]] = {}
    for cell in cells:
        first = cell[0]
        per_thread.setdefault((first["in_features"], first["out_features"], first["sparsity"], first["batch"]), []).append(cell)
    out = ["", "**Grouped layout (runs of g outputs share their columns), the op, forward, float32: speed-up over "
           "dense `F.linear`, row layout (g = 1) and each g**", "", f"Command: {_command_line(result)}", ""]
    out += ["| in→out | sparsity | batch | g=1 | " + " | ".join(f"g={g}" for g in sizes) + " |", "|---|---|---|---|" + "---|" * len(sizes)]
    for (i, o, sparsity, batch), by_threads in sorted(per_thread.items()):
        by_threads.sort(key=lambda cell: cell[0]["threads"])
        texts = []
        for method in ["condensed"] + [f"grouped{g}" for g in sizes]:
            ratios = []
            for cell in by_threads:
                by = methods_by_name(cell)
                ok = "dense" in by and method in by and not by[method].get("unavailable")
                ratios.append(f"{speedup(by['dense'], by[method]):.1f}×" if ok else "–")
            texts.append(" / ".join(ratios))
        out.append(f"| {i}→{o} | {sparsity:.0%} | {batch} | " + " | ".join(texts) + " |")
    return out


def update_section(path: str, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces what sits between the markers ``begin`` and ``end`` in ``path``."""
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers to replace")
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{section}{end}", text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


def update_readme(readme: str, section: str) -> None:
    update_section(readme, section)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON files written by python -m condensed_ops.bench --json")
    parser.add_argument("--readme", help="replace the README's marked summary (else print it)")
    parser.add_argument("--results-doc", help="replace the marked full results in this file (else print them)")
    parser.add_argument("--figures", help="write the PNG figures here and embed them (paths relative to the results document)")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        with open(path) as f:
            results.append(json.load(f))
    doc_dir = os.path.dirname(os.path.abspath(args.results_doc)) if args.results_doc else os.getcwd()
    readme_dir = os.path.dirname(os.path.abspath(args.readme)) if args.readme else os.getcwd()
    figures: List[str] = []
    if args.figures:
        from condensed_ops.bench.plots import write_figures

        plain, _ = _split_grouped(results)
        merged = dict(plain[0], rows=[row for r in plain for row in r["rows"]], rooflines=[x for r in plain for x in r["rooflines"]])
        figures = [os.path.relpath(p, doc_dir) for p in write_figures(merged, args.figures)]
    section = render_markdown(results, figures, [os.path.relpath(path, doc_dir) for path in args.results])
    details = os.path.relpath(os.path.abspath(args.results_doc), readme_dir) if args.results_doc else "docs/results.md"
    summary = render_summary(results, [os.path.relpath(path, readme_dir) for path in args.results], details)
    if args.results_doc:
        update_section(args.results_doc, section)
        print(f"updated {args.results_doc}")
    else:
        print(section)
    if args.readme:
        update_section(args.readme, summary, SUMMARY_BEGIN, SUMMARY_END)
        print(f"updated {args.readme}")
    else:
        print(summary)


if __name__ == "__main__":
    main()
