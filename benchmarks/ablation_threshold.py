"""One factor of SRigL's neuron ablation on MNIST-1D: the threshold, fixed by the layer's
initial fan-in (the package, as the reference code) or ``gamma_sal`` times the current fan-in
(the rule before 2026-12-03, which rises as neurons are ablated).

    python benchmarks/ablation_threshold.py --seeds 0 1 2 --gammas 0.3 0.95 --out /tmp/ablation.jsonl

Recipe: benchmarks/accuracy.py's MNIST-1D MLP (40-256-256-10, AdamW, cosine schedule, batch
128) at 90%, 100 epochs, weight decay 0.01, delta_t 100, one thread; every method of a seed
starts from the same weights and masks. Prints mean ± std per (rule, gamma_sal) and the live
rows per layer.
"""

import argparse
import importlib.util
import json
import math
import pathlib
import statistics

import torch

from condensed_ops.srigl import SRigL, _sum_over_groups, _top_overall

_spec = importlib.util.spec_from_file_location("accuracy", pathlib.Path(__file__).parent / "accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)


def ablate_below_share_of_current_fan_in(self, layer, mask, magnitude, grad_magnitude, weight_drops):
    """The former rule: fewer than ``gamma_sal * r * fan_in`` salient weights, fan_in the current one."""
    row_groups, groups, group_size = layer.row_groups, layer.groups, layer.group_size
    active_rows = ~layer.ablated_neurons
    live = active_rows[::group_size]
    rows_per_group = torch.bincount(row_groups, minlength=groups)
    minus_inf = torch.tensor(-math.inf, dtype=magnitude.dtype, device=magnitude.device)
    salient = _top_overall(torch.where(mask, magnitude, minus_inf), layer.active_neurons * layer.fan_in - weight_drops) & mask
    inactive = ~mask & active_rows[:, None]
    salient |= _top_overall(torch.where(inactive, grad_magnitude, minus_inf), weight_drops) & inactive
    share = _sum_over_groups(salient.sum(dim=1), row_groups, groups) / (rows_per_group * layer.fan_in)
    candidates = live & (share < self.gamma_sal)
    most_rows_to_ablate = max(0, layer.active_neurons - max(1, math.ceil(layer.budget / layer.in_features)))
    order = torch.sort(torch.where(candidates, share, math.inf), stable=True).indices
    rows_so_far = torch.cumsum(torch.where(candidates, rows_per_group, 0)[order], dim=0)
    chosen = candidates[order] & (rows_so_far <= most_rows_to_ablate)
    return torch.zeros_like(candidates).scatter_(0, order, chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--gammas", nargs="+", type=float, default=[0.3, 0.95])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="one JSON line per run (appended)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accuracy.WEIGHT_DECAY, accuracy.DELTA_T = 0.01, 100
    splits = accuracy.mnist1d_splits()
    fixed_rule = SRigL._groups_to_ablate
    runs = []
    for seed in args.seeds:
        runs.append(dict(rule="dense", gamma=None, **_run("dense", seed, args.epochs, splits)))
        for gamma in args.gammas:
            accuracy.GAMMA_SAL = gamma
            for rule, method in (("initial fan-in (package)", fixed_rule), ("current fan-in (former)", ablate_below_share_of_current_fan_in)):
                SRigL._groups_to_ablate = method
                runs.append(dict(rule=rule, gamma=gamma, **_run("srigl", seed, args.epochs, splits)))
            SRigL._groups_to_ablate = fixed_rule
        with args.out.open("a") as f:
            for run in runs[-1 - 2 * len(args.gammas):]:
                f.write(json.dumps(run) + "\n")
    by_case = {}
    for run in runs:
        by_case.setdefault((run["rule"], run["gamma"]), []).append(run)
    for (rule, gamma), cases in by_case.items():
        scores = [c["accuracy"] for c in cases]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        live = [c.get("live_rows") for c in cases]
        print(f"{rule:26s} gamma_sal={gamma}: {statistics.fmean(scores):.2f} ± {spread:.2f} (n={len(scores)}), live rows {live}")


def _run(method: str, seed: int, epochs: int, splits) -> dict:
    result = accuracy.train_once("mnist1d_mlp", method, None if method == "dense" else 0.9, seed, epochs, splits)
    live = {name: layer["active_rows"] for name, layer in result.get("layers", {}).items()}
    return dict(seed=seed, accuracy=round(result["accuracy"], 2), live_rows=live or None)


if __name__ == "__main__":
    main()
