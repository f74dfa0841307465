"""SRigL against dense on MNIST-1D, one rule changed at a time.

    python benchmarks/srigl_one_factor.py --out runs.jsonl                 # the whole grid
    python benchmarks/srigl_one_factor.py --out runs.jsonl --tasks mnist1d_mlp --sparsities 0.9 \\
        --variants dense package revive --seeds 0 1 2

Each variant is the package's per-row SRigL with one rule switched to the paper's
reference code's (``reference_srigl.py`` restates those rules) or to an earlier rule of
this package:

- ``package``: ``SRigL`` as shipped (``drop_rule="layer"``, ``gamma_sal=0.3``);
- ``revive``: the ablated set recomputed from all neurons at every update (reference);
- ``regrow_dropped``: a just-dropped weight may regrow in the same update (reference);
- ``floor_fan_in``: initial fan-in ``int(density * in)`` (reference) instead of rounded;
- ``neuron_rule``: ``drop_rule="neuron"``, every neuron drops ``round(f * fan_in)``;
- ``no_ablation``: ``gamma_sal=0``, no neuron ablated;
- ``alpha_0.5``: initial drop fraction 0.5 (the recipe's, and the reference's, is 0.3);
- ``reference``: all four reference rules above at once, and no optimizer-state reset;
- ``dense``: no sparsity.

Recipe: benchmarks/accuracy.py's (AdamW, cosine schedule, batch 128) with 100 epochs,
weight decay 0.01 and ``delta_t = 100``, one thread; every variant of a seed starts from
the same weights and masks (except ``floor_fan_in``, whose masks hold fewer weights).
One JSON line per run is appended to ``--out`` (a grid can be resumed: runs already in
the file are skipped); the summary prints mean ± std per (task, sparsity, variant).
Needs ``pip install mnist1d``.
"""

import argparse
import contextlib
import importlib.util
import json
import pathlib
import statistics
from typing import Iterator

import torch

from condensed_ops import masks as masks_module
from condensed_ops.srigl import SRigL

_here = pathlib.Path(__file__).parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _here / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = _load("accuracy")
reference = _load("reference_srigl")


class ReferenceRules(SRigL):
    """``SRigL`` whose per-layer update is ``reference_srigl.update`` (per-row layers)."""

    revive = True
    regrow_dropped = True

    @torch.no_grad()
    def _rewire(self, layer, grad, drop_fraction):
        if grad is None:
            return
        before = reference.ReferenceLayer(layer.mask.flatten(1).clone(), layer.weight.detach().flatten(1).clone(),
                                          layer.ablated_neurons.clone(), layer.budget, layer.ablation_allowed)
        after = reference.update(before, grad.flatten(1), drop_fraction, self.gamma_sal,
                                 revive=self.revive, regrow_dropped=self.regrow_dropped)
        changed = (before.mask ^ after.mask) | (after.mask & (after.weight != before.weight))
        layer.weight.copy_(after.weight.view(layer.weight.shape))
        self._reset_optimizer_state(layer.weight, changed.view(layer.weight.shape))
        layer.mask = after.mask.view(layer.mask.shape)
        layer.ablated_neurons = after.ablated
        layer.fan_in = after.fan_in_with(int(after.ablated.sum()))


def _rules(revive: bool, regrow_dropped: bool):
    return type("Rules", (ReferenceRules,), dict(revive=revive, regrow_dropped=regrow_dropped))


class NoAblation(SRigL):
    """``SRigL`` with ``gamma_sal = 0``: no neuron is ever ablated."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "gamma_sal": 0.0})


def _floor_fan_in(density: float, in_features: int) -> int:
    return min(in_features, max(1, int(density * in_features)))


# variant: (accuracy.py method, SRigL class, floor initial fan-in[, initial drop fraction alpha])
VARIANTS = {
    "dense": ("dense", SRigL, False),
    "package": ("srigl", SRigL, False),
    "revive": ("srigl", _rules(revive=True, regrow_dropped=False), False),
    "regrow_dropped": ("srigl", _rules(revive=False, regrow_dropped=True), False),
    "floor_fan_in": ("srigl", SRigL, True),
    "neuron_rule": ("srigl_neuron", SRigL, False),
    "no_ablation": ("srigl", NoAblation, False),
    "alpha_0.5": ("srigl", SRigL, False, 0.5),
    "reference": ("srigl_noreset", _rules(revive=True, regrow_dropped=True), True),
}


@contextlib.contextmanager
def variant_in_place(name: str) -> Iterator[str]:
    method, updater_class, floor, *alpha = VARIANTS[name]
    saved = accuracy.SRigL, masks_module.fan_in_for_density, accuracy.ALPHA
    accuracy.SRigL = updater_class
    if floor:
        masks_module.fan_in_for_density = _floor_fan_in
    if alpha:
        accuracy.ALPHA = alpha[0]
    try:
        yield method
    finally:
        accuracy.SRigL, masks_module.fan_in_for_density, accuracy.ALPHA = saved


def markdown_table(runs: list) -> str:
    """Variants down, (task, sparsity) across: mean ± std (seeds)."""
    cases = sorted({(run["task"], run["sparsity"]) for run in runs if run["sparsity"] is not None})
    scores = {}
    for run in runs:
        for task, sparsity in cases if run["sparsity"] is None else [(run["task"], run["sparsity"])]:
            if run["task"] == task:
                scores.setdefault((run["variant"], task, sparsity), []).append(run["accuracy"])
    lines = ["| variant | " + " | ".join(f"{task.removeprefix('mnist1d_').upper()} {100 * sparsity:.0f}%" for task, sparsity in cases) + " |",
             "|---|" + "---:|" * len(cases)]
    for variant in VARIANTS:
        cells = []
        for task, sparsity in cases:
            values = scores.get((variant, task, sparsity), [])
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.2f} ± {spread:.2f} ({len(values)})" if values else "—")
        if any(cell != "—" for cell in cells):
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mnist1d_mlp", "mnist1d_cnn"], choices=["mnist1d_mlp", "mnist1d_cnn"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="one JSON line per run (appended)")
    parser.add_argument("--table", action="store_true", help="train nothing: print --out's runs as a Markdown table")
    args = parser.parse_args()
    if args.table:
        print(markdown_table([json.loads(line) for line in args.out.read_text().splitlines()]))
        return
    torch.set_num_threads(1)
    accuracy.WEIGHT_DECAY, accuracy.DELTA_T = 0.01, 100
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    key = lambda run: (run["task"], run["sparsity"], run["variant"], run["seed"], run["epochs"])  # noqa: E731
    have = {key(run) for run in done}
    splits = accuracy.mnist1d_splits()
    for seed in args.seeds:
        for task in args.tasks:
            for sparsity in args.sparsities:
                for variant in args.variants:
                    run_sparsity = None if variant == "dense" else sparsity
                    if (task, run_sparsity, variant, seed, args.epochs) in have:
                        continue
                    with variant_in_place(variant) as method:
                        result = accuracy.train_once(task, method, run_sparsity, seed, args.epochs, splits)
                    live = {name: layer["active_rows"] for name, layer in result.get("layers", {}).items()}
                    run = dict(task=task, sparsity=run_sparsity, variant=variant, seed=seed, epochs=args.epochs,
                               accuracy=round(result["accuracy"], 2), seconds=result["seconds"], live_rows=live or None)
                    done.append(run)
                    have.add(key(run))
                    with args.out.open("a") as f:
                        f.write(json.dumps(run) + "\n")
    by_case = {}
    for run in done:
        by_case.setdefault((run["task"], run["sparsity"] or 0.0, run["variant"], run["epochs"]), []).append(run["accuracy"])
    for (task, sparsity, variant, epochs), scores in sorted(by_case.items()):
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"{task:12s} {sparsity or 'dense':>5} {variant:15s} {statistics.fmean(scores):6.2f} ± {spread:.2f} (n={len(scores)}, {epochs} epochs)")


if __name__ == "__main__":
    main()
