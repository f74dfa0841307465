"""Structured RigL (SRigL): dynamic sparse training with a constant fan-in.

Lasby, Golubeva, Evci, Nica, Ioannou, "Dynamic Sparse Training with Structured
Sparsity", ICLR 2024. Training is masked dense training on ordinary
``nn.Linear`` / ``nn.Conv2d`` layers: weights outside the mask are held at zero,
so ``weight.grad`` is the dense gradient that decides where to grow. Every active
neuron keeps exactly ``fan_in`` weights, the layout the condensed kernels run.

Order of calls in a training step::

    updater = SRigL(model, sparsity=0.9, t_end=int(0.75 * total_steps), optimizer=opt, generator=g)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        updater.step()  # every delta_t-th call before t_end: rewire masks from the dense grads;
                        # every call: zero the grads outside the masks
        opt.step()      # a post-step hook re-applies the masks, so masked weights stay exactly 0

Pure PyTorch (single process). Under DistributedDataParallel every rank sees the
same averaged gradients and weights, and the updates are deterministic, so the
ranks keep identical masks.
"""

import math
from dataclasses import dataclass
from typing import Any, Collection, Dict, Optional

import torch
from torch import Tensor, nn

from .masks import constant_fan_in_mask, fan_in_for_density, layer_densities, sparsifiable_layers, sparsifiable_weights


@dataclass
class SparseLayer:
    """One layer's sparse state.

    Attributes:
        weight: the masked weight (a layer's, or an attention's input projection).
        module: the ``nn.Linear`` / ``nn.Conv2d`` it belongs to, or None for an
            ``nn.MultiheadAttention`` input projection (a bare parameter).
        mask: bool, the weight's shape; True where a weight is active.
        fan_in: active weights per active neuron (row of ``weight.flatten(1)``).
        ablated_neurons: bool ``[out]``; an ablated neuron has no weights for good
            (its output is its bias).
        budget: the active weights the layer keeps in total (its initial
            ``out * fan_in``); after ablation the fan-in is re-derived from it.
        ablation_allowed: False for layers exempt from neuron ablation.
    """

    weight: nn.Parameter
    module: Optional[nn.Module]
    mask: Tensor
    fan_in: int
    ablated_neurons: Tensor
    budget: int
    ablation_allowed: bool

    @property
    def in_features(self) -> int:
        """Inputs per neuron: ``in_features`` or ``C_in * kh * kw``."""
        return self.mask[0].numel()

    @property
    def active_neurons(self) -> int:
        return int((~self.ablated_neurons).sum())


def _top_per_row(scores: Tensor, count: int) -> Tensor:
    """Bool mask of each row's ``count`` highest scores; ties go to the lower column."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, order, True)


def _top_overall(scores: Tensor, count: int) -> Tensor:
    """Bool mask (``scores``' shape) of the ``count`` highest scores of the whole tensor."""
    order = torch.sort(scores.flatten(), descending=True, stable=True).indices[:count]
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    return chosen.scatter_(0, order, True).view(scores.shape)


class SRigL:
    """Keeps the masks of a model's Linear / groups=1 Conv2d layers and attention input
    projections (:func:`~condensed_ops.masks.sparsifiable_weights`) and rewires them with
    the SRigL rule; works with any optimizer and training loop.

    Args:
        model: the model to sparsify in place (weights outside the new masks are zeroed).
        sparsity: global fraction of the allocated layers' weights to remove, in [0, 1).
        t_end: the last step that may rewire is the last multiple of ``delta_t``
            below ``t_end`` (RigL stops updating at ~75% of training).
        delta_t: steps between mask updates.
        alpha: initial drop fraction; step ``t`` drops
            ``alpha / 2 * (1 + cos(pi * t / t_end))`` of each neuron's weights.
        gamma_sal: a neuron with fewer than ``gamma_sal * fan_in`` salient weights is
            ablated; 0 turns ablation off.
        density_method: ``"erk"`` or ``"uniform"`` (see :func:`layer_densities`).
        exclude: layer names left dense and untouched.
        ablation_exempt: layer names whose neurons are never ablated. None exempts
            the last allocated layer (in module order), whose neurons are usually
            the model's outputs.
        optimizer: its state is zeroed where weights are dropped or grown, and a
            post-step hook re-applies the masks after every ``optimizer.step()``.
            Without one, call :meth:`apply_masks` after each optimizer step.
        generator: draws the initial random masks (same seed, same masks).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        t_end: int,
        delta_t: int = 100,
        alpha: float = 0.3,
        gamma_sal: float = 0.3,
        density_method: str = "erk",
        exclude: Collection[str] = (),
        ablation_exempt: Optional[Collection[str]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be an int >= 1, got {delta_t!r}")
        if not t_end >= 0:
            raise ValueError(f"t_end must be >= 0, got {t_end!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not 0.0 <= gamma_sal <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
        weights = sparsifiable_weights(model, exclude)
        if not weights:
            raise ValueError("model has no Linear or groups=1 Conv2d layer to sparsify")
        modules = sparsifiable_layers(model, exclude)
        if ablation_exempt is None:
            ablation_exempt = {list(weights)[-1]}
        elif set(ablation_exempt) - set(weights):
            raise ValueError(f"ablation_exempt names no sparsified layer: {sorted(set(ablation_exempt) - set(weights))}")

        self.t_end = t_end
        self.delta_t = delta_t
        self.alpha = alpha
        self.gamma_sal = gamma_sal
        self.optimizer = optimizer
        self.steps_taken = 0
        densities = layer_densities({name: weight.shape for name, weight in weights.items()}, sparsity, density_method)
        self.layers: Dict[str, SparseLayer] = {}
        for name, weight in weights.items():
            out_features, in_features = weight.shape[0], weight[0].numel()
            fan_in = fan_in_for_density(densities[name], in_features)
            mask = constant_fan_in_mask(out_features, in_features, fan_in, generator=generator)
            self.layers[name] = SparseLayer(
                weight=weight,
                module=modules.get(name),
                mask=mask.to(weight.device).view(weight.shape),
                fan_in=fan_in,
                ablated_neurons=torch.zeros(out_features, dtype=torch.bool, device=weight.device),
                budget=out_features * fan_in,
                ablation_allowed=name not in ablation_exempt,
            )
        self.apply_masks()
        self._optimizer_hook = (
            optimizer.register_step_post_hook(lambda *_: self.apply_masks()) if optimizer is not None else None
        )

    # ---- schedule ----------------------------------------------------------------

    def is_update_step(self, t: int) -> bool:
        """Whether step ``t`` (1-based count of :meth:`step` calls) rewires the masks."""
        return t % self.delta_t == 0 and t < self.t_end

    def drop_fraction(self, t: int) -> float:
        """Cosine-decayed drop fraction at step ``t``."""
        return self.alpha / 2 * (1 + math.cos(math.pi * t / self.t_end))

    # ---- training-loop entry points ------------------------------------------------

    @torch.no_grad()
    def step(self) -> bool:
        """Call once per training step, after ``backward()`` and before ``optimizer.step()``.

        On update steps rewires every layer's mask from the dense gradients; then
        zeroes the gradients outside the masks, so the optimizer (momentum, Adam
        moments, gradient clipping) never sees inactive weights. Returns whether
        the masks were rewired.
        """
        self.steps_taken += 1
        updating = self.is_update_step(self.steps_taken)
        if updating:
            drop_fraction = self.drop_fraction(self.steps_taken)
            for layer in self.layers.values():
                self._rewire(layer, drop_fraction)
        self.mask_gradients()
        return updating

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every weight outside its mask."""
        for layer in self.layers.values():
            layer.weight.masked_fill_(~layer.mask, 0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero every gradient outside its mask."""
        for layer in self.layers.values():
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(~layer.mask, 0)

    def remove_optimizer_hook(self) -> None:
        """Stop re-applying the masks after optimizer steps."""
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None

    # ---- the SRigL update ----------------------------------------------------------

    def _rewire(self, layer: SparseLayer, drop_fraction: float) -> None:
        grad = layer.weight.grad
        if grad is None:  # the layer took no part in this step's loss: nothing to grow by
            return
        out_features, in_features, fan_in = layer.mask.shape[0], layer.in_features, layer.fan_in
        mask = layer.mask.view(out_features, in_features)
        magnitude = layer.weight.detach().abs().reshape(out_features, in_features)
        grad_magnitude = grad.abs().reshape(out_features, in_features)

        # A neuron can only drop as many as it has inactive positions to grow into.
        ablated = layer.ablated_neurons
        drop_per_neuron = min(round(drop_fraction * fan_in), in_features - fan_in)
        if layer.ablation_allowed and self.gamma_sal > 0 and drop_per_neuron > 0:
            ablated = ablated | self._neurons_to_ablate(layer, mask, magnitude, grad_magnitude, drop_per_neuron)
        active_rows = ~ablated
        new_fan_in = min(in_features, max(1, round(layer.budget / int(active_rows.sum()))))

        # Each surviving neuron drops its lowest |w| and grows, at positions inactive
        # before this update, the highest |grad| until it holds new_fan_in weights.
        # Growing only at previously inactive positions makes every change a real one
        # (a grown weight starts at 0; none is dropped and regrown in one update).
        drop_per_neuron = min(round(drop_fraction * fan_in), in_features - new_fan_in)
        keep_per_neuron = min(fan_in - drop_per_neuron, new_fan_in)
        grow_per_neuron = new_fan_in - keep_per_neuron
        if grow_per_neuron == 0 and keep_per_neuron == fan_in and bool((ablated == layer.ablated_neurons).all()):
            return

        minus_inf = torch.tensor(-math.inf, dtype=magnitude.dtype, device=magnitude.device)
        keep = _top_per_row(torch.where(mask, magnitude, minus_inf), keep_per_neuron) & mask
        growable = ~mask & active_rows[:, None]
        grow = _top_per_row(torch.where(growable, grad_magnitude.to(magnitude.dtype), minus_inf), grow_per_neuron) & growable
        new_mask = (keep | grow) & active_rows[:, None]
        changed = (mask & ~new_mask) | grow

        weight_shape = layer.weight.shape
        layer.weight.masked_fill_((~new_mask | grow).view(weight_shape), 0)  # grown weights start at 0
        self._reset_optimizer_state(layer.weight, changed.view(weight_shape))
        layer.mask = new_mask.view(weight_shape)
        layer.fan_in = new_fan_in
        layer.ablated_neurons = ablated

    def _neurons_to_ablate(
        self, layer: SparseLayer, mask: Tensor, magnitude: Tensor, grad_magnitude: Tensor, drop_per_neuron: int
    ) -> Tensor:
        """Bool ``[out]``: active neurons with fewer than ``gamma_sal * fan_in`` salient weights.

        Salient weights are those unstructured RigL would hold after this step: the
        layer's top ``|w|`` among its active weights, less the drops, plus as many
        top ``|grad|`` among the inactive weights of active neurons.
        """
        active_rows = ~layer.ablated_neurons
        active_neurons = int(active_rows.sum())
        drops = active_neurons * drop_per_neuron
        kept = active_neurons * layer.fan_in - drops
        minus_inf = torch.tensor(-math.inf, dtype=magnitude.dtype, device=magnitude.device)
        salient = _top_overall(torch.where(mask, magnitude, minus_inf), kept)
        inactive = ~mask & active_rows[:, None]
        salient |= _top_overall(torch.where(inactive, grad_magnitude.to(magnitude.dtype), minus_inf), drops)
        salient_per_neuron = salient.sum(dim=1)
        candidates = active_rows & (salient_per_neuron < self.gamma_sal * layer.fan_in)

        # Keep enough neurons to hold the budget at fan-in <= in_features (and at
        # least one); past that, the least salient neurons go first.
        fewest_active = max(1, math.ceil(layer.budget / layer.in_features))
        most_to_ablate = max(0, active_neurons - fewest_active)
        if int(candidates.sum()) <= most_to_ablate:
            return candidates
        never = torch.iinfo(torch.int64).max
        order = torch.sort(torch.where(candidates, salient_per_neuron, never), stable=True).indices[:most_to_ablate]
        return torch.zeros_like(candidates).scatter_(0, order, True)

    def _reset_optimizer_state(self, weight: Tensor, changed: Tensor) -> None:
        # Momentum or Adam moments left at a dropped or grown position would move
        # the weight on its first step; elementwise state has the weight's shape.
        if self.optimizer is None or weight not in self.optimizer.state:
            return
        for value in self.optimizer.state[weight].values():
            if isinstance(value, Tensor) and value.shape == weight.shape:
                value.masked_fill_(changed, 0)

    # ---- checkpointing ------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The step count and every layer's mask, fan-in, ablated neurons and budget
        (the hyperparameters are the constructor's)."""
        return {
            "steps_taken": self.steps_taken,
            "layers": {
                name: {
                    "mask": layer.mask.clone(),
                    "fan_in": layer.fan_in,
                    "ablated_neurons": layer.ablated_neurons.clone(),
                    "budget": layer.budget,
                }
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output and re-apply the masks."""
        saved_layers = state["layers"]
        if set(saved_layers) != set(self.layers):
            raise ValueError(f"state_dict has layers {sorted(saved_layers)}, this updater has {sorted(self.layers)}")
        for name, saved in saved_layers.items():
            layer = self.layers[name]
            if saved["mask"].shape != layer.mask.shape or saved["ablated_neurons"].shape != layer.ablated_neurons.shape:
                raise ValueError(f"state_dict mask shapes for {name!r} do not match the layer's weight {list(layer.weight.shape)}")
        for name, saved in saved_layers.items():
            layer = self.layers[name]
            layer.mask = saved["mask"].to(device=layer.weight.device, dtype=torch.bool).clone(memory_format=torch.contiguous_format)
            layer.ablated_neurons = saved["ablated_neurons"].to(device=layer.weight.device, dtype=torch.bool).clone()
            layer.fan_in = int(saved["fan_in"])
            layer.budget = int(saved["budget"])
        self.steps_taken = int(state["steps_taken"])
        self.apply_masks()


__all__ = ["SRigL", "SparseLayer"]
