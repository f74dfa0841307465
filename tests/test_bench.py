"""The benchmark suite: its methods compute the layer, its figures add up, its CLI
refuses impossible requests, and the README's Results section is what the report
renders from the committed JSON."""

import importlib.util
import json
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import condensed_ops
from condensed_ops.bench import methods as bench_methods
from condensed_ops.bench.__main__ import main
from condensed_ops.bench.timing import time_interleaved

# The README / results-doc renderer is repository tooling (benchmarks/report.py), not the package.
_spec = importlib.util.spec_from_file_location("report", pathlib.Path(__file__).parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
BEGIN, END, SUMMARY_BEGIN, SUMMARY_END = report.BEGIN, report.END, report.SUMMARY_BEGIN, report.SUMMARY_END
render_markdown, render_summary, update_readme = report.render_markdown, report.render_summary, report.update_readme

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reference(layer, x):
    dense = condensed_ops.to_dense(layer.values.double(), layer.idx.long(), layer.in_features)
    return F.linear(x.double(), dense)


@pytest.mark.parametrize("in_features, out_features, sparsity, batch", [(64, 48, 0.9, 1), (37, 29, 0.5, 7), (300, 10, 0.99, 33)])
def test_every_cpu_method_computes_the_layer(in_features, out_features, sparsity, batch):
    layer = bench_methods.random_layer(in_features, out_features, sparsity, seed=3)
    assert layer.fan_in == bench_methods.fan_in_for_sparsity(sparsity, in_features)
    assert bool((layer.idx.long().diff(dim=1) > 0).all()), "columns are distinct and ascending"
    for method in bench_methods.layer_methods(layer, batch, bench_methods.CPU_METHODS):
        assert method.unavailable is None, method.unavailable
        torch.testing.assert_close(method.call().double(), _reference(layer, method.x), rtol=1e-5, atol=1e-5, msg=method.name)


def test_figures_of_a_method():
    layer = bench_methods.random_layer(64, 48, 0.9)
    batch, element = 5, 4
    by = {m.name: m for m in bench_methods.layer_methods(layer, batch, bench_methods.CPU_METHODS)}
    activations = (batch * 64 + batch * 48) * element
    assert by["condensed"].bytes_moved == layer.nnz * (element + 2) + activations  # int16 indices
    assert by["gather"].bytes_moved == layer.nnz * (element + 8) + activations  # int64 indices
    assert by["dense"].bytes_moved == 48 * 64 * element + activations
    assert by["csr"].bytes_moved == layer.nnz * (element + 8) + 49 * 8 + activations
    packed = condensed_ops.pack_for_inference(layer.values, layer.idx, 64)
    assert by["condensed_packed"].bytes_moved == packed.numel() + activations
    assert by["condensed"].flops == by["csr"].flops == by["condensed_packed"].flops == 2 * batch * layer.nnz
    assert by["dense"].flops == 2 * batch * 48 * 64

    trained = {m.name: m for m in bench_methods.layer_methods(layer, batch, ["condensed", "dense"], training=True)}
    assert trained["condensed"].flops == 3 * by["condensed"].flops
    # forward + grad_x read the weights, grad_values writes the values' gradient
    assert trained["condensed"].bytes_moved == 2 * layer.nnz * (element + 2) + layer.nnz * element + 3 * activations


def test_sixteen_bit_layers_add_dense_float32():
    layer = bench_methods.random_layer(64, 48, 0.9, dtype=torch.bfloat16)
    names = bench_methods.available_methods(torch.device("cpu"), torch.bfloat16)
    assert "dense_fp32" in names and "dense_fp32" not in bench_methods.available_methods(torch.device("cpu"))
    by = {m.name: m for m in bench_methods.layer_methods(layer, 3, names)}
    y = by["dense_fp32"].call()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(layer, by["dense_fp32"].x), rtol=1e-5, atol=1e-5)
    float_layer = bench_methods.random_layer(64, 48, 0.9)
    assert bench_methods.layer_methods(float_layer, 3, ["dense_fp32"])[0].unavailable == "the dense method of a float32 layer"


def test_training_methods_produce_gradients():
    layer = bench_methods.random_layer(40, 24, 0.8)
    for method in bench_methods.layer_methods(layer, 6, ["condensed", "dense", "gather"], training=True):
        assert method.unavailable is None, method.unavailable
        method.call()
    packed = bench_methods.layer_methods(layer, 6, ["condensed_packed"], training=True)[0]
    assert packed.call is None and packed.unavailable == "inference only"
    csr = bench_methods.layer_methods(layer, 6, ["csr"], training=True)[0]
    assert csr.call is None or csr.unavailable is None  # whichever torch supports, never an exception


def test_unavailable_methods_say_why(monkeypatch):
    layer = bench_methods.random_layer(64, 48, 0.9)
    monkeypatch.setattr(bench_methods, "GATHER_INTERMEDIATE_LIMIT_BYTES", 1000)
    by = {m.name: m for m in bench_methods.layer_methods(layer, 4, ["gather", "dense_tf32", "semi_structured"])}
    assert by["gather"].call is None and "skipped" in by["gather"].unavailable
    assert by["dense_tf32"].unavailable == by["semi_structured"].unavailable == "CUDA only"
    half = bench_methods.random_layer(64, 48, 0.9, dtype=torch.float16)
    csr = bench_methods.layer_methods(half, 2, ["csr"])[0]
    if csr.call is None:  # CPU torch has no half CSR matmul: reported, not raised
        assert csr.unavailable.startswith("unsupported:")
    with pytest.raises(ValueError, match="unknown methods"):
        bench_methods.layer_methods(layer, 1, ["condensed", "cusparse"])


def test_time_interleaved_orders_calls_by_cost():
    small, big = torch.randn(64, 64), torch.randn(384, 384)
    t = time_interleaved({"small": lambda: small @ small, "big": lambda: big @ big}, rounds=5)
    assert t["big"].seconds > t["small"].seconds > 0
    assert t["small"].graph_seconds is None and t["small"].kernel_seconds == t["small"].seconds


def test_cli_json_plot_and_report(tmp_path, capsys):
    out_json, figures = tmp_path / "r.json", tmp_path / "fig"
    main(["--shapes", "64x48", "33x70", "--sparsity", "0.5", "0.9", "--batch", "1", "9", "--threads", "1",
          "--rounds", "2", "--json", str(out_json), "--plot", str(figures), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| cpu | float32 | 1 | 33→70 | 90% | 9 |" in printed
    results = json.loads(out_json.read_text())
    assert results["command"].startswith("python -m condensed_ops.bench --shapes 64x48")
    assert results["machine"]["torch"] == torch.__version__
    rows = results["rows"]
    assert len(rows) == 2 * 2 * 2 * len(bench_methods.CPU_METHODS)
    for row in rows:
        assert row["kernel_seconds"] == row["seconds"] > 0
        assert row["gb_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)
        assert row["gflop_per_s"] == pytest.approx(row["flops"] / row["seconds"] / 1e9)
        assert row["roofline_fraction"] > 0
        if row["method"] == "dense":
            assert row["speedup_vs_dense"] == 1.0
    assert {(r["dtype"], r["threads"]) for r in results["rooflines"]} == {("float32", 1)}
    pngs = sorted(p.name for p in figures.iterdir())
    assert pngs == ["headline_cpu_float32.png", "roofline_cpu_float32_1t.png", "speedup_cpu_float32_1t.png"]
    assert all((figures / p).read_bytes().startswith(PNG_MAGIC) for p in pngs)

    section = render_markdown([results], [f"fig/{p}" for p in pngs])
    assert "### 90% sparse, batch 1" in section and "![headline_cpu_float32](fig/headline_cpu_float32.png)" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    update_readme(str(readme), section)
    assert readme.read_text() == f"intro\n{BEGIN}\n{section}{END}\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(str(readme), section)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "CUDA"),
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--shapes", "768"], "shape must be IN x OUT"),
        (["--batch", "0"], "positive"),
        (["--threads", "100000"], "logical CPUs"),
        (["--dtype", "float64", "--device", "cpu", "cuda"], None),
        (["--methods", "nope"], "invalid choice"),
    ],
)
def test_cli_refuses_impossible_requests(argv, message, capsys):
    if message is None:  # float64 on CUDA: whichever check comes first, it exits with a message
        message = "cuda"
    if argv[:2] == ["--device", "cuda"] and condensed_ops._C.with_cuda and torch.cuda.is_available():
        pytest.skip("this build can run on CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--no-progress"])
    assert exit_info.value.code == 2
    assert message.lower() in capsys.readouterr().err.lower()


def _generated(path, begin, end):
    text = (ROOT / path).read_text()
    section = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
    assert section, f"{path} has no generated section"
    return section.group(1)


def test_results_doc_is_rendered_from_the_committed_json():
    section = _generated("docs/results.md", BEGIN, END)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", section)
    for figure in figures:
        assert (ROOT / "docs" / figure).read_bytes().startswith(PNG_MAGIC), figure
    sources = re.match(r"<!-- results from: (.*) -->", section)
    assert sources, "the section does not name its result files"
    results = [json.loads((ROOT / "docs" / name).read_text()) for name in sources.group(1).split()]
    assert render_markdown(results, figures, sources.group(1).split()) == section
    assert "Each kernel path forced" in section


def test_readme_summary_is_rendered_from_the_committed_json():
    section = _generated("README.md", SUMMARY_BEGIN, SUMMARY_END)
    sources = re.match(r"<!-- summary from: (.*) -->", section)
    assert sources, "the summary does not name its result files"
    results = [json.loads((ROOT / name).read_text()) for name in sources.group(1).split()]
    assert render_summary(results, sources.group(1).split()) == section
    assert "docs/results.md" in section


def test_summary_uses_the_window_layout_where_modules_do():
    def row(method, seconds, batch):
        return dict(device="cpu", dtype="float32", threads=1, training=False, in_features=8, out_features=4,
                    sparsity=0.9, batch=batch, method=method, seconds=seconds, kernel_seconds=seconds)

    machine = dict(cpu="cpu", logical_cpus=1, torch="t", condensed_ops="v", date="2026-01-01",
                   cpu_kernels=dict(active_isa="avx2", window_max_batch=4, small_batch_kernel="scalar",
                                    small_batch_reason="r", kernel_options={}))
    rows = [row("dense", 8.0, 1), row("condensed", 4.0, 1), row("condensed_packed", 2.0, 1),
            row("dense", 8.0, 16), row("condensed", 4.0, 16), row("condensed_packed", 1.0, 16)]
    summary = render_summary([dict(machine=machine, rows=rows, command="c")])
    assert "| 90% | 4.0× | 2.0× |" in summary  # packed at batch 1, the row layout at batch 16


def test_cli_vit_only(tmp_path, monkeypatch, capsys):
    from condensed_ops.bench import vit

    tiny = dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_width=256, num_classes=10)
    monkeypatch.setattr(vit, "VIT_B16", tiny)
    out_json = tmp_path / "vit.json"
    main(["--no-sweep", "--vit", "--vit-attention", "--vit-batch", "1", "2", "--json", str(out_json), "--no-progress"])
    results = json.loads(out_json.read_text())
    assert results["rows"] == []
    assert [v["include_attention"] for v in results["vit"]] == [False, True]
    assert all(row["outputs_match"] for v in results["vit"] for row in v["rows"])
    assert "End to end" in render_markdown([results])
    with pytest.raises(SystemExit):
        main(["--no-sweep", "--no-progress"])
    assert "nothing to run" in capsys.readouterr().err


def test_each_summary_table_comes_from_one_result_and_names_its_command():
    def row(method, seconds, dtype="float32"):
        return dict(device="cpu", dtype=dtype, threads=1, training=False, in_features=8, out_features=4,
                    sparsity=0.9, batch=1, method=method, seconds=seconds, kernel_seconds=seconds)

    machine = dict(cpu="cpu", logical_cpus=1, torch="t", condensed_ops="v", date="2026-01-01",
                   cpu_kernels=dict(active_isa="avx2", window_max_batch=0, small_batch_kernel="scalar",
                                    small_batch_reason="r", kernel_options={}))
    first = dict(machine=machine, rows=[row("dense", 8.0), row("condensed", 4.0)], command="first")
    # A later run of the same float32 cell must not replace the first table's numbers.
    second = dict(machine=machine, command="second",
                  rows=[row("dense", 9.0), row("condensed", 1.0), row("dense", 6.0, "bfloat16"), row("condensed", 2.0, "bfloat16")])
    summary = render_summary([first, second])
    forward, sixteen = summary.split("**16-bit")
    assert "Command: `first`" in forward and "| 90% | 2.0× |" in forward
    assert "Command: `second`" in sixteen and "3.0× · 0.50×" in sixteen


def test_grouped_methods_compute_their_grouped_layer(tmp_path, capsys):
    layer = bench_methods.random_layer(64, 48, 0.9, seed=5)
    x = torch.randn(9, 64)
    for method in bench_methods.layer_methods(layer, 9, ["grouped4", "grouped5"]):
        if method.name == "grouped5":
            assert method.unavailable == "5 does not divide out_features=48"
            continue
        # Each run of 4 rows reads the columns of its first row.
        idx = layer.idx[::4].repeat_interleave(4, 0)
        dense = condensed_ops.to_dense(layer.values.double(), idx.long(), 64)
        torch.testing.assert_close(method.call().double(), F.linear(method.x.double(), dense), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grouped<g>"):
        bench_methods.layer_methods(layer, 1, ["grouped1"])
    out_json = tmp_path / "grouped.json"
    main(["--shapes", "64x48", "--sparsity", "0.9", "--batch", "3", "--threads", "1", "--methods", "condensed", "dense",
          "--group", "1", "4", "--rounds", "3", "--json", str(out_json), "--no-progress"])
    results = json.loads(out_json.read_text())
    assert sorted(row["method"] for row in results["rows"]) == ["condensed", "dense", "grouped4"]
    assert "runs of 4 output rows" in results["methods"]["grouped4"]
    grouped = next(row for row in results["rows"] if row["method"] == "grouped4")
    assert grouped["speedup_vs_dense"] > 0


def test_training_steps_cell_times_all_three_trainers(monkeypatch):
    """The --train-model cell on a small stand-in model: every method steps, update
    steps really rewire (the trainer asserts it), and the amortized figures add up."""
    from condensed_ops.bench import training

    monkeypatch.setattr(training, "build_model", lambda kind: training.ResidualMLP(width=32, hidden=64, blocks=2))
    monkeypatch.setattr(training, "_inputs", lambda kind, batch, generator: torch.randn(batch, 32, generator=generator))
    cell = training.time_training("mlp", batch=16, threads=1, delta_t=10, rounds=2)
    seconds, amortized = cell["seconds"], cell["amortized_seconds"]
    assert set(amortized) == set(training.METHODS)
    for method in training.METHODS:
        expected = (9 * seconds[f"{method} step"] + seconds[f"{method} update"]) / 10
        assert amortized[method] == pytest.approx(expected)
    assert cell["speedup_vs_dense"] == pytest.approx(amortized["dense"] / amortized["condensed"])
    assert "| mlp | 16 | 1 |" in training.format_markdown([cell])


_sweep_spec = importlib.util.spec_from_file_location(
    "cuda_sweep", pathlib.Path(__file__).parents[1] / "benchmarks" / "cuda_sweep.py"
)
cuda_sweep = importlib.util.module_from_spec(_sweep_spec)
_sweep_spec.loader.exec_module(cuda_sweep)


def test_cuda_variant_sweep_runs_end_to_end_on_the_cpu_ops(tmp_path, capsys):
    """The GPU's variant sweep (benchmarks/cuda_sweep.py) exercised here on the
    CPU ops, where the CUDA options change nothing: a script bug must not cost
    GPU time. Every variant name sets options the extension accepts."""
    out = tmp_path / "sweep.json"
    argv = ["--device", "cpu", "--shapes", "40x24", "--batch", "1", "17", "--dtype", "float32", "bfloat16",
            "--rounds", "2", "--max-seconds", "0.02", "--json", str(out)]
    assert cuda_sweep.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [("float32", 1), ("float32", 17), ("bfloat16", 1), ("bfloat16", 17)]
    for row in rows:
        names = set(cuda_sweep.variants(row["batch"], getattr(torch, row["dtype"])))
        assert names <= set(row["us"]) and "dense" in row["us"]
        assert max(row["rel_err"].values()) < 2e-2
        assert row["rule_over_best"] >= 1.0 and row["best"] != "auto"
        line = cuda_sweep.table_line(row, 90)
        assert line.startswith(f"{{90, {2 if row['dtype'] == 'bfloat16' else 4}, {row['batch']}, 40, 24, 4, {{XAccess::Auto, ")
    assert len(cuda_sweep.variants(1)) == 2 + 4 * 2 * 4
    assert len(cuda_sweep.variants(256, torch.bfloat16)) == 2 + 4 * 4
    assert len(cuda_sweep.variants(256, torch.float32)) == 2 + 4 * 3
    assert "| float32 | 40→24 |" in capsys.readouterr().out
