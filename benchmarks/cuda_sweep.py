"""Times every variant of the CUDA row-layout forward against dense cuBLAS and
torch.sparse CSR, per (dtype, shape, sparsity, batch), in one interleaved run,
and reports where the planner's own pick (``auto``) is more than 10% slower
than the best variant.

A variant forces the kernel options ``cuda_lanes_per_row``,
``cuda_packs_in_flight`` and ``cuda_splits`` at batch <= 16 (where rows can be
too few to fill the GPU and the weights' bytes bound the time), and
``cuda_lanes_per_row`` with ``cuda_batch_tile`` above (where the gathers do);
``rule`` is the planner's rule alone (``cuda_tuned=off``), ``auto`` what a user
gets (the committed measured table first, csrc/kernels/cuda/tuned_forward.inc).
``--emit-table PATH`` writes that table's lines for this GPU: every case whose
best variant beats the rule by more than 5%. Times are CUDA-graph replays (``condensed_ops.bench.timing``); each
call takes the next of several weight sets, together more than twice the L2,
so the weights stream from device memory as they would in a model. The copy
bandwidth of the same GPU (a 512 MB device-to-device copy, graph replay) is
measured in the same run: each case reports the share of it that its bytes
(values + idx + x + y) reach.

    python benchmarks/cuda_sweep.py                    # the issue's shapes, ~3 minutes on an H100
    python benchmarks/cuda_sweep.py --quick            # two shapes, bf16, batch 1 and 256
    python benchmarks/cuda_sweep.py --json sweep.json  # raw rows (default: $OUT/cuda_sweep.json when $OUT is set)
    python benchmarks/cuda_sweep.py --emit-table csrc/kernels/cuda/tuned_forward.inc

Prints a markdown table; needs a CUDA device and the built extension
(``--device cpu`` runs the same script on the CPU ops, where the CUDA options
change nothing: the script's own test).
"""

import argparse
import itertools
import json
import math
import os
import sys
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

import condensed_ops
from condensed_ops.bench.methods import fan_in_for_sparsity, random_layer
from condensed_ops.bench.timing import time_interleaved, with_tf32
from condensed_ops.layout import to_dense

SHAPES = ["768x3072", "3072x768", "4096x14336", "14336x4096", "1024x4096", "2048x8192", "8192x28672"]
LANES = ("4", "8", "16", "32")
PACKS = ("2", "4")
SPLITS = ("1", "2", "4", "8")
TILES = ("2", "4", "8", "16")
SMALL_BATCH = 16
L2_MULTIPLE = 2.5  # weight sets cover this many times the L2
IMPROVEMENT_TO_TABLE = 1.05


def variants(batch: int, dtype: torch.dtype = torch.bfloat16) -> Dict[str, Dict[str, str]]:
    """``{name: kernel options}``: what users get, the rule alone, then the forced combinations."""
    out: Dict[str, Dict[str, str]] = {"auto": {}, "rule": dict(cuda_tuned="off")}
    if batch <= SMALL_BATCH:
        for lanes, packs, splits in itertools.product(LANES, PACKS, SPLITS):
            out[f"l{lanes}p{packs}s{splits}"] = dict(cuda_lanes_per_row=lanes, cuda_packs_in_flight=packs,
                                                    cuda_splits=splits)
    else:
        largest = 16 // max(1, torch.empty((), dtype=dtype).element_size() // 2)  # kMaxBatchTile: 16, 8, 4
        for lanes, tile in itertools.product(LANES, [t for t in TILES if int(t) <= largest]):
            out[f"l{lanes}t{tile}"] = dict(cuda_lanes_per_row=lanes, cuda_batch_tile=tile)
    return out


def table_line(row: dict, capability: int) -> str:
    """The row's best variant as a TunedForward initializer (tuned_forward.inc)."""
    options = variants(row["batch"], getattr(torch, row["dtype"]))[row["best"]]
    number = lambda name: int(options.get(name, "0"))  # noqa: E731
    in_features, out_features = map(int, row["shape"].split("x"))
    element = torch.empty((), dtype=getattr(torch, row["dtype"])).element_size()
    # Unforced fields keep the rule's value in plan_forward: 0 there is "the rule's".
    return (f"{{{capability}, {element}, {row['batch']}, {in_features}, {out_features}, {row['fan_in']}, "
            f"{{XAccess::Auto, {number('cuda_lanes_per_row')}, {number('cuda_packs_in_flight')}, "
            f"{number('cuda_splits')}, {number('cuda_batch_tile')}}}}},  // {row['dtype']}, "
            f"{row['rule_over_best']:.2f}x the rule")


def forced(call: Callable[[], object], options: Dict[str, str]) -> Callable[[], object]:
    def run() -> object:
        with condensed_ops.kernel_options(**options):
            return call()

    return run


def rotating(sets: Sequence[tuple], call: Callable[..., object]) -> Callable[[], object]:
    """A call that takes the next weight set each time (graph capture records each)."""
    cycle = itertools.cycle(sets)
    return lambda: call(*next(cycle))


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a 512 MB (CPU: 64 MB) copy on the device, read + write counted."""
    src = torch.empty((512 if device.type == "cuda" else 64) << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, rounds=10)["copy"]
    return 2 * src.numel() / t.kernel_seconds


def last_level_cache(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 32 << 20


def sweep_case(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int, sparsity: float,
               batch: int, rounds: int, max_seconds: float, copy_bytes_per_s: float) -> dict:
    l2 = last_level_cache(device)
    fan_in = fan_in_for_sparsity(sparsity, in_features)
    element = torch.empty((), dtype=dtype).element_size()
    weight_bytes = out_features * fan_in * (element + 2)
    n_sets = max(2, min(64, math.ceil(L2_MULTIPLE * l2 / weight_bytes)))
    layers = [random_layer(in_features, out_features, sparsity, dtype, device, seed=s) for s in range(n_sets)]
    x = torch.randn(batch, in_features, device=device, dtype=dtype)
    dense_sets = [(to_dense(layer.values, layer.idx, in_features),) for layer in layers[: max(2, math.ceil(L2_MULTIPLE * l2 / (out_features * in_features * element)))]]

    # Every variant against float64 first: a fast wrong variant is no variant.
    reference = x.double() @ to_dense(layers[0].values.double(), layers[0].idx, in_features).t()
    errors = {}
    calls: Dict[str, Callable[[], object]] = {}
    for name, options in variants(batch, dtype).items():
        with condensed_ops.kernel_options(**options):
            y = condensed_ops.condensed_linear(x, layers[0].values, layers[0].idx)
        errors[name] = ((y.double() - reference).norm() / reference.norm()).item()
        calls[name] = forced(rotating([(layer.values, layer.idx) for layer in layers],
                                      lambda v, i: condensed_ops.condensed_linear(x, v, i)), options)
    dense = rotating(dense_sets, lambda w: F.linear(x, w))
    calls["dense"] = with_tf32(dense, False)
    if dtype == torch.float32:
        calls["dense_tf32"] = with_tf32(dense, True)
    try:  # (torch.sparse has no CSR conversion or matmul for some dtypes on some devices)
        csr = dense_sets[0][0].to_sparse_csr()
        torch.sparse.mm(csr, x.t())
        calls["csr"] = lambda: torch.sparse.mm(csr, x.t())
    except RuntimeError:
        pass
    times = time_interleaved(calls, device, rounds=rounds, max_seconds=max_seconds)
    us = {name: t.kernel_seconds * 1e6 for name, t in times.items()}
    variant_us = {name: us[name] for name in variants(batch, dtype)}
    best = min((name for name in variant_us if name not in ("auto", "rule")), key=variant_us.get)
    if variant_us["rule"] <= variant_us[best]:
        best = "rule"
    moved = weight_bytes + (batch * (in_features + out_features)) * element
    return dict(
        dtype=str(dtype).replace("torch.", ""), shape=f"{in_features}x{out_features}", sparsity=sparsity, batch=batch,
        fan_in=fan_in, weight_sets=n_sets, us=us, rel_err=errors, best=best,
        auto_over_best=variant_us["auto"] / variant_us[best], rule_over_best=variant_us["rule"] / variant_us[best],
        auto_vs_dense=us["dense"] / us["auto"], best_vs_dense=us["dense"] / us[best],
        auto_vs_dense_tf32=us["dense_tf32"] / us["auto"] if "dense_tf32" in us else None,
        auto_vs_csr=us["csr"] / us["auto"] if "csr" in us else None,
        auto_copy_bandwidth_share=moved / (us["auto"] * 1e-6) / copy_bytes_per_s,
    )


def table(rows: List[dict]) -> str:
    lines = ["| dtype | in→out | sparsity | batch | dense µs | auto µs | best | best µs | auto/best | auto vs dense | vs TF32 | vs CSR | copy bw | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = " **>10%**" if r["auto_over_best"] > 1.1 else ""
        tf32 = f"{r['auto_vs_dense_tf32']:.2f}×" if r["auto_vs_dense_tf32"] else "—"
        csr = f"{r['auto_vs_csr']:.1f}×" if r["auto_vs_csr"] else "—"
        lines.append(
            f"| {r['dtype']} | {r['shape'].replace('x', '→')} | {r['sparsity']:.0%} | {r['batch']} | {r['us']['dense']:.1f} | "
            f"{r['us']['auto']:.1f} | {r['best']} | {r['us'][r['best']]:.1f} | {r['auto_over_best']:.2f}{flag} | "
            f"{r['auto_vs_dense']:.2f}× | {tf32} | {csr} | {r['auto_copy_bandwidth_share']:.0%} | "
            f"{max(r['rel_err'].values()):.1e} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=0.5, help="time budget per case's timing rounds")
    parser.add_argument("--quick", action="store_true", help="4096x14336 and 768x3072, bf16, batch 1 and 256")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--emit-table", default=None, metavar="PATH",
                        help="write tuned_forward.inc lines for this GPU's cases where a variant beats the rule by > 5%%")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.dtype, args.batch = ["4096x14336", "768x3072"], ["bfloat16"], [1, 256]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    path = args.json or (os.path.join(os.environ["OUT"], "cuda_sweep.json") if os.environ.get("OUT") else None)
    rows, failed = [], 0
    for dtype_name, shape, sparsity, batch in itertools.product(args.dtype, args.shapes, args.sparsity, args.batch):
        in_features, out_features = map(int, shape.split("x"))
        try:
            rows.append(sweep_case(device, getattr(torch, dtype_name), in_features, out_features, sparsity, batch,
                                   args.rounds, args.max_seconds, bandwidth))
        except Exception as error:  # noqa: BLE001 -- keep sweeping; the row says why
            print(f"{dtype_name} {shape} {sparsity} batch {batch}: {type(error).__name__}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if path:  # after every case: a sweep cut short keeps what it measured
            with open(path, "w") as f:
                json.dump(dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                               copy_bandwidth_bytes_per_s=bandwidth, rows=rows), f, indent=1)
    print()
    print(table(rows))
    off = [r for r in rows if r["auto_over_best"] > 1.1]
    print(f"\nthe planner's pick is > 10% slower than the best variant in {len(off)} of {len(rows)} cases")
    if args.emit_table and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        lines = [table_line(r, 10 * major + minor) for r in rows
                 if r["best"] != "rule" and r["rule_over_best"] > IMPROVEMENT_TO_TABLE]
        with open(args.emit_table, "a") as f:
            f.write(f"// {name}, torch {torch.__version__}: benchmarks/cuda_sweep.py\n" + "".join(l + "\n" for l in lines))
        print(f"{len(lines)} table lines appended to {args.emit_table}")
    wrong = [r for r in rows if max(r["rel_err"].values()) > 2e-2]
    if failed or not rows:
        print(f"{failed} cases failed, {len(rows)} measured", file=sys.stderr)
    return 1 if wrong or failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
