"""Test accuracy of dense, unstructured RigL, per-row SRigL and grouped SRigL training on
MNIST-1D (an MLP and a small 1-D CNN) and scikit-learn's digits (an MLP).

    python benchmarks/accuracy.py --out benchmarks/results/accuracy.json --doc docs/accuracy.md
    python benchmarks/accuracy.py --quick --out /tmp/accuracy.json   # smoke run: digits only, seconds

Every method trains with the same optimizer, schedule, epochs, batches and, per seed, the
same initial weights (the masks differ). MNIST-1D is generated locally by the ``mnist1d``
package (``make_dataset``, 20,000 samples: 16,000 train, 4,000 test, the same split for
every seed and method); the digits ship with scikit-learn and are split 80/20 by a
permutation drawn from the seed. One thread, one run at a time. Results go to ``--out``
(JSON, written after every run; an interrupted grid resumes where it stopped) and, with
``--doc``, as a markdown table between the ``<!-- accuracy-table -->`` markers of that file.
"""

import argparse
import json
import math
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condensed_ops.masks import layer_densities, sparsifiable_weights
from condensed_ops import condense
from condensed_ops.srigl import SRigL, initial_masks

Split = Tuple[Tensor, Tensor]

BATCH_SIZE = 128
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
T_END_FRACTION = 0.75  # RigL: rewire for the first 75% of training
DELTA_T = 50  # steps between mask updates (runs are short: ~2,000-3,000 steps)
ALPHA = 0.3
GAMMA_SAL = 0.3


# ---- data ----------------------------------------------------------------------------


def mnist1d_splits(num_samples: int = 20000) -> Tuple[Split, Split]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples  # default seed 42: one fixed dataset and split (80/20)
    data = make_dataset(args)

    def split(x, y) -> Split:
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)

    return split(data["x"], data["y"]), split(data["x_test"], data["y_test"])


def digits_splits(seed: int) -> Tuple[Split, Split]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[: len(y) // 5], order[len(y) // 5 :]
    return (x[train], y[train]), (x[test], y[test])


# ---- models --------------------------------------------------------------------------


def mlp(inputs: int, width: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


class Conv1dNet(nn.Module):
    """A 1-D CNN built from Conv2d layers with (1, k) kernels over ``[N, C, 1, L]``, so
    SRigL (which masks Linear and groups=1 Conv2d layers) sparsifies every layer."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, (1, 5), padding=(0, 2)),
            nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 5), stride=(1, 2), padding=(0, 2)),
            nn.ReLU(),
            nn.Conv2d(channels, channels, (1, 5), stride=(1, 2), padding=(0, 2)),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * 10, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.view(x.shape[0], 1, 1, -1)))


TASKS: Dict[str, Dict[str, Any]] = {
    "mnist1d_mlp": dict(model=lambda: mlp(40), data="mnist1d", epochs=50, seeds=3, title="MNIST-1D MLP"),
    "mnist1d_cnn": dict(model=Conv1dNet, data="mnist1d", epochs=20, seeds=3, title="MNIST-1D 1-D CNN"),
    "digits_mlp": dict(model=lambda: mlp(64), data="digits", epochs=100, seeds=5, title="digits MLP"),
    # Wider twins (not in the default grid): does grouping cost less once ceil(out/g) * k
    # covers every input of a layer, as at realistic widths?
    "mnist1d_mlp_wide": dict(model=lambda: mlp(40, 1024), data="mnist1d", epochs=50, seeds=3, title="MNIST-1D MLP, width 1024"),
    "mnist1d_cnn_wide": dict(model=lambda: Conv1dNet(128), data="mnist1d", epochs=20, seeds=3, title="MNIST-1D 1-D CNN, 128 channels"),
}
DEFAULT_TASKS = ("mnist1d_mlp", "mnist1d_cnn", "digits_mlp")


# ---- unstructured RigL (the baseline) -----------------------------------------------------


class UnstructuredRigL:
    """RigL (Evci et al. 2020) without structure, for comparison: the same ERK densities,
    schedule and optimizer-state reset as SRigL; each update drops ``int(drop_fraction * n)``
    of a layer's ``n`` active weights by lowest ``|w|`` and grows as many at the highest
    ``|grad|`` among positions inactive before the update."""

    def __init__(self, model: nn.Module, sparsity: float, *, t_end: int, delta_t: int, alpha: float,
                 optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        self.weights = sparsifiable_weights(model)
        densities = layer_densities({n: w.shape for n, w in self.weights.items()}, sparsity, "erk")
        self.masks: Dict[str, Tensor] = {}
        for name, weight in self.weights.items():
            keep = round(densities[name] * weight.numel())
            order = torch.rand(weight.numel(), generator=generator).argsort()[:keep]
            self.masks[name] = torch.zeros(weight.numel(), dtype=torch.bool).scatter_(0, order, True).view(weight.shape)
        self.t_end, self.delta_t, self.alpha, self.optimizer = t_end, delta_t, alpha, optimizer
        self.steps_taken = 0
        self.apply_masks()
        optimizer.register_step_post_hook(lambda *_: self.apply_masks())

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, weight in self.weights.items():
            weight.masked_fill_(~self.masks[name], 0)

    @torch.no_grad()
    def step(self) -> bool:
        self.steps_taken += 1
        t = self.steps_taken
        updating = t % self.delta_t == 0 and t < self.t_end
        for name, weight in self.weights.items():
            mask = self.masks[name]
            if updating:
                drop_fraction = self.alpha / 2 * (1 + math.cos(math.pi * t / self.t_end))
                active = int(mask.sum())
                drops = min(int(active * drop_fraction), mask.numel() - active)
                score = torch.where(mask, weight.abs(), -math.inf).flatten()
                keep = torch.zeros_like(score, dtype=torch.bool).scatter_(0, score.argsort(descending=True)[: active - drops], True)
                grow_score = torch.where(mask, -math.inf, weight.grad.abs()).flatten()
                grow = torch.zeros_like(keep).scatter_(0, grow_score.argsort(descending=True)[:drops], True)
                new_mask = (keep | grow).view(mask.shape)
                grown = grow.view(mask.shape)
                changed = (mask & ~new_mask) | grown
                weight.masked_fill_(~new_mask | grown, 0)
                for value in self.optimizer.state.get(weight, {}).values():
                    if isinstance(value, Tensor) and value.shape == weight.shape:
                        value.masked_fill_(changed, 0)
                self.masks[name] = mask = new_mask
            weight.grad.masked_fill_(~mask, 0)
        return updating


# ---- methods -------------------------------------------------------------------------------


# name -> (label, SRigL keyword arguments or a marker), in table order
METHODS: Dict[str, Tuple[str, Optional[Dict[str, Any]]]] = {
    "dense": ("dense", None),
    "static": ("static constant fan-in (no rewiring)", dict(static=True)),
    "rigl": ("unstructured RigL", None),
    "srigl": ("SRigL per-row (g=1, layer drop rule)", dict(group_size=1)),
    "srigl_condensed": ("SRigL per-row, sparse-to-sparse on condensed layers", dict(group_size=1, condensed=True)),
    "srigl_neuron": ("SRigL per-row, per-neuron drop rule", dict(group_size=1, drop_rule="neuron")),
    "srigl_noreset": ("SRigL per-row, no optimizer-state reset", dict(group_size=1, reset=False)),
    "srigl_g4": ("grouped SRigL g=4", dict(group_size=4)),
    "srigl_g8": ("grouped SRigL g=8", dict(group_size=8)),
    "srigl_g16": ("grouped SRigL g=16", dict(group_size=16)),
    "srigl_g32": ("grouped SRigL g=32", dict(group_size=32)),
    # Diagnostic: how much of the grouped loss is the output layer (10 rows, so its
    # classes share columns); group_size takes a {layer: g} dict.
    "srigl_g8_out1": ("grouped SRigL g=8, output layer per-row", dict(group_size=8, output_group_size=1)),
}


def train_once(task: str, method: str, sparsity: Optional[float], seed: int, epochs: int, splits: Tuple[Split, Split]) -> Dict[str, Any]:
    (x, y), (x_test, y_test) = splits
    torch.manual_seed(seed)
    model = TASKS[task]["model"]()
    if method != "dense" and METHODS[method][1] and METHODS[method][1].get("condensed"):
        # SRigL's initial masks (the draw a masked-dense run makes), as condensed layers.
        masks = initial_masks(model, sparsity, group_size=METHODS[method][1]["group_size"], generator=torch.Generator().manual_seed(seed))
        condense(model, masks=masks, min_weights=0, max_density=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(y) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    t_end = int(T_END_FRACTION * steps)
    masks_generator = torch.Generator().manual_seed(seed)
    updater: Any = None
    reset = True
    if method == "rigl":
        updater = UnstructuredRigL(model, sparsity, t_end=t_end, delta_t=DELTA_T, alpha=ALPHA, optimizer=optimizer, generator=masks_generator)
    elif method != "dense":
        options = dict(METHODS[method][1])
        reset = options.pop("reset", True)
        options.pop("condensed", None)
        output_group_size = options.pop("output_group_size", None)
        if output_group_size is not None:
            names = list(sparsifiable_weights(model))
            options["group_size"] = {**{name: options["group_size"] for name in names[:-1]}, names[-1]: output_group_size}
        if options.pop("static", False):
            t_end_used = 0  # never rewires
        else:
            t_end_used = t_end
        updater = SRigL(model, sparsity, t_end=t_end_used, delta_t=DELTA_T, alpha=ALPHA, gamma_sal=GAMMA_SAL,
                        optimizer=optimizer if reset else None, generator=masks_generator, **options)
    shuffle = torch.Generator().manual_seed(seed + 1)
    last_change: Dict[str, int] = {}
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y), generator=shuffle).split(BATCH_SIZE):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            if isinstance(updater, SRigL):
                before = {n: l.mask.clone() for n, l in updater.layers.items()} if updater.is_update_step(updater.steps_taken + 1) else None
                updater.step()
                if before is not None:
                    for n, l in updater.layers.items():
                        if not torch.equal(before[n], l.mask):
                            last_change[n] = updater.steps_taken
            elif updater is not None:
                updater.step()
            optimizer.step()
            if isinstance(updater, SRigL) and not reset:
                updater.apply_masks()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        accuracy = 100.0 * (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    result: Dict[str, Any] = dict(task=task, method=method, sparsity=sparsity, seed=seed, epochs=epochs,
                                  steps=steps, accuracy=accuracy, seconds=round(seconds, 2))
    if isinstance(updater, SRigL):
        result["layers"] = {
            n: dict(fan_in=l.fan_in, in_features=l.in_features, active_rows=l.active_neurons, rows=l.mask.shape[0],
                    group_size=l.group_size, last_change_over_t_end=round(last_change.get(n, 0) / t_end, 3) if t_end else None)
            for n, l in updater.layers.items()
        }
    return result


# ---- the grid, the JSON and the table ---------------------------------------------------------

SPARSITIES = (0.9, 0.95)
QUICK = dict(tasks=("digits_mlp",), methods=("dense", "rigl", "srigl", "srigl_g8"), sparsities=(0.9,), seeds=1, epochs=15)


def machine() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{"task/method/sparsity": {mean, std, n}}``; dense runs have sparsity None."""
    grouped: Dict[str, List[float]] = {}
    for r in results:
        grouped.setdefault(f"{r['task']}/{r['method']}/{r['sparsity']}", []).append(r["accuracy"])
    return {
        key: dict(mean=statistics.fmean(acc), std=statistics.stdev(acc) if len(acc) > 1 else 0.0, n=len(acc))
        for key, acc in grouped.items()
    }


def table(summary: Dict[str, Dict[str, Any]], tasks, methods, sparsities) -> str:
    header = ["method"] + [f"{TASKS[t]['title']} {100 * s:g}%" for t in tasks for s in sparsities]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        cells = [METHODS[method][0]]
        for task in tasks:
            for sparsity in sparsities:
                entry = summary.get(f"{task}/{method}/{None if method == 'dense' else sparsity}")
                cells.append(f"{entry['mean']:.1f} ± {entry['std']:.1f} (n={entry['n']})" if entry else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate(summary: Dict[str, Dict[str, Any]], tasks) -> List[str]:
    """g=8 minus per-row SRigL at 90%, per task, in points (more than 1 point below fails the bar)."""
    lines = []
    for task in tasks:
        row, grouped = summary.get(f"{task}/srigl/0.9"), summary.get(f"{task}/srigl_g8/0.9")
        if row and grouped:
            gap = grouped["mean"] - row["mean"]
            verdict = "FAILS (more than 1 point below)" if gap < -1.0 else "passes"
            lines.append(f"- {TASKS[task]['title']}: g=8 {grouped['mean']:.2f} vs per-row {row['mean']:.2f}: {gap:+.2f} points, {verdict}")
    return lines


def write_doc(path: pathlib.Path, text: str) -> None:
    begin, end = "<!-- accuracy-table -->", "<!-- /accuracy-table -->"
    block = f"{begin}\n{text}\n{end}"
    if path.exists() and begin in path.read_text() and end in path.read_text():
        before, rest = path.read_text().split(begin, 1)
        path.write_text(before + block + rest.split(end, 1)[1])
    else:
        path.write_text(block + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results (resumed when it exists)")
    parser.add_argument("--doc", type=pathlib.Path, help="markdown file whose <!-- accuracy-table --> block is rewritten")
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, 1 seed, 15 epochs, 4 methods, 90%%")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(DEFAULT_TASKS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # small layers; and the grid shares its machine

    tasks, methods, sparsities = args.tasks, args.methods, tuple(args.sparsities)
    if args.quick:
        tasks, methods, sparsities = QUICK["tasks"], QUICK["methods"], QUICK["sparsities"]
    command = "python " + " ".join([pathlib.Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    config = dict(batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, optimizer="AdamW, cosine LR",
                  t_end_fraction=T_END_FRACTION, delta_t=DELTA_T, alpha=ALPHA, gamma_sal=GAMMA_SAL, density="erk",
                  epochs={t: QUICK["epochs"] if args.quick else TASKS[t]["epochs"] for t in tasks})
    results: List[Dict[str, Any]] = []
    if args.out.exists():
        saved = json.loads(args.out.read_text())
        if saved.get("config") == config:
            results = saved["results"]
    done = {(r["task"], r["method"], r["sparsity"], r["seed"]) for r in results}

    mnist1d: Optional[Tuple[Split, Split]] = None
    start = time.perf_counter()
    for task in tasks:
        seeds = 1 if args.quick else TASKS[task]["seeds"]
        epochs = config["epochs"][task]
        for seed in range(seeds):
            if TASKS[task]["data"] == "mnist1d":
                mnist1d = mnist1d or mnist1d_splits()
                splits = mnist1d
            else:
                splits = digits_splits(seed)
            for method in methods:
                for sparsity in [None] if method == "dense" else sparsities:
                    if (task, method, sparsity, seed) in done:
                        continue
                    result = train_once(task, method, sparsity, seed, epochs, splits)
                    results.append(result)
                    print(f"{task:12} {method:14} {sparsity!s:5} seed {seed}: {result['accuracy']:6.2f}% "
                          f"({result['seconds']:.1f} s)", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(dict(config=config, results=results), indent=1))
    summary = summarize(results)
    environment = dict(machine=machine(), torch=torch.__version__, python=platform.python_version(), threads=1, command=command)
    args.out.write_text(json.dumps(dict(config=config, environment=environment, summary=summary, results=results), indent=1))
    text = "\n".join([
        f"Test accuracy (%), mean ± sample std over seeds; {environment['machine']}, torch {environment['torch']}, one thread.",
        f"Made by `{command}`.",
        "",
        table(summary, tasks, methods, sparsities),
        "",
        "Gate (grouped g=8 vs per-row SRigL at 90% sparsity):",
        "",
        *gate(summary, tasks),
    ])
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.doc:
        write_doc(args.doc, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
