"""The SRigL update of the paper's reference code, written again from its rules.

The rules were read from calgaryml/condensed-sparsity at 3052bb8
(``src/rigl_torch/rigl_constant_fan.py``, ``rigl_scheduler.py``, ``utils/rigl_utils.py``);
this is a plain re-statement of them for one layer, written without the package's code
(full sorts and per-neuron loops where the package uses thresholds), so that a test can
hold the package's ``SRigL`` against it and a benchmark can flip one rule at a time.

Two of the reference's rules differ from the package on purpose, and each has a switch:

- ``revive``: the ablated set is recomputed from all neurons at every update (an
  ablated neuron can come back); the package ablates for good.
- ``regrow_dropped``: a neuron may regrow, in the same update, a weight it just dropped
  (which then keeps its value); the package grows only where the neuron held nothing.

With both off, the package's per-row (``group_size=1``) decisions must equal these.
Ties are broken toward the lower flat index (the reference leaves them to ``topk``).
"""

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor


@dataclass
class ReferenceLayer:
    """One layer's state between updates, as the reference keeps it."""

    mask: Tensor  # bool [out, in]
    weight: Tensor  # [out, in], zero outside the mask
    ablated: Tensor  # bool [out]
    budget: int  # int(out * in * density): the weights the layer may hold
    ablation_allowed: bool = True

    @property
    def out_features(self) -> int:
        return self.mask.shape[0]

    @property
    def in_features(self) -> int:
        return self.mask.shape[1]

    @property
    def initial_fan_in(self) -> int:
        return self.budget // self.out_features

    def fan_in_with(self, ablated_count: int) -> int:
        return self.budget // (self.out_features - ablated_count)


def initial_layer(out_features: int, in_features: int, density: float, generator: torch.Generator) -> ReferenceLayer:
    """Random constant fan-in mask at ``density``: fan-in ``int(out*in*density) // out`` (floor)."""
    budget = int(out_features * in_features * density)
    fan_in = budget // out_features
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for row in range(out_features):
        mask[row, torch.randperm(in_features, generator=generator)[:fan_in]] = True
    weight = torch.randn(out_features, in_features, generator=generator) * mask
    return ReferenceLayer(mask, weight, torch.zeros(out_features, dtype=torch.bool), budget)


def _descending(scores: Tensor) -> Tensor:
    """Flat indices of ``scores``, highest first, ties to the lower index."""
    return torch.sort(scores.flatten(), descending=True, stable=True).indices


def neurons_to_ablate(
    layer: ReferenceLayer, grad: Tensor, n_keep: int, n_prune: int, gamma_sal: float, revive: bool
) -> List[int]:
    """The reference's dynamic ablation with the threshold on the initial sparse fan-in."""
    if not layer.ablation_allowed or gamma_sal == 0:
        return [] if revive else layer.ablated.nonzero().flatten().tolist()
    salient = torch.zeros(layer.mask.numel(), dtype=torch.bool)
    salient[_descending(layer.weight.abs())[:n_keep]] = True
    salient[_descending(grad.abs())[:n_prune]] = True
    counts = salient.view_as(layer.mask).sum(dim=1).tolist()
    ranked = [n for n in range(layer.out_features) if revive or not layer.ablated[n]]
    ranked.sort(key=lambda n: counts[n], reverse=True)  # stable: ties keep neuron order
    threshold = max(1, int(gamma_sal * layer.initial_fan_in))
    min_neurons = layer.budget // layer.in_features
    if min_neurons >= len(ranked):  # every live neuron is needed to hold the budget
        return layer.ablated.nonzero().flatten().tolist()
    threshold = min(threshold, counts[ranked[min_neurons]])
    chosen = [n for n in ranked if counts[n] < threshold]
    if not revive:
        chosen += layer.ablated.nonzero().flatten().tolist()
    return sorted(chosen)


def update(
    layer: ReferenceLayer, grad: Tensor, drop_fraction: float, gamma_sal: float,
    *, revive: bool = True, regrow_dropped: bool = True,
) -> ReferenceLayer:
    """One SRigL update of ``layer`` from its dense gradient ``grad``; returns the new state."""
    n_ones = int(layer.mask.sum())
    n_prune = int(n_ones * drop_fraction)
    n_keep = n_ones - n_prune
    nonzero = int(torch.count_nonzero(layer.weight))
    if nonzero < n_keep:  # the reference keeps every nonzero weight and drops the rest
        n_keep, n_prune = nonzero, n_ones - nonzero
    ablated = neurons_to_ablate(layer, grad, n_keep, n_prune, gamma_sal, revive)
    fan_in = layer.fan_in_with(len(ablated))

    # Keep the layer's top n_keep |w|; ablated neurons' weights score below everything.
    drop_score = layer.weight.abs().clone()
    drop_score[ablated] = drop_score.min() - 1
    keep = torch.zeros(layer.mask.numel(), dtype=torch.bool)
    keep[_descending(drop_score)[:n_keep]] = True
    keep = keep.view_as(layer.mask)
    grow = torch.zeros_like(keep)
    for neuron in range(layer.out_features):
        if neuron in ablated:
            keep[neuron] = False
            continue
        held = keep[neuron].nonzero().flatten()
        if len(held) > fan_in:  # the reference cuts by position, not by score
            keep[neuron, held[fan_in:]] = False
            continue
        growable = ~keep[neuron] if regrow_dropped else ~keep[neuron] & ~layer.mask[neuron]
        scores = torch.where(growable, grad[neuron].abs(), -torch.inf)
        grow[neuron, _descending(scores)[: fan_in - len(held)]] = True
    new_mask = keep | grow
    new_weight = torch.where(grow & ~layer.mask, 0.0, layer.weight) * new_mask  # new connections start at 0
    new_ablated = torch.zeros_like(layer.ablated)
    new_ablated[ablated] = True
    return ReferenceLayer(new_mask, new_weight, new_ablated, layer.budget, layer.ablation_allowed)
