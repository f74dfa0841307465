"""Structured RigL (SRigL): dynamic sparse training with a constant fan-in.

Lasby, Golubeva, Evci, Nica, Ioannou, "Dynamic Sparse Training with Structured
Sparsity", ICLR 2024. On ordinary ``nn.Linear`` / ``nn.Conv2d`` layers training
is masked dense training: weights outside the mask are held at zero, so
``weight.grad`` is the dense gradient that decides where to grow; condensed layers
train sparse-to-sparse (below). Every active
neuron keeps exactly ``fan_in`` weights, the layout the condensed kernels run.

With ``group_size = g > 1`` the rows come in groups of ``g`` consecutive rows that
share one set of ``fan_in`` columns (the last group has fewer rows when ``g`` does
not divide the row count): a grouped layout loads each input column once per group.
Masks are then chosen per group: the score of a (group, column) pair is the L2 norm
of the group's weights in that column for dropping and the group's summed
``|grad|`` in it for growing, and neurons are ablated a whole group at a time
(an ablated row inside a live group would still cost its group's compute). With
``g = 1`` every rule reduces to the per-row one.

Order of calls in a training step::

    updater = SRigL(model, sparsity=0.9, t_end=int(0.75 * total_steps), optimizer=opt, generator=g)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        updater.step()  # every delta_t-th call before t_end: rewire masks from the dense grads;
                        # every call: zero the grads outside the masks
        opt.step()      # a post-step hook re-applies the masks, so masked weights stay exactly 0

Sparse-to-sparse: the layers SRigL drives may also be condensed ones
(:class:`~condensed_ops.CondensedLinear` / :class:`~condensed_ops.CondensedConv2d`,
per-row or grouped, e.g. the projections of a condensed attention), trained on the
condensed kernels from the first step to the last::

    masks = initial_masks(model, sparsity=0.9, generator=g)          # SRigL's random start
    condense(model, masks=masks, min_weights=0, max_density=1.0)    # every masked layer
    opt = torch.optim.AdamW(model.parameters())
    updater = SRigL(model, sparsity=0.9, t_end=..., optimizer=opt)  # same loop as above

A condensed layer keeps the mask its layout stores (``sparsity`` allocates only
the dense layers left). It has no dense gradient: on an update step each one
keeps its input and its output's gradient, and :meth:`SRigL.step` forms one
layer's ``grad_y^T x`` at a time, rewires, and frees it. Rewiring rewrites
``values`` / ``idx`` / ``active_rows`` in place; ``values`` stays the same
Parameter when ablation changes its shape (resized through ``.data``), and its
gradient and optimizer state follow each weight (kept: theirs; grown: 0 with the
dense gradient). The decisions, weights and moments equal masked-dense SRigL's
on the same start (tested), except that a condensed attention's q/k/v projections
are three layers with their own budgets where masked-dense SRigL ranks
``in_proj_weight`` as one.

Under DistributedDataParallel every rank sees the same averaged gradients and
weights (condensed layers' dense gradients are averaged over the ranks too), and
the updates are deterministic, so the ranks keep identical masks. DDP sizes its
buckets once: rebuild it after a step whose ``updater.layout_changed`` is True
(ablation resized some ``values``).
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Collection, Dict, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import (
    grouped_fan_in_mask,
    is_transformers_conv1d,
    masks_per_layer,
    sparsifiable_layers,
    sparsifiable_weights,
)
from .modules import CondensedConv2d, CondensedLayer

DROP_RULES = ("layer", "neuron")


@dataclass
class SparseLayer:
    """One layer's sparse state.

    Attributes:
        weight: the masked weight (a layer's, or an attention's input projection);
            for a condensed layer its ``values``.
        module: the ``nn.Linear`` / ``nn.Conv2d`` / condensed layer it belongs to, or
            None for an ``nn.MultiheadAttention`` input projection (a bare parameter).
        mask: bool, the weight's shape (a condensed layer's: its rows ``[out, in]``;
            a transformers ``Conv1D``'s: ``[in, out]``); True where a weight is active.
        fan_in: active weights per active neuron (row of ``weight.flatten(1)``).
        ablated_neurons: bool ``[out]``; an ablated neuron has no weights for good
            (its output is its bias). With ``group_size > 1`` whole groups are ablated.
        budget: the active weights the layer keeps in total (its initial
            ``out * fan_in``); after ablation the fan-in is re-derived from it as
            ``budget // active_neurons`` (never above the budget).
        ablation_allowed: False for layers exempt from neuron ablation.
        group_size: rows ``G * group_size`` to ``G * group_size + group_size - 1``
            share one set of columns (the last group may be partial).
        transposed: the weight stores the rows as columns, ``[in, out]`` (transformers' ``Conv1D``).
    """

    weight: nn.Parameter
    module: Optional[nn.Module]
    mask: Tensor
    fan_in: int
    ablated_neurons: Tensor
    budget: int
    ablation_allowed: bool
    group_size: int = 1
    transposed: bool = False

    def rows_of(self, t: Tensor) -> Tensor:
        """``t``, in the weight's shape, as the layer's rows ``[out, in]`` (a view)."""
        return t.t() if self.transposed else t.reshape(t.shape[0], -1)

    def weight_shaped(self, rows: Tensor) -> Tensor:
        """The rows ``[out, in]`` in the weight's shape (the inverse of :meth:`rows_of`)."""
        return rows.t().contiguous() if self.transposed else rows.reshape(self.mask.shape)

    @property
    def is_condensed(self) -> bool:
        """Whether the layer is stored condensed (trained sparse-to-sparse) rather than masked dense."""
        return isinstance(self.module, CondensedLayer)

    @property
    def initial_fan_in(self) -> int:
        """The fan-in the layer started with (``budget // out``): the base of the ablation threshold."""
        return self.budget // self.out_features

    @property
    def in_features(self) -> int:
        """Inputs per neuron: ``in_features`` or ``C_in * kh * kw``."""
        return self.mask.numel() // self.out_features

    @property
    def out_features(self) -> int:
        return self.mask.shape[1] if self.transposed else self.mask.shape[0]

    @property
    def active_neurons(self) -> int:
        return int((~self.ablated_neurons).sum())

    @property
    def row_groups(self) -> Tensor:
        """int64 ``[out]``: the group of each row."""
        return torch.arange(self.out_features, device=self.mask.device) // self.group_size

    @property
    def groups(self) -> int:
        return -(-self.out_features // self.group_size)


def _top_per_row(scores: Tensor, counts: Union[int, Tensor]) -> Tensor:
    """Bool mask of each row's ``counts`` (one int, or one per row) highest scores;
    ties go to the lower column."""
    rows, columns = scores.shape
    if isinstance(counts, int):
        counts = torch.full((rows,), counts, device=scores.device)
    counts = counts.clamp(0, columns)
    most = int(counts.max()) if rows else 0
    if most == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    # Not a sort of every row: each row's counts-th highest score (from a partial
    # top-k, whose values are exact) is its threshold; everything above it is
    # taken, and of the scores equal to it the leftmost fill the count.
    highest = torch.topk(scores, most, dim=1, sorted=True).values
    threshold = highest.gather(1, (counts - 1).clamp(min=0)[:, None])
    return _take_to_threshold(scores, threshold, counts[:, None]) & (counts > 0)[:, None]


def _count(mask: Tensor, dim: int) -> Tensor:
    """int64 count of True along ``dim`` (bool ``sum`` widens every element first: ~3x slower)."""
    if mask.dim() == 1:
        return torch.count_nonzero(mask)
    return mask.view(torch.uint8).sum(dim=dim)


def _take_to_threshold(scores: Tensor, threshold: Tensor, counts: Tensor) -> Tensor:
    """Along the last dim: the scores above ``threshold`` and, in index order, as many
    scores equal to it as ``counts`` needs (what a stable descending sort keeps)."""
    at_least = scores >= threshold
    if bool((_count(at_least, dim=-1)[..., None] == counts).all()):
        return at_least  # no tie at a threshold is left out (the usual case: one pass)
    above = scores > threshold
    ties = at_least & ~above
    still_needed = counts - _count(above, dim=-1)[..., None]
    return above | (ties & (torch.cumsum(ties, dim=-1) <= still_needed))


def _sum_over_groups(values: Tensor, row_groups: Tensor, groups: int) -> Tensor:
    """``[groups, ...]``: the sum of ``values``' rows in each group, in float64 (so with
    one row per group the sum is the value itself, bit for bit, and float32 squares are exact)."""
    if groups == values.shape[0]:
        return values.to(torch.float64)
    total = torch.zeros((groups, *values.shape[1:]), dtype=torch.float64, device=values.device)
    return total.index_add_(0, row_groups, values.to(torch.float64))


def _top_overall(scores: Tensor, count: int, among: Optional[Tensor] = None) -> Tensor:
    """Bool mask (``scores``' shape) of the ``count`` highest scores of the whole
    tensor, or of the entries ``among`` marks; ties go to the lower flat index."""
    candidates = scores.flatten() if among is None else scores[among]
    if count <= 0 or candidates.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if count >= candidates.numel():
        return torch.ones_like(scores, dtype=torch.bool) if among is None else among.clone()
    threshold = torch.kthvalue(candidates, candidates.numel() - count + 1).values  # the count-th highest, in linear time
    if among is not None:
        scores = torch.where(among, scores, torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device))
    chosen = _take_to_threshold(scores.flatten(), threshold, torch.tensor(count, device=scores.device)).view(scores.shape)
    return chosen if among is None else chosen & among


def _group_sizes(group_size: Union[int, Mapping[str, int]], weights: Mapping[str, Tensor]) -> Dict[str, int]:
    """``{layer name: group size}`` for every sparsified layer, validated."""
    if isinstance(group_size, Mapping):
        unknown = set(group_size) - set(weights)
        if unknown:
            raise ValueError(f"group_size names no sparsified layer: {sorted(unknown)}")
        sizes = {name: group_size.get(name, 1) for name in weights}
    else:
        sizes = {name: group_size for name in weights}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group_size must be an int >= 1 (or a dict of them), got {size!r} for {name!r}")
    return sizes


def initial_masks(
    model: nn.Module,
    sparsity: float,
    *,
    density_method: str = "erk",
    exclude: Collection[str] = (),
    group_size: Union[int, Mapping[str, int]] = 1,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, Tensor]:
    """``{layer name: bool mask in the weight's shape}``: the random constant fan-in
    masks :class:`SRigL` starts a dense ``model`` from (the same arguments and
    generator state give the same masks). ``condense(model, masks=initial_masks(...),
    min_weights=0, max_density=1.0)`` turns them into condensed layers that
    :class:`SRigL` then trains sparse-to-sparse."""
    weights = sparsifiable_weights(model, exclude)
    if not weights:
        raise ValueError("model has no Linear or groups=1 Conv2d layer to sparsify")
    group_sizes = _group_sizes(group_size, weights)

    def random_rows(name: str, rows: Tensor, fan_in: int) -> Tensor:
        return grouped_fan_in_mask(rows.shape[0], rows[0].numel(), fan_in, group_sizes[name], generator=generator)

    return masks_per_layer(model, sparsity, density_method, exclude, random_rows)


def _condensed_layers(model: nn.Module, exclude: Collection[str]) -> Dict[str, CondensedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CondensedLayer) and name not in exclude}


def _module_order(model: nn.Module, names: Collection[str]) -> list:
    """``names`` (layers, or ``<attention>.in_proj_weight``) in the model's module order."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda name: order.get(name, order.get(name.rpartition(".")[0], 0)))


def _rows_gradient(module: CondensedLayer, x: Tensor, grad_y: Tensor) -> Tensor:
    """The dense gradient of a condensed layer's rows ``[out, in]`` for one call,
    from its input ``x`` and its output's gradient ``grad_y`` (float32 or wider)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(module, CondensedConv2d):
        if x.dim() == 3:  # unbatched
            x, grad_y = x[None], grad_y[None]
        x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)  # [N, L, in]
        grad_y = grad_y.flatten(2).transpose(1, 2)  # [N, L, out]
    rows_x = x.reshape(-1, module.in_features).to(dtype)
    return grad_y.reshape(-1, module.out_features).to(dtype).T @ rows_x


def _stored_rows_mask(module: CondensedLayer) -> Tensor:
    """Bool ``[out, in]``: the entries a condensed layer stores."""
    rows, columns = module.stored_positions()
    mask = torch.zeros(module.out_features, module.in_features, dtype=torch.bool, device=columns.device)
    mask[rows, columns] = True
    return mask


def _gather_stored(module: CondensedLayer, dense_rows: Tensor) -> Tensor:
    """``dense_rows [out, in]`` at a condensed layer's stored entries, in ``values``' shape."""
    rows, columns = module.stored_positions()
    return dense_rows[rows, columns].view(module.values.shape)


def _carry(old: Tensor, sources: Tensor, fill: Union[Tensor, float]) -> Tensor:
    """Entries of ``old`` taken to ``sources``' layout (-1: ``fill``)."""
    taken = old.reshape(-1)[sources.clamp(min=0).reshape(-1)].view(sources.shape)
    return torch.where(sources >= 0, taken, fill)


class SRigL:
    """Keeps the masks of a model's Linear / groups=1 Conv2d layers and attention input
    projections (:func:`~condensed_ops.masks.sparsifiable_weights`) and rewires them with
    the SRigL rule; works with any optimizer and training loop.

    Args:
        model: the model to sparsify in place (weights outside the new masks are zeroed).
        sparsity: global fraction of the allocated layers' weights to remove, in [0, 1)
            (condensed layers keep the density they have).
        t_end: the last step that may rewire is the last multiple of ``delta_t``
            below ``t_end`` (RigL stops updating at ~75% of training).
        delta_t: steps between mask updates.
        alpha: initial drop fraction; step ``t`` drops the fraction
            ``alpha / 2 * (1 + cos(pi * t / t_end))`` of the weights (see ``drop_rule``).
            0.5 scored best on the package's MNIST-1D benchmarks (docs/accuracy.md: 0.4–1.2
            points over 0.3, the RigL and SRigL papers' value, on every model and sparsity).
        gamma_sal: a neuron with fewer than ``max(1, int(gamma_sal * F))`` salient
            weights is ablated, ``F`` the layer's initial fan-in (a fixed threshold, as
            in the reference code: one taken from the current fan-in would rise as
            neurons are ablated and feed on itself); 0 turns ablation off. Salient: the
            layer's top ``|w|`` less this update's drops, and its top ``|grad|`` as many
            as the drops. The threshold falls to the count of the live neuron ranked
            ``budget // in_features`` when that is lower, so enough neurons stay to hold
            the budget. A group of ``r`` rows is ablated as one, when it holds fewer
            than ``r`` times that per row.
        density_method: ``"erk"`` or ``"uniform"`` (see :func:`layer_densities`).
        exclude: layer names left dense and untouched.
        ablation_exempt: layer names whose neurons are never ablated. None exempts
            the last allocated layer (in module order), whose neurons are usually
            the model's outputs.
        optimizer: its state is zeroed where weights are dropped or grown (for a
            condensed layer: follows each kept weight), and a post-step hook
            re-applies the masks after every ``optimizer.step()``.
            Without one, call :meth:`apply_masks` after each optimizer step.
        generator: draws the initial random masks of the dense layers (same seed,
            same masks: :func:`initial_masks`).
        group_size: rows per group (consecutive rows sharing one set of columns), for
            every sparsified layer, or ``{layer name: group size}`` (layers not named
            get 1). 1 is per-row SRigL.
        drop_rule: ``"layer"`` (the paper's reference code): drop
            ``int(drop_fraction * n)`` of the layer's ``n`` active (group, column) pairs
            (and every pair whose weights are exactly 0), those with the lowest scores
            over the whole layer, then cut each group to the fan-in and regrow it back to
            the fan-in; the pairs of groups ablated in the update count in ``n``, so
            their share is kept in the live groups. ``"neuron"``: every group
            drops ``round(drop_fraction * fan_in)`` of its own columns; a layer with a
            small fan-in then stops rewiring once that rounds to 0.

    Per row (``group_size=1``) the decisions are the reference code's
    (calgaryml/condensed-sparsity), held to an independent restatement of its rules in
    ``tests/test_srigl_reference.py``, but for what is chosen here: ablation is
    permanent (there neurons revive), a group grows only at columns it did not hold
    before the update (there a just-dropped weight may regrow), the initial fan-in is
    rounded (floored there), and the optimizer's elementwise state (momentum, Adam's
    moments) is zeroed where a weight is dropped or grown, so a grown weight starts from
    0 with fresh moments. ``docs/accuracy.md`` measures each.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        t_end: int,
        delta_t: int = 100,
        alpha: float = 0.5,
        gamma_sal: float = 0.3,
        density_method: str = "erk",
        exclude: Collection[str] = (),
        ablation_exempt: Optional[Collection[str]] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        generator: Optional[torch.Generator] = None,
        group_size: Union[int, Mapping[str, int]] = 1,
        drop_rule: str = "layer",
    ) -> None:
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be an int >= 1, got {delta_t!r}")
        if not t_end >= 0:
            raise ValueError(f"t_end must be >= 0, got {t_end!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if not 0.0 <= gamma_sal <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got {gamma_sal!r}")
        if drop_rule not in DROP_RULES:
            raise ValueError(f"drop_rule must be one of {DROP_RULES}, got {drop_rule!r}")
        weights = sparsifiable_weights(model, exclude)
        condensed = _condensed_layers(model, exclude)
        if not weights and not condensed:
            raise ValueError("model has no Linear, groups=1 Conv2d or condensed layer to sparsify")
        modules = sparsifiable_layers(model, exclude)
        names = _module_order(model, [*weights, *condensed])
        if ablation_exempt is None:
            ablation_exempt = {names[-1]}
        elif set(ablation_exempt) - set(names):
            raise ValueError(f"ablation_exempt names no sparsified layer: {sorted(set(ablation_exempt) - set(names))}")
        group_sizes = _group_sizes(group_size, {**weights, **condensed})
        for name, module in condensed.items():
            if group_sizes[name] != module.group_size and (isinstance(group_size, Mapping) or group_size != 1):
                raise ValueError(f"group_size for the condensed layer {name!r} is {group_sizes[name]}, its layout's is {module.group_size}")

        self.t_end = t_end
        self.delta_t = delta_t
        self.alpha = alpha
        self.gamma_sal = gamma_sal
        self.drop_rule = drop_rule
        self.optimizer = optimizer
        self.steps_taken = 0
        self.layout_changed = False  # whether the last step() resized a condensed layer's values
        masks = (
            initial_masks(
                model, sparsity, density_method=density_method, exclude=exclude,
                group_size={name: group_sizes[name] for name in weights}, generator=generator,
            )
            if weights
            else {}
        )
        self.layers: Dict[str, SparseLayer] = {}
        for name in names:
            if name in condensed:
                self.layers[name] = self._condensed_layer(condensed[name], allow_ablation=name not in ablation_exempt)
                continue
            weight, mask = weights[name], masks[name]
            transposed = is_transformers_conv1d(modules.get(name))
            out_features = weight.shape[1] if transposed else weight.shape[0]
            fan_in = int((mask[:, 0] if transposed else mask.flatten(1)[0]).sum())
            self.layers[name] = SparseLayer(
                weight=weight,
                module=modules.get(name),
                mask=mask,
                fan_in=fan_in,
                ablated_neurons=torch.zeros(out_features, dtype=torch.bool, device=weight.device),
                budget=out_features * fan_in,
                ablation_allowed=name not in ablation_exempt,
                group_size=group_sizes[name],
                transposed=transposed,
            )
        self.apply_masks()
        # A condensed layer has no dense gradient: on an update step each saves its
        # input and its output's gradient (_tap), and step() forms one layer's at a time.
        self._taps: Dict[str, list] = {name: [] for name in condensed}
        self._tap_hooks = [
            module.register_forward_hook(functools.partial(self._tap, name)) for name, module in condensed.items()
        ]
        self._optimizer_hook = (
            optimizer.register_step_post_hook(lambda *_: self.apply_masks()) if optimizer is not None else None
        )

    @staticmethod
    def _condensed_layer(module: CondensedLayer, allow_ablation: bool) -> SparseLayer:
        """A condensed layer's state, read from its layout: its mask is its rows'
        stored entries, its budget the weights it stores."""
        mask = _stored_rows_mask(module)
        ablated = ~mask.any(dim=1)
        return SparseLayer(
            weight=module.values,
            module=module,
            mask=mask,
            fan_in=module.fan_in,
            ablated_neurons=ablated,
            budget=module.active_neurons * module.fan_in,
            ablation_allowed=allow_ablation,
            group_size=module.group_size,
        )

    def _tap(self, name: str, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        """Forward hook of a condensed layer: on a training call of an update step,
        keep its input and (through a tensor hook) its output's gradient."""
        if not (module.training and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        if not self.is_update_step(self.steps_taken + 1):
            return
        record = [inputs[0].detach(), None]
        self._taps[name].append(record)

        def keep_gradient(grad: Tensor) -> None:
            record[1] = grad.detach()

        output.register_hook(keep_gradient)

    def _dense_gradient(self, name: str, layer: SparseLayer) -> Optional[Tensor]:
        """The dense gradient of the layer's weight (a condensed layer's: of its rows,
        formed now from this step's calls, which are then freed), or None."""
        if not layer.is_condensed:
            return None if layer.weight.grad is None else layer.rows_of(layer.weight.grad)
        records, self._taps[name] = self._taps[name], []
        gradient = None
        for x, grad_y in records:
            if grad_y is not None:
                call = _rows_gradient(layer.module, x, grad_y)
                gradient = call if gradient is None else gradient.add_(call)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each rank saw its own batch: average, as DistributedDataParallel averages
            # a dense weight's gradient, so every rank takes the same decisions.
            world = torch.distributed.get_world_size()
            took_part = torch.tensor([gradient is not None], dtype=torch.int64, device=layer.weight.device)
            torch.distributed.all_reduce(took_part)
            if int(took_part) != world:
                return None  # not every rank has a gradient for it: no rank rewires it
            torch.distributed.all_reduce(gradient)
            gradient.div_(world)
        return gradient

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
        self.layout_changed = False
        if updating:
            drop_fraction = self.drop_fraction(self.steps_taken)
            for name, layer in self.layers.items():
                shape = layer.weight.shape
                self._rewire(layer, self._dense_gradient(name, layer), drop_fraction)
                self.layout_changed |= layer.is_condensed and layer.weight.shape != shape
        for records in self._taps.values():
            records.clear()  # calls of a step that did not reach step() (e.g. a skipped batch)
        self.mask_gradients()
        return updating

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every weight outside its mask."""
        for layer in self.layers.values():
            if not layer.is_condensed:  # a condensed layer stores nothing outside its mask
                layer.weight.masked_fill_(~layer.mask, 0)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero every gradient outside its mask."""
        for layer in self.layers.values():
            if not layer.is_condensed and layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(~layer.mask, 0)

    def remove_optimizer_hook(self) -> None:
        """Stop re-applying the masks after optimizer steps."""
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None

    def remove_hooks(self) -> None:
        """Detach the updater from the model: the optimizer hook and the condensed layers' forward hooks."""
        self.remove_optimizer_hook()
        for hook in self._tap_hooks:
            hook.remove()
        self._tap_hooks = []

    # ---- the SRigL update ----------------------------------------------------------

    def _rewire(self, layer: SparseLayer, grad: Optional[Tensor], drop_fraction: float) -> None:
        if grad is None:  # the layer took no part in this step's loss: nothing to grow by
            return
        out_features, in_features, fan_in = layer.out_features, layer.in_features, layer.fan_in
        row_groups, groups, group_size = layer.row_groups, layer.groups, layer.group_size
        mask = layer.rows_of(layer.mask)
        weight_rows = layer.module._dense_rows() if layer.is_condensed else layer.rows_of(layer.weight.detach())
        magnitude = weight_rows.abs().reshape(out_features, in_features)
        grad_magnitude = grad.abs().reshape(out_features, in_features).to(magnitude.dtype)
        group_mask = mask[::group_size]  # a group's rows share their columns: its first row's
        rows_per_group = torch.bincount(row_groups, minlength=groups)

        # Weights dropped this update, for the salience count: what unstructured RigL
        # would drop under the same rule.
        active_weights = layer.active_neurons * fan_in
        if self.drop_rule == "layer":
            # As the reference code: int(drop_fraction * n), and at least every weight
            # at exactly 0 (one grown where no gradient ever reached stays 0); the
            # weights outside the mask are 0, so counting nonzeros counts active ones.
            weight_drops = max(int(active_weights * drop_fraction), active_weights - int(torch.count_nonzero(magnitude)))
        else:
            weight_drops = layer.active_neurons * min(round(drop_fraction * fan_in), in_features - fan_in)
        ablated_groups = layer.ablated_neurons[::group_size]
        if layer.ablation_allowed and self.gamma_sal > 0 and weight_drops > 0:
            ablated_groups = ablated_groups | self._groups_to_ablate(layer, mask, magnitude, grad_magnitude, weight_drops)
        live = ~ablated_groups
        active_rows = int(rows_per_group[live].sum())
        new_fan_in = min(in_features, max(1, layer.budget // active_rows))  # floor: never above the budget

        # Drop scores: the L2 norm of a group's weights in a column (ranked by its
        # square, exact in float64); for one row that is |w|. Grow scores: the group's
        # summed |grad| in a column.
        if group_size == 1:  # one weight's L2 norm is |w|: the same order, without squares in float64
            drop_values, grow_values = magnitude, grad_magnitude
        else:
            drop_values = _sum_over_groups(magnitude.square(), row_groups, groups)
            grow_values = _sum_over_groups(grad_magnitude, row_groups, groups)
        minus_inf = torch.tensor(-math.inf, dtype=drop_values.dtype, device=mask.device)
        active_pairs = group_mask & live[:, None]
        drop_score = torch.where(active_pairs, drop_values, minus_inf)
        if self.drop_rule == "layer":
            # The reference rule: of the n pairs held before this update, the layer's
            # top n - int(drop_fraction * n) stay — all in live groups, so the weights
            # of groups ablated now are kept elsewhere, not regrown.
            pairs = int(torch.count_nonzero(group_mask))  # an ablated group holds none
            kept = min(pairs - int(pairs * drop_fraction), int(torch.count_nonzero(drop_score > 0)))
            kept_per_group = _top_overall(drop_values, kept, among=active_pairs)
            kept_per_group = _count(kept_per_group, dim=1)
        else:
            kept_per_group = torch.full((groups,), fan_in - round(drop_fraction * fan_in), device=mask.device)
        # A group grows only at columns inactive before this update (so every change is
        # real: none is dropped and regrown at once), of which it has in - fan_in: it
        # keeps enough to reach the new fan-in from those, and at most the new fan-in.
        kept_per_group = kept_per_group.clamp(max(0, new_fan_in - (in_features - fan_in)), new_fan_in)
        keep = _top_per_row(drop_score, kept_per_group) & active_pairs
        growable = ~group_mask & live[:, None]
        grow_score = torch.where(growable, grow_values, minus_inf)
        grow = _top_per_row(grow_score, torch.where(live, new_fan_in - kept_per_group, 0)) & growable
        new_group_mask = keep | grow
        if torch.equal(new_group_mask, group_mask):
            return

        new_mask, grown = (new_group_mask, grow) if group_size == 1 else (new_group_mask[row_groups], grow[row_groups])
        if layer.is_condensed:
            self._relayout_condensed(layer, weight_rows.masked_fill(~new_mask | grown, 0), new_mask, grad)
        else:
            changed = (mask & ~new_mask) | grown
            layer.weight.masked_fill_(layer.weight_shaped(~new_mask | grown), 0)  # grown weights start at 0
            self._reset_optimizer_state(layer.weight, layer.weight_shaped(changed))
        layer.mask = layer.weight_shaped(new_mask)
        layer.fan_in = new_fan_in
        layer.ablated_neurons = ablated_groups[row_groups]

    def _relayout_condensed(self, layer: SparseLayer, rows: Tensor, mask: Tensor, grad_rows: Tensor) -> None:
        """Store a condensed layer's new rows; what belongs to each weight follows it:
        kept weights keep their gradient and optimizer state, grown ones start at 0
        with zeroed state and their dense gradient (as the masked-dense layer's would)."""
        values = layer.weight
        old_shape, old_grad = values.shape, values.grad
        sources = layer.module.relayout(rows, mask)
        if old_grad is not None:
            values.grad = _carry(old_grad, sources, _gather_stored(layer.module, grad_rows.to(old_grad.dtype)))
        if self.optimizer is not None and values in self.optimizer.state:
            state = self.optimizer.state[values]
            for key, value in state.items():
                if isinstance(value, Tensor) and value.shape == old_shape:
                    state[key] = _carry(value, sources, 0)

    def _groups_to_ablate(
        self, layer: SparseLayer, mask: Tensor, magnitude: Tensor, grad_magnitude: Tensor, weight_drops: int
    ) -> Tensor:
        """Bool ``[groups]``: live groups with fewer salient weights per row than the
        threshold ``max(1, int(gamma_sal * initial_fan_in))``.

        Salient weights (the reference code's definition): the layer's top ``|w|``
        among its active weights, less ``weight_drops``, together with the top
        ``weight_drops`` ``|grad|`` anywhere in the layer. The threshold drops to the
        salient count of the row ranked ``budget // in_features`` (0-based, most salient
        first) when that is lower, so that row and every one above it stay: enough
        rows to hold the budget at a fan-in of at most ``in_features``.
        """
        row_groups, groups, group_size = layer.row_groups, layer.groups, layer.group_size
        live = ~layer.ablated_neurons[::group_size]
        rows_per_group = torch.bincount(row_groups, minlength=groups)
        kept = layer.active_neurons * layer.fan_in - weight_drops
        salient = _top_overall(magnitude, kept, among=mask) | _top_overall(grad_magnitude, weight_drops)
        salient_per_row = _sum_over_groups(_count(salient, dim=1), row_groups, groups) / rows_per_group
        threshold = float(max(1, int(self.gamma_sal * layer.initial_fan_in)))

        # The live rows, most salient first (a group's rows share its count): the one
        # ranked rows_to_keep - 1 bounds the threshold.
        rows_to_keep = layer.budget // layer.in_features + 1
        order = torch.sort(torch.where(live, salient_per_row, -math.inf), descending=True, stable=True).indices
        rows_so_far = torch.cumsum(torch.where(live, rows_per_group, 0)[order], dim=0)
        bounding = int(torch.searchsorted(rows_so_far, rows_to_keep))
        if bounding >= groups:
            return torch.zeros_like(live)  # every live row is needed to hold the budget
        threshold = min(threshold, float(salient_per_row[order[bounding]]))
        return live & (salient_per_row < threshold)

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
        """The step count and every layer's mask, fan-in, ablated neurons, budget and
        group size (the other hyperparameters are the constructor's)."""
        return {
            "steps_taken": self.steps_taken,
            "layers": {
                name: {
                    "mask": layer.mask.clone(),
                    "fan_in": layer.fan_in,
                    "ablated_neurons": layer.ablated_neurons.clone(),
                    "budget": layer.budget,
                    "group_size": layer.group_size,
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
            saved_group_size = int(saved.get("group_size", 1))
            if saved_group_size != layer.group_size:
                raise ValueError(f"state_dict group_size for {name!r} is {saved_group_size}, this updater's is {layer.group_size}")
        for name, saved in saved_layers.items():
            layer = self.layers[name]
            layer.mask = saved["mask"].to(device=layer.weight.device, dtype=torch.bool).clone(memory_format=torch.contiguous_format)
            layer.ablated_neurons = saved["ablated_neurons"].to(device=layer.weight.device, dtype=torch.bool).clone()
            layer.fan_in = int(saved["fan_in"])
            layer.budget = int(saved["budget"])
        self.steps_taken = int(state["steps_taken"])
        self.apply_masks()


__all__ = ["DROP_RULES", "SRigL", "SparseLayer", "initial_masks"]
