"""Condensed vs dense vs torch.sparse CSR vs the paper's gather, swept.

    python -m condensed_ops.bench --quick                      # < 1 min: the headline cells
    python -m condensed_ops.bench --json results.json --plot figures/
    python -m condensed_ops.bench --device cuda --dtype bfloat16 float32
    python -m condensed_ops.bench --training --batch 256       # forward + backward
    python -m condensed_ops.bench --no-sweep --vit              # ViT-B/16 end to end only
    python -m condensed_ops.bench --no-sweep --train-model mlp vit  # whole training steps, SRigL sparse-to-sparse
    python -m condensed_ops.bench --no-sweep --model bert vit resnet50  # whole models from transformers configs

Every cell times its methods interleaved (each round calls every method once, in
a fresh random order) and reports medians; on CUDA both eager per-call time and
CUDA-graph replay time (derived figures use the latter). Each row also has the
bytes its format moves, GB/s, GFLOP/s and the fraction of the machine's roofline
(a large copy and a dense matmul, measured in the same run).
The README and docs/results.md tables are rendered from the JSON by the repository's ``benchmarks/report.py``.
"""

import argparse
import itertools
import json
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .models import FAMILIES as MODEL_FAMILIES
from .methods import METHOD_DESCRIPTIONS
from .cells import cell_header, format_cell
from .sweep import SweepConfig, run_sweep

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
QUICK = dict(shapes=[(768, 3072), (3072, 768)], sparsities=[0.9], batches=[1, 256], rounds=7, max_seconds_per_cell=3.0)
CUDA_SHAPES = [(768, 3072), (3072, 768), (4096, 14336), (14336, 4096)]


def _shape(text: str) -> Tuple[int, int]:
    try:
        in_features, out_features = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be IN x OUT like 768x3072, got {text!r}") from None
    if in_features < 1 or out_features < 1:
        raise argparse.ArgumentTypeError(f"shape sizes must be positive, got {text!r}")
    return in_features, out_features


def _sparsity(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1) (0.9 = 90% zeros), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m condensed_ops.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="768x3072 and 3072x768 at 90%%, batch 1 and 256, 1 thread, 7 rounds (under a minute); explicit options still apply")
    p.add_argument("--shapes", type=_shape, nargs="+", metavar="INxOUT", help="layer shapes, in_features x out_features (default: ViT-B/16's MLP 768x3072 3072x768; on CUDA also 4096x14336 14336x4096)")
    p.add_argument("--sparsity", type=_sparsity, nargs="+", help="fraction of zeros (default 0.5 0.8 0.9 0.95 0.99)")
    p.add_argument("--batch", type=_positive, nargs="+", help="rows of x (default 1 4 16 64 256 1024 4096)")
    p.add_argument("--dtype", choices=DTYPES, nargs="+", default=["float32"])
    p.add_argument("--device", choices=["cpu", "cuda"], nargs="+", default=["cpu"])
    p.add_argument("--threads", type=_positive, nargs="+", help=f"CPU threads (default: 1 and {torch.get_num_threads()})")
    p.add_argument("--methods", choices=list(METHOD_DESCRIPTIONS), nargs="+", help="default: all the device has")
    p.add_argument(
        "--group",
        type=_positive,
        nargs="+",
        default=[],
        metavar="G",
        help="also time the grouped layout with runs of G output rows sharing their columns (method grouped<G>; 1 is 'condensed')",
    )
    p.add_argument("--training", action="store_true", help="time forward + backward (grads to x and weights)")
    p.add_argument("--rounds", type=_positive, help="interleaved rounds per cell (default 15)")
    p.add_argument("--max-seconds", type=float, help="fewer rounds (at least 3) when a cell would take longer (default 5)")
    p.add_argument("--json", metavar="PATH", help="write the results, machine and command as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG figures (needs matplotlib)")
    p.add_argument("--vit", action="store_true", help="also run a ViT-B/16-sized encoder end to end, MLPs condensed at 90%%")
    p.add_argument("--vit-batch", type=_positive, nargs="+", default=[1, 64, 256], help="ViT batch sizes (default 1 64 256)")
    p.add_argument("--vit-attention", action="store_true", help="also run it with the attention projections condensed")
    p.add_argument(
        "--train-model",
        choices=["mlp", "vit"],
        nargs="+",
        default=[],
        help="also time whole training steps (AdamW) of dense training, masked-dense SRigL and SRigL over condensed layers: "
        "mlp = 4 residual 1024-4096-1024 blocks, vit = a small ViT (32x32 images, width 256, 4 blocks); at the first --sparsity (default 0.9)",
    )
    p.add_argument("--train-batch", type=_positive, nargs="+", default=[128, 256], help="training batch sizes (default 128 256)")
    p.add_argument("--delta-t", type=_positive, default=100, help="SRigL steps between mask updates, for the amortized step (default 100)")
    p.add_argument(
        "--model",
        choices=list(MODEL_FAMILIES),
        nargs="+",
        default=[],
        help="also time whole models built from configs (nothing downloaded: transformers, timm, torchvision), dense against "
        "condensed with every Linear / Conv2d / Conv1D magnitude-pruned to the first --sparsity (default 0.9), CPU float32",
    )
    p.add_argument("--model-batch", type=_positive, nargs="+", default=[1, 32], help="batch sizes for --model (default 1 32)")
    p.add_argument("--model-size", choices=["bench", "tiny"], default="bench", help="--model configs: the published sizes, or test-sized ones")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="--no-sweep runs only what else is asked (--vit, --train-model, --model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_devices(parser: argparse.ArgumentParser, devices: Sequence[str]) -> List[torch.device]:
    from .. import _C

    if "cuda" in devices:
        if not _C.with_cuda:
            cuda = "a CPU-only torch" if torch.version.cuda is None else f"torch {torch.__version__} (CUDA {torch.version.cuda})"
            parser.error(f"--device cuda: this condensed_ops build has no CUDA kernels (built against {cuda}); rebuild on a CUDA machine")
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return [torch.device(d) for d in devices]


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SweepConfig:
    devices = _check_devices(parser, args.device)
    if args.threads and devices == [torch.device("cuda")]:
        parser.error("--threads applies to --device cpu only")
    if args.threads and max(args.threads) > (os.cpu_count() or 1):
        parser.error(f"--threads {max(args.threads)}: this machine has {os.cpu_count()} logical CPUs")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    if "float64" in args.dtype and "cuda" in args.device:
        parser.error("--dtype float64 runs on --device cpu only (the CUDA kernels take float32, float16 and bfloat16)")
    base = SweepConfig(**QUICK) if args.quick else SweepConfig()
    default_threads = [1] if args.quick else sorted({1, torch.get_num_threads()})
    shapes = args.shapes or (base.shapes if args.quick or devices != [torch.device("cuda")] else CUDA_SHAPES)
    return SweepConfig(
        shapes=shapes,
        sparsities=args.sparsity or base.sparsities,
        batches=args.batch or base.batches,
        dtypes=[DTYPES[name] for name in args.dtype],
        devices=devices,
        threads=args.threads or default_threads,
        methods=args.methods,
        group_sizes=[g for g in args.group if g > 1],
        training=args.training,
        rounds=args.rounds or base.rounds,
        max_seconds_per_cell=args.max_seconds or base.max_seconds_per_cell,
        quick_roofline=args.quick,
    )


class _Progress:
    """A tqdm bar over the cells (stderr), or nothing; table lines print above it."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print("(pip install tqdm for a progress bar)", file=sys.stderr)
            else:
                self.bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)
        self.started = False

    def step(self, label: str) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description(label)

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.close()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install matplotlib (or condensed_ops[bench])")

    if not args.sweep and not args.vit and not args.train_model and not args.model:
        parser.error("--no-sweep leaves nothing to run: add --vit, --train-model or --model")
    if not args.sweep:
        config.shapes = []
    vit_variants = [False, True] if args.vit_attention else [False]
    vit_cells = len(args.vit_batch) * len(config.devices) * len(vit_variants) if args.vit else 0
    training_cells = list(itertools.product(args.train_model, args.train_batch, config.threads))
    model_cells = len(args.model) * len(args.model_batch) * len(config.threads)
    progress = _Progress(config.cells() + vit_cells + len(training_cells) + model_cells, not args.no_progress)
    printed_header: List[str] = []

    def on_cell(rows: List[Dict[str, object]]) -> None:
        header = cell_header(rows)
        if not printed_header or printed_header[-1] != header:
            progress.print("\n" + header)
            printed_header.append(header)
        progress.print(format_cell(rows))

    try:
        results = run_sweep(config, progress.step, on_cell)
        if args.vit:
            from .vit import end_to_end, format_markdown

            results["vit"] = []
            for device, include_attention in itertools.product(config.devices, vit_variants):
                vit = end_to_end(batches=args.vit_batch, include_attention=include_attention, device=device.type, progress=progress.step)
                results["vit"].append(vit)
                progress.print("\n" + format_markdown(vit))
        if training_cells:
            from . import training

            results["training"] = []
            sparsity = args.sparsity[0] if args.sparsity else 0.9
            for model, batch, threads in training_cells:
                progress.step(f"train {model} batch {batch} threads {threads}")
                results["training"].append(
                    training.time_training(model, batch, threads, sparsity, args.delta_t, rounds=args.rounds or 3)
                )
                progress.print(training.format_markdown(results["training"][-1:]))
        if args.model:
            from . import models

            sparsity = args.sparsity[0] if args.sparsity else 0.9
            results["models"] = []
            for threads in config.threads:
                rows = models.end_to_end(
                    args.model, args.model_batch, threads, sparsity, rounds=args.rounds or 5, size=args.model_size, progress=progress.step
                )
                results["models"].extend(rows)
                progress.print("\n" + models.format_markdown(rows, sparsity))
    finally:
        progress.close()
    results["command"] = "python -m condensed_ops.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import write_figures

        for path in write_figures(results, args.plot):
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
