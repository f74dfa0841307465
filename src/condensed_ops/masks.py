"""Constant fan-in masks for masked dense training, and the per-layer density
allocation that sizes them.

Pure PyTorch: nothing here needs the compiled extension. A mask is a bool tensor
in its weight's shape; a conv weight ``[C_out, C_in, kh, kw]`` counts its fan-in
over ``C_in * kh * kw`` (its rows are ``weight.flatten(1)``), a transformers
``Conv1D`` weight ``[in, out]`` over its columns.
"""

import math
from dataclasses import dataclass
from typing import Callable, Collection, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

DENSITY_METHODS = ("erk", "uniform")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def constant_fan_in_mask(
    out_features: int,
    in_features: int,
    fan_in: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """A uniformly random ``[out_features, in_features]`` bool mask with exactly
    ``fan_in`` distinct True columns in every row.

    The same seeded ``generator`` gives the same mask. Without ``device`` the mask
    is made on the generator's device (CPU without a generator); a CUDA mask needs
    a CUDA generator.
    """
    _check_count("out_features", out_features)
    _check_count("in_features", in_features)
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or not 0 <= fan_in <= in_features:
        raise ValueError(f"fan_in must be an int in [0, in_features={in_features}], got {fan_in!r}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    # The first fan_in columns of a uniformly random permutation of each row.
    scores = torch.rand(out_features, in_features, generator=generator, device=device)
    columns = scores.argsort(dim=1)[:, :fan_in]
    mask = torch.zeros(out_features, in_features, dtype=torch.bool, device=device)
    return mask.scatter_(1, columns, True)


def grouped_fan_in_mask(
    out_features: int,
    in_features: int,
    fan_in: int,
    group_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """A random ``[out_features, in_features]`` bool mask whose rows come in groups of
    ``group_size`` consecutive rows (rows ``G * group_size`` to ``G * group_size +
    group_size - 1``) sharing one set of ``fan_in`` uniformly random distinct columns.

    When ``group_size`` does not divide ``out_features`` the last group has fewer
    rows. The group masks are :func:`constant_fan_in_mask`'s rows, drawn one per
    group, so ``group_size=1`` gives exactly :func:`constant_fan_in_mask`'s mask for
    the same generator state.
    """
    _check_count("out_features", out_features)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    groups = -(-out_features // group_size)
    group_mask = constant_fan_in_mask(groups, in_features, fan_in, generator=generator, device=device)
    return group_mask.repeat_interleave(group_size, dim=0)[:out_features]


# ---- per-layer density allocation ----------------------------------------------


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (the GPT-2 family's layers): a Linear whose weight is
    stored transposed, ``[in, out]`` (``y = x @ weight + bias``). Found by its class,
    so transformers is never imported; subclasses are not it."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def is_sparsifiable(module: nn.Module) -> bool:
    """Layers whose weight gets a constant fan-in mask: Linear, Conv2d with groups=1, and
    transformers' ``Conv1D`` (its mask, like its weight, is ``[in, out]``)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1) or is_transformers_conv1d(module)


def sparsifiable_layers(model: nn.Module, exclude: Collection[str] = ()) -> Dict[str, nn.Module]:
    """``{name: module}`` of every sparsifiable layer of ``model`` not named in ``exclude``, in module order."""
    unknown = set(exclude) - {name for name, _ in model.named_modules()} - set(_attention_projections(model))
    if unknown:
        raise ValueError(f"exclude names modules the model does not have: {sorted(unknown)}")
    return {name: module for name, module in model.named_modules() if is_sparsifiable(module) and name not in exclude}


def _attention_projections(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The input projection weights of every ``nn.MultiheadAttention``, which are
    parameters, not Linear layers: ``<name>.in_proj_weight`` ``[3 * embed_dim,
    embed_dim]`` (q, k and v stacked), or ``<name>.q_proj_weight`` / ``k_`` / ``v_``
    when keys or values have other widths. (``<name>.out_proj`` is a Linear.)"""
    found: Dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        for attribute in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            weight = getattr(module, attribute, None)
            if isinstance(weight, nn.Parameter):
                found[prefix + attribute] = weight
    return found


def transposed_layers(model: nn.Module) -> Set[str]:
    """Names of the layers whose weight holds its neurons as columns (transformers ``Conv1D``)."""
    return {name for name, module in model.named_modules() if is_transformers_conv1d(module)}


def sparsifiable_weights(model: nn.Module, exclude: Collection[str] = ()) -> Dict[str, nn.Parameter]:
    """``{name: weight}`` of everything ``model`` can hold sparse, in module order: the
    weight of every sparsifiable layer (named by the layer) and the input projection
    weights of every ``nn.MultiheadAttention`` (``<attention>.in_proj_weight``, or the
    separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``)."""
    layers = sparsifiable_layers(model, exclude)
    projections = _attention_projections(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    weights: Dict[str, nn.Parameter] = {name: module.weight for name, module in layers.items()}
    weights.update({name: weight for name, weight in projections.items() if name not in exclude})
    owner = lambda name: order.get(name, order.get(name.rpartition(".")[0], 0))  # noqa: E731
    return dict(sorted(weights.items(), key=lambda item: owner(item[0])))


def _weight_shapes(
    model_or_named_shapes: Union[nn.Module, Mapping[str, Sequence[int]]], exclude: Collection[str]
) -> Dict[str, Tuple[int, ...]]:
    if isinstance(model_or_named_shapes, nn.Module):
        weights = sparsifiable_weights(model_or_named_shapes, exclude)
        return {name: tuple(weight.shape) for name, weight in weights.items()}
    unknown = set(exclude) - set(model_or_named_shapes)
    if unknown:
        raise ValueError(f"exclude names layers that are not in the shapes: {sorted(unknown)}")
    shapes = {name: tuple(int(d) for d in shape) for name, shape in model_or_named_shapes.items() if name not in exclude}
    for name, shape in shapes.items():
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"weight shape of {name!r} must be [out, in, *kernel] with every dim >= 1, got {list(shape)}")
    return shapes


def layer_densities(
    model_or_named_shapes: Union[nn.Module, Mapping[str, Sequence[int]]],
    sparsity: float,
    method: str = "erk",
    exclude: Collection[str] = (),
) -> Dict[str, float]:
    """Per-layer densities ``{name: density}`` whose kept weights total ``(1 - sparsity)``
    of the weights of all the layers allocated.

    Args:
        model_or_named_shapes: a model (its Linear and groups=1 Conv2d layers and
            its attention's input projections are allocated: :func:`sparsifiable_weights`)
            or ``{name: weight shape}``.
        sparsity: global fraction of weights to remove, in [0, 1).
        method: ``"uniform"`` (every layer gets ``1 - sparsity``) or ``"erk"``
            (Erdős–Rényi-Kernel, RigL): density proportional to
            ``sum(weight dims) / prod(weight dims)``, so small layers stay denser.
        exclude: layer names left out: they stay dense and do not count towards
            the total (e.g. a final classifier).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"layer_densities: sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if method not in DENSITY_METHODS:
        raise ValueError(f"method must be one of {DENSITY_METHODS}, got {method!r}")
    shapes = _weight_shapes(model_or_named_shapes, exclude)
    if method == "uniform":
        return {name: 1.0 - sparsity for name in shapes}

    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    raw_density = {name: sum(shape) / numels[name] for name, shape in shapes.items()}
    target_kept = (1.0 - sparsity) * sum(numels.values())
    dense: set = set()
    # One scale for every sparse layer, chosen so the kept weights add up to the
    # target. A layer that would go above density 1 becomes dense, which leaves
    # less for the others and so only raises the scale: repeat until none does.
    while True:
        sparse = [name for name in shapes if name not in dense]
        if not sparse:
            return {name: 1.0 for name in shapes}
        scale = (target_kept - sum(numels[name] for name in dense)) / sum(raw_density[n] * numels[n] for n in sparse)
        overfull = [name for name in sparse if scale * raw_density[name] > 1.0]
        if not overfull:
            return {name: 1.0 if name in dense else scale * raw_density[name] for name in shapes}
        dense.update(overfull)


def fan_in_for_density(density: float, in_features: int) -> int:
    """The constant fan-in that gives ``density`` over ``in_features`` inputs
    (``C_in * kh * kw`` for a conv): ``max(1, round(density * in_features))``, at most ``in_features``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    _check_count("in_features", in_features)
    return min(in_features, max(1, round(density * in_features)))


# ---- masks from existing weights -------------------------------------------------


def magnitude_prune_to_fan_in(weight: Tensor, fan_in: int) -> Tensor:
    """A bool mask in ``weight``'s shape keeping each row's ``fan_in`` largest ``|w|``.

    Rows are ``weight.flatten(1)`` (a conv's fan-in spans ``C_in * kh * kw``);
    equal magnitudes go to the lower column.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [out, in, *kernel], got shape {list(weight.shape)}")
    rows = weight.detach().flatten(1)
    in_features = rows.shape[1]
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or not 0 <= fan_in <= in_features:
        raise ValueError(f"fan_in must be an int in [0, in_features={in_features}], got {fan_in!r}")
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=weight.device)
    return mask.scatter_(1, order[:, :fan_in], True).view(weight.shape)


def magnitude_masks(
    model: nn.Module, sparsity: float, *, density_method: str = "uniform", exclude: Collection[str] = ()
) -> Dict[str, Tensor]:
    """``{layer name: bool mask in the weight's shape}`` keeping every neuron's largest
    ``|w|`` at a constant fan-in: one-shot magnitude pruning of a trained (or random)
    ``model`` to the layout :func:`~condensed_ops.condense` stores. Every sparsifiable
    layer (:func:`sparsifiable_weights`) gets its :func:`layer_densities` share of
    ``1 - sparsity`` (``"uniform"``: the same density everywhere). The weights are not
    changed; ``condense(model, masks=...)`` keeps what the masks keep."""
    return masks_per_layer(model, sparsity, density_method, exclude, lambda name, rows, fan_in: magnitude_prune_to_fan_in(rows, fan_in))


def masks_per_layer(
    model: nn.Module,
    sparsity: float,
    density_method: str,
    exclude: Collection[str],
    rows_mask: Callable[[str, Tensor, int], Tensor],
) -> Dict[str, Tensor]:
    """``{layer name: bool mask in the weight's shape}`` from ``rows_mask(name, rows,
    fan_in)``, called per sparsifiable layer with its weight as rows ``[out, in, ...]``
    (a ``Conv1D``'s transposed) and the fan-in of its :func:`layer_densities` density;
    it returns the mask in the rows' shape."""
    weights = sparsifiable_weights(model, exclude)
    densities = layer_densities({name: weight.shape for name, weight in weights.items()}, sparsity, density_method)
    transposed = transposed_layers(model)
    masks = {}
    for name, weight in weights.items():
        rows = weight.t() if name in transposed else weight
        mask = rows_mask(name, rows, fan_in_for_density(densities[name], rows[0].numel())).to(weight.device)
        masks[name] = mask.t().contiguous() if name in transposed else mask.view(weight.shape)
    return masks


@dataclass(frozen=True)
class PaddingReport:
    """What :func:`pad_to_constant_fan_in` added.

    Attributes:
        fan_in: the constant fan-in of the padded rows (the largest row count).
        padded_entries: zero-valued entries added.
        padding_fraction: ``padded_entries`` over the entries the padded layout
            stores (``fan_in`` per stored row): the share of kernel work spent on zeros.
        empty_rows: bool ``[out]``, rows that had no nonzero (ablated neurons).
        empty_rows_padded: whether those rows were padded (True) or left empty
            for the caller to drop (False).
    """

    fan_in: int
    padded_entries: int
    padding_fraction: float
    empty_rows: Tensor
    empty_rows_padded: bool


def pad_to_constant_fan_in(mask_or_sparse_weight: Tensor, pad_empty_rows: bool = True) -> Tuple[Tensor, PaddingReport]:
    """Turn an uneven mask (e.g. from unstructured RigL or global magnitude pruning)
    into a constant fan-in one by padding every row up to the largest row count.

    Args:
        mask_or_sparse_weight: a bool mask, or a weight whose nonzeros are kept,
            ``[out, in, *kernel]`` (rows are ``flatten(1)``).
        pad_empty_rows: with True every row is padded and the mask is constant
            fan-in throughout; with False rows with no entry (ablated neurons) are
            left empty, so the caller can drop them, and are not counted as stored.

    Returns:
        ``(padded mask in the input's shape, PaddingReport)``. Each row is padded
        with its lowest-numbered unused columns (deterministic); the weight is zero
        there, so condensing it with the padded mask stores zeros.
    """
    if mask_or_sparse_weight.dim() < 2:
        raise ValueError(
            f"mask_or_sparse_weight must have at least 2 dims [out, in, *kernel], got shape {list(mask_or_sparse_weight.shape)}"
        )
    mask = mask_or_sparse_weight.detach().flatten(1) != 0
    row_counts = mask.sum(dim=1)
    fan_in = int(row_counts.max()) if mask.shape[0] else 0
    empty_rows = row_counts == 0
    rows_to_pad = torch.ones_like(empty_rows) if pad_empty_rows else ~empty_rows

    # A stable sort of the unused columns puts the lowest-numbered ones first.
    unused_first = torch.sort((~mask).to(torch.int8), dim=1, descending=True, stable=True).indices
    rank = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    take = (rank < (fan_in - row_counts)[:, None]) & rows_to_pad[:, None]
    padding = torch.zeros_like(mask).scatter_(1, unused_first, take)
    padded = mask | padding

    padded_entries = int(padding.sum())
    stored_entries = int(rows_to_pad.sum()) * fan_in
    report = PaddingReport(
        fan_in=fan_in,
        padded_entries=padded_entries,
        padding_fraction=padded_entries / stored_entries if stored_entries else 0.0,
        empty_rows=empty_rows,
        empty_rows_padded=pad_empty_rows,
    )
    return padded.view(mask_or_sparse_weight.shape), report


__all__ = [
    "DENSITY_METHODS",
    "PaddingReport",
    "constant_fan_in_mask",
    "fan_in_for_density",
    "grouped_fan_in_mask",
    "is_sparsifiable",
    "layer_densities",
    "magnitude_masks",
    "magnitude_prune_to_fan_in",
    "pad_to_constant_fan_in",
    "sparsifiable_layers",
    "sparsifiable_weights",
    "transposed_layers",
]


def __dir__():  # what tab completion shows: the API, not the imports
    return sorted(__all__)
