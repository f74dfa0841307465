"""Whole training steps: dense training, masked-dense SRigL, and SRigL over condensed layers.

A step is forward, backward, ``SRigL.step()`` and the optimizer step (AdamW). Steps
that rewire the masks cost more (the dense gradient of every condensed layer, the
SRigL decisions), so they are timed on their own and amortized over ``delta_t``:
``amortized = (delta_t - 1) / delta_t * step + update_step / delta_t``. Every round
times each method's ordinary step and update step, in a fresh random order;
medians over rounds. Models have random weights and train on random data (speed
does not depend on either); nothing is downloaded.
"""

import copy
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import condense
from ..srigl import SRigL, initial_masks
from .vit import VisionTransformer

TRAIN_MODELS = ("mlp", "vit")
METHODS = ("dense", "masked", "condensed")


class ResidualMLP(nn.Module):
    """``blocks`` residual MLP blocks ``width -> hidden -> width`` and a classifier."""

    def __init__(self, width: int = 1024, hidden: int = 4096, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.norm(x))


def build_model(kind: str) -> nn.Module:
    """The benchmark's models: a 4-block 1024-4096-1024 MLP, and a small ViT-like
    encoder (32x32 images, 8x8 patches, width 256, 4 blocks)."""
    if kind == "mlp":
        return ResidualMLP()
    if kind == "vit":
        return VisionTransformer(image_size=32, patch_size=8, width=256, depth=4, heads=4, mlp_width=1024, num_classes=10)
    raise ValueError(f"model must be one of {TRAIN_MODELS}, got {kind!r}")


def _inputs(kind: str, batch: int, generator: torch.Generator) -> Tensor:
    shape = (batch, 1024) if kind == "mlp" else (batch, 3, 32, 32)
    return torch.randn(shape, generator=generator)


class _Trainer:
    """One method's model, optimizer and (for SRigL) updater, stepping on fixed data."""

    def __init__(self, model: nn.Module, updater_for: Optional[Callable], x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.updater: Optional[SRigL] = updater_for(model, self.optimizer) if updater_for else None

    def step(self, rewire: bool) -> None:
        if self.updater is not None:
            # The step count decides whether step() rewires: place it just before
            # (or away from) a multiple of delta_t.
            delta_t = self.updater.delta_t
            self.updater.steps_taken = delta_t - 1 if rewire else delta_t
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.updater is not None:
            rewired = self.updater.step()
            assert rewired == rewire
        self.optimizer.step()


def _trainers(kind: str, batch: int, sparsity: float, delta_t: int, seed: int = 0) -> Dict[str, _Trainer]:
    torch.manual_seed(seed)
    dense = build_model(kind)
    data = torch.Generator().manual_seed(seed)
    x, y = _inputs(kind, batch, data), torch.randint(0, 10, (batch,), generator=data)
    options = dict(t_end=10**9, delta_t=delta_t)

    def masked_updater(model, optimizer):
        return SRigL(model, sparsity, optimizer=optimizer, generator=torch.Generator().manual_seed(seed), **options)

    condensed = copy.deepcopy(dense)
    masks = initial_masks(condensed, sparsity, generator=torch.Generator().manual_seed(seed))
    condense(condensed, masks=masks, min_weights=0, max_density=1.0)

    def condensed_updater(model, optimizer):
        return SRigL(model, sparsity, optimizer=optimizer, **options)

    return {
        "dense": _Trainer(copy.deepcopy(dense), None, x, y),
        "masked": _Trainer(dense, masked_updater, x, y),
        "condensed": _Trainer(condensed, condensed_updater, x, y),
    }


def time_training(
    kind: str, batch: int, threads: Optional[int], sparsity: float = 0.9, delta_t: int = 100, rounds: int = 5
) -> Dict[str, object]:
    """Median seconds per ordinary step and per update step of each method, the
    amortized step, and the speed-ups of condensed SRigL; one cell."""
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    try:
        trainers = _trainers(kind, batch, sparsity, delta_t)
        samples: Dict[str, List[float]] = {f"{m} {part}": [] for m in METHODS for part in ("step", "update")}
        calls = [(name, rewire) for name in METHODS for rewire in ((False, True) if name != "dense" else (False,))]
        for name, rewire in calls:  # warm up: allocator, caches, the layouts
            trainers[name].step(rewire)
        for _ in range(rounds):
            random.shuffle(calls)
            for name, rewire in calls:
                start = time.perf_counter()
                trainers[name].step(rewire)
                samples[f"{name} {'update' if rewire else 'step'}"].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    medians = {key: statistics.median(values) for key, values in samples.items() if values}
    medians["dense update"] = medians["dense step"]
    amortized = {m: ((delta_t - 1) * medians[f"{m} step"] + medians[f"{m} update"]) / delta_t for m in METHODS}
    return {
        "model": kind,
        "batch": batch,
        "threads": threads,
        "sparsity": sparsity,
        "delta_t": delta_t,
        "rounds": rounds,
        "seconds": medians,
        "amortized_seconds": amortized,
        "speedup_vs_dense": amortized["dense"] / amortized["condensed"],
        "speedup_vs_masked": amortized["masked"] / amortized["condensed"],
    }


def format_markdown(cells: Sequence[Dict[str, object]]) -> str:
    lines = [
        "| model | batch | threads | dense step | masked SRigL step / update | condensed SRigL step / update | condensed vs dense | vs masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        s = cell["seconds"]
        ms = lambda key: f"{1e3 * s[key]:.0f}"  # noqa: E731
        lines.append(
            f"| {cell['model']} | {cell['batch']} | {cell['threads']} | {ms('dense step')} ms | "
            f"{ms('masked step')} / {ms('masked update')} ms | {ms('condensed step')} / {ms('condensed update')} ms | "
            f"{cell['speedup_vs_dense']:.2f}x | {cell['speedup_vs_masked']:.2f}x |"
        )
    return "\n".join(lines)


__all__ = ["METHODS", "ResidualMLP", "TRAIN_MODELS", "build_model", "format_markdown", "time_training"]
