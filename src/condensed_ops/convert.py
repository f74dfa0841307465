"""``condense``: swap a model's sparse ``nn.Linear`` / ``nn.Conv2d`` layers for their
condensed modules, and report what was converted and what was not, and why."""

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .attention import (
    PROJECTIONS,
    CondensedMultiheadAttention,
    attention_projections,
    attention_unsupported_reason,
    dense_projection,
    projection_masks,
)
from .masks import _attention_projections as _attention_projection_names
from .masks import is_transformers_conv1d
from .layout import RowPlan, plan_rows
from .modules import CondensedConv2d, CondensedLayer, CondensedLinear, _explicit_padding, _format_bytes, conv2d_unsupported_reason


@dataclass(frozen=True)
class ConvertedLayer:
    """One converted layer.

    Attributes:
        name: its name in the model (the first, when the same module sits at several).
        kind: ``"Linear"``, ``"Conv2d"`` or ``"Conv1D"`` (transformers' transposed Linear).
        out_features, in_features: the weight's rows and columns (a conv's columns
            are ``in_channels * kh * kw``).
        fan_in: entries stored per active neuron.
        density: stored entries (padding included) over ``out_features * in_features``.
        ablated_neurons: rows with no kept entry, not stored.
        padded_entries: zero-valued entries added to even out the rows.
        padding_fraction: ``padded_entries`` over the stored entries.
        dense_bytes, condensed_bytes: weight and bias bytes before, all stored bytes after.
        group_size: consecutive rows sharing their columns (1: the row layout).
    """

    name: str
    kind: str
    out_features: int
    in_features: int
    fan_in: int
    density: float
    ablated_neurons: int
    padded_entries: int
    padding_fraction: float
    dense_bytes: int
    condensed_bytes: int
    group_size: int = 1


@dataclass(frozen=True)
class SkippedLayer:
    """A layer left as it was, and why: a Linear / Conv2d / Conv1D / MultiheadAttention
    that does not gain or cannot be swapped, or any other module holding a weight
    (``kind`` its class) that condense does not convert."""

    name: str
    kind: str
    reason: str


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[bool]) -> List[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, right_aligned)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


@dataclass
class CondenseReport:
    """What :func:`condense` did. ``str(report)`` is a table; ``model`` is the
    converted model (the one passed in when ``inplace=True``)."""

    model: nn.Module = field(repr=False)
    converted: List[ConvertedLayer] = field(default_factory=list)
    skipped: List[SkippedLayer] = field(default_factory=list)

    def dense_bytes(self) -> int:
        """Bytes the converted layers took before."""
        return sum(layer.dense_bytes for layer in self.converted)

    def condensed_bytes(self) -> int:
        """Bytes the converted layers take now."""
        return sum(layer.condensed_bytes for layer in self.converted)

    def __str__(self) -> str:
        total = len(self.converted) + len(self.skipped)
        dense, condensed = self.dense_bytes(), self.condensed_bytes()
        lines = [f"condense: converted {len(self.converted)} of {total} layers with weights"]
        if self.converted:
            lines[0] += f", {_format_bytes(dense)} -> {_format_bytes(condensed)} ({100 * condensed / max(dense, 1):.1f}%)"
            rows = [
                [
                    layer.name,
                    layer.kind,
                    f"{layer.out_features}x{layer.in_features}",
                    str(layer.fan_in),
                    str(layer.group_size),
                    f"{layer.density:.3f}",
                    str(layer.ablated_neurons),
                    f"{layer.padded_entries} ({100 * layer.padding_fraction:.1f}%)",
                    _format_bytes(layer.dense_bytes),
                    _format_bytes(layer.condensed_bytes),
                ]
                for layer in self.converted
            ]
            header = ["name", "kind", "out x in", "fan-in", "group", "density", "ablated", "padding", "dense", "condensed"]
            lines += _table(header, rows, [False, False, True, True, True, True, True, True, True, True])
        if self.skipped:
            lines += ["", "skipped:"]
            rows = [[layer.name, layer.kind, layer.reason] for layer in self.skipped]
            lines += _table(["name", "kind", "reason"], rows, [False, False, False])
        return "\n".join(lines)


_CONVERTIBLE_TYPES = (nn.Linear, nn.Conv2d)


def _display_name(name: str) -> str:
    return name if name else "(model)"


def _is_layer(module: nn.Module) -> bool:
    """A Linear, Conv2d or transformers Conv1D, subclasses included (reported, not converted)."""
    return isinstance(module, _CONVERTIBLE_TYPES) or is_transformers_conv1d(module)


def _kind(module: nn.Module) -> str:
    return "Conv1D" if is_transformers_conv1d(module) else "Linear" if isinstance(module, nn.Linear) else "Conv2d"


def _rows_weight(module: nn.Module) -> Tensor:
    """The layer's weight as rows ``[out, in, ...]`` (a Conv1D stores it ``[in, out]``)."""
    return module.weight.t() if is_transformers_conv1d(module) else module.weight


def _unhandled_reason(module: nn.Module) -> Optional[str]:
    """Why a module that is not a layer condense converts, but holds a weight of its
    own (a parameter of 2 or more dims), stays as it is; None for one holding none."""
    held = [name for name, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if not held:
        return None
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "a lookup table: it reads rows of its weight, it does not multiply by it"
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "only nn.Conv2d convolutions (groups=1) are condensed"
    return (
        f"not a layer type condense converts (nn.Linear, nn.Conv2d, nn.MultiheadAttention, transformers Conv1D); "
        f"holds {', '.join(held)}"
    )


def _skip_reason(name: str, module: nn.Module, shared_parameters: Mapping[int, int]) -> Optional[str]:
    """Why the Linear / Conv2d / Conv1D ``module`` cannot be swapped regardless of its weights, or None."""
    if type(module) not in _CONVERTIBLE_TYPES and not is_transformers_conv1d(module):
        return f"a subclass ({type(module).__name__}) may behave differently or have its weight read by its owner"
    reason = _swap_blocker(name, module, shared_parameters)
    if reason is None and isinstance(module, nn.Conv2d):
        return conv2d_unsupported_reason(module)
    return reason


def _swap_blocker(name: str, module: nn.Module, shared_parameters: Mapping[int, int]) -> Optional[str]:
    """What a swap of ``module`` (any kind) would break, or None."""
    if not name:
        return "the model is itself the layer: convert it with its class's from_* method"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return "has hooks (e.g. spectral or weight norm) that the swap would drop"
    if any(shared_parameters[id(p)] > 1 for p in module.parameters(recurse=False)):
        return "its weight or bias is shared with another module (tied)"
    return None


def _refuse_distributed_wrappers(model: nn.Module, caller: str) -> None:
    """DDP and FSDP track the parameters that existed when they wrapped the model:
    swapping layers inside them would leave the new parameters unsynchronised."""
    wrappers: Tuple[type, ...] = ()
    for module_name, class_name in (
        ("torch.nn.parallel", "DistributedDataParallel"),
        ("torch.distributed.fsdp", "FullyShardedDataParallel"),
        ("torch.distributed.fsdp", "FSDPModule"),  # fully_shard (FSDP2)
    ):
        try:
            wrappers += (getattr(__import__(module_name, fromlist=[class_name]), class_name),)
        except (ImportError, AttributeError):  # torch without distributed support, or older
            pass
    for name, module in model.named_modules():
        if isinstance(module, wrappers):
            where = f"{name!r} is" if name else "the model is"
            raise ValueError(
                f"{caller}: {where} wrapped in {type(module).__name__}, which tracks the parameters that existed when "
                "it wrapped them; condense the model first, then wrap it"
            )


def condense(
    model: nn.Module,
    max_density: float = 0.5,
    *,
    max_padding: float = 0.25,
    min_weights: int = 100_000,
    masks: Optional[Mapping[str, Tensor]] = None,
    index_dtype: Optional[torch.dtype] = None,
    inplace: bool = True,
    group_size: Union[int, Mapping[str, int]] = 1,
) -> CondenseReport:
    """Replace every eligible ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention``
    and transformers ``Conv1D`` (GPT-2's transposed Linear) of ``model`` by a
    :class:`CondensedLinear` / :class:`CondensedConv2d` / :class:`CondensedMultiheadAttention`
    computing the same function.

    A layer's kept weights are ``masks[name]`` (e.g. an SRigL mask, in the weight's
    shape: ``[in, out]`` for a Conv1D) or, without one, its nonzeros. A layer is left as
    it is, and listed in ``report.skipped`` with the reason, when it is:

    - too dense to gain: stored density (padding included) above ``max_density``.
      At density ``d`` a float32 layer with int16 indices stores ``6d`` bytes per
      dense weight against 4 (even at 2/3); the default 0.5 leaves a margin for
      compute, where a dense GEMM does each multiply-add faster than a gather;
    - too uneven: padding the active rows to a constant fan-in would make more than
      ``max_padding`` of the stored entries zeros;
    - too small to gain: a Linear with fewer than ``min_weights`` dense weights
      (``out * in``). Below about 100k, a call's fixed cost (a few microseconds
      of Python and dispatch) outweighs the arithmetic saved at batch 1 on CPU;
      such layers still gain at larger batches, so pass ``min_weights=0`` when
      batches are large. (A Conv2d runs one row per output pixel, so it is never
      "small" this way.);
    - a Conv2d with groups != 1, a padding mode other than zeros, or ``"same"``
      padding that would be uneven;
    - the model itself, a subclass of Linear / Conv2d, a layer with hooks, or one
      whose parameters are shared with another module (the swap would break them).

    Every other module that holds a weight of its own (an ``nn.Embedding``, an
    ``nn.Conv1d``, a model's position embeddings...) is listed there too, with why.

    A module reachable under several names is converted once and replaced at every one.
    Condense before wrapping the model in DistributedDataParallel or FSDP (a wrapped
    model raises ValueError: the wrapper would not synchronise the new parameters).

    Args:
        model: the model; its layers are found by ``named_modules()``.
        max_density, max_padding, min_weights: the thresholds above.
        masks: ``{layer name: bool mask in the weight's shape}``.
        index_dtype: for every converted layer; None picks int16 when it reaches every column.
        inplace: False converts a deep copy and leaves ``model`` as it was.
        group_size: store Linear / Conv2d layers in the grouped layout (runs of this
            many output rows share their columns; faster at large batch; see
            :meth:`CondensedLinear.from_dense`), one int for all or ``{layer name: g}``.
            A layer whose rows it does not divide, or whose grouping would pad more
            than ``max_padding`` (a mask that is not grouped), keeps the row layout
            (``group`` 1 in the report). Attention projections keep the row layout.

    Returns:
        A :class:`CondenseReport`; ``report.model`` is the converted model.
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density!r}")
    if not 0.0 <= max_padding <= 1.0:
        raise ValueError(f"max_padding must be in [0, 1], got {max_padding!r}")
    if min_weights < 0:
        raise ValueError(f"min_weights must be >= 0, got {min_weights!r}")
    group_sizes = group_size if isinstance(group_size, Mapping) else {}
    for g in [group_size] if not isinstance(group_size, Mapping) else list(group_size.values()):
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group_size must be an int >= 1 (or a mapping of them), got {g!r}")
    _refuse_distributed_wrappers(model, "condense")
    masks = dict(masks or {})
    if not inplace:
        model = copy.deepcopy(model)
    names_of: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    unknown = set(masks) - {name for names in names_of.values() for name in names} - set(_attention_projection_names(model))
    if unknown:
        raise ValueError(f"masks names modules the model does not have: {sorted(unknown)}")
    # Owners per parameter, each module counted once: a module reachable under
    # several names is shared whole (and converted once), a tied weight is not.
    shared_parameters = Counter(id(p) for module in model.modules() for p in module.parameters(recurse=False))

    report = CondenseReport(model=model)
    thresholds = _Thresholds(max_density, max_padding, min_weights)
    replacements: List[Tuple[List[str], nn.Module]] = []
    inside_converted: List[str] = []  # the attention modules swapped whole: their out_proj goes with them
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_converted):
            continue
        names = names_of[id(module)]
        if isinstance(module, nn.MultiheadAttention):
            swapped = _condense_attention(name, module, masks, thresholds, shared_parameters, index_dtype, report)
            if swapped is not None:
                replacements.append((names, swapped))
                inside_converted.append(name)
            continue
        if not _is_layer(module):
            unhandled = None if isinstance(module, (CondensedLayer, CondensedMultiheadAttention)) else _unhandled_reason(module)
            if unhandled is not None:
                report.skipped.append(SkippedLayer(_display_name(name), type(module).__name__, unhandled))
            continue
        kind = _kind(module)
        reason = _skip_reason(name, module, shared_parameters)
        mask = next((masks[n] for n in names if n in masks), None)
        if mask is not None and kind == "Conv1D":
            mask = mask.t()
        plan: Optional[RowPlan] = None
        if reason is None:
            g = next((group_sizes[n] for n in names if n in group_sizes), 1) if group_sizes else int(group_size)  # type: ignore[arg-type]
            plan = _grouped_plan(_rows_weight(module), mask, g, thresholds.max_padding)
            reason = thresholds.reason_to_skip(plan, kind)
        if reason is not None:
            report.skipped.append(SkippedLayer(_display_name(name), kind, reason))
            continue
        assert plan is not None
        if isinstance(module, nn.Conv2d):
            condensed: CondensedLayer = CondensedConv2d._from_plan(module, plan, index_dtype)
        else:
            condensed = CondensedLinear._from_plan(_rows_weight(module), module.bias, plan, index_dtype)
            condensed.transposed_weight = kind == "Conv1D"
        condensed.train(module.training)
        replacements.append((names, condensed))
        report.converted.append(_converted(name, kind, plan, module.parameters(recurse=False), condensed))
    # Swap after the walk: named_modules must not see the model change under it.
    for names, condensed in replacements:
        for name in names:
            _swap(model, name, condensed)
    _leave_dense_fast_paths(model)
    return report


def _grouped_plan(weight: Tensor, mask: Optional[Tensor], group_size: int, max_padding: float) -> RowPlan:
    """The grouped plan when group_size divides the rows and pads at most
    max_padding of the stored entries; else the row layout's."""
    rows = plan_rows(weight, mask)
    if group_size == 1 or weight.shape[0] % group_size:
        return rows
    grouped = plan_rows(weight, mask, group_size)
    return grouped if grouped.padding_fraction <= max_padding else rows


@dataclass(frozen=True)
class _Thresholds:
    max_density: float
    max_padding: float
    min_weights: int

    def reason_to_skip(self, plan: RowPlan, kind: str) -> Optional[str]:
        weights = plan.out_features * plan.in_features
        if kind != "Conv2d" and weights < self.min_weights:
            return f"too small to gain at batch 1: {weights} weights < min_weights {self.min_weights}"
        if plan.density > self.max_density:
            return f"too dense to gain: density {plan.density:.3f} > max_density {self.max_density}"
        if plan.padding_fraction > self.max_padding:
            return (
                f"uneven fan-in: padding would be {100 * plan.padding_fraction:.1f}% of the stored entries "
                f"> max_padding {100 * self.max_padding:.0f}%"
            )
        return None


def _converted(name: str, kind: str, plan: RowPlan, dense_tensors: Iterable[Tensor], condensed: CondensedLayer) -> ConvertedLayer:
    return ConvertedLayer(
        name=name,
        kind=kind,
        out_features=plan.out_features,
        in_features=plan.in_features,
        fan_in=plan.fan_in,
        density=plan.density,
        ablated_neurons=plan.ablated_neurons,
        padded_entries=plan.padded_entries,
        padding_fraction=plan.padding_fraction,
        dense_bytes=sum(t.numel() * t.element_size() for t in dense_tensors if t is not None),
        condensed_bytes=condensed.storage_bytes(),
        group_size=plan.group_size,
    )


def _condense_attention(
    name: str,
    attention: nn.MultiheadAttention,
    masks: Mapping[str, Tensor],
    thresholds: _Thresholds,
    shared_parameters: Mapping[int, int],
    index_dtype: Optional[torch.dtype],
    report: CondenseReport,
) -> Optional[CondensedMultiheadAttention]:
    """The attention with its projections condensed where they gain (the others
    dense Linears), or None (reported) when none does or it cannot be swapped."""
    reason = attention_unsupported_reason(attention) or _swap_blocker(name, attention, shared_parameters)
    if reason is None and any(shared_parameters[id(p)] > 1 for p in attention.out_proj.parameters(recurse=False)):
        reason = "its out_proj's weight or bias is shared with another module (tied)"
    if reason is not None:
        report.skipped.append(SkippedLayer(_display_name(name), "MultiheadAttention", reason))
        return None
    projection_mask = projection_masks(name, attention, masks)
    projections: Dict[str, nn.Module] = {}
    converted, skipped = [], []
    for projection, (weight, bias) in attention_projections(attention).items():
        full_name = f"{name}.{projection}" if name else projection
        plan = plan_rows(weight, projection_mask[projection])
        skip = thresholds.reason_to_skip(plan, "Linear")
        if skip is not None:
            projections[projection] = dense_projection(weight, bias)
            skipped.append(SkippedLayer(full_name, "Linear", skip))
            continue
        condensed = CondensedLinear._from_plan(weight, bias, plan, index_dtype)
        condensed.values.requires_grad_(weight.requires_grad)
        if condensed.bias is not None and bias is not None:
            condensed.bias.requires_grad_(bias.requires_grad)
        projections[projection] = condensed
        converted.append(_converted(full_name, "Linear", plan, (weight, bias), condensed))
    report.skipped.extend(skipped)
    if not converted:
        return None
    report.converted.extend(converted)
    return CondensedMultiheadAttention.assemble(attention, projections)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, module)


def _condensed_blank(name: str, state_dict: Mapping[str, Tensor], like: nn.Module, dtype: torch.dtype) -> CondensedLayer:
    """A condensed module of ``like``'s shape, sized from the checkpoint's ``<name>.values``."""
    values = state_dict[name + ".values"]
    idx = state_dict.get(name + ".idx")
    index_dtype = idx.dtype if isinstance(idx, Tensor) and idx.dtype in (torch.int16, torch.int32) else None
    # A 3-D values is the grouped layout [groups, group_size, fan_in].
    group_size = int(values.shape[1]) if values.dim() == 3 else 1
    options = dict(
        active_neurons=values.shape[0] * group_size, index_dtype=index_dtype, device=values.device, dtype=dtype,
        group_size=group_size,
    )
    fan_in = int(values.shape[-1])
    if isinstance(like, nn.Linear):
        return nn.utils.skip_init(CondensedLinear, like.in_features, like.out_features, fan_in, like.bias is not None, **options)
    unsupported = conv2d_unsupported_reason(like)
    if unsupported is not None:
        raise ValueError(f"load_condensed: {name!r} cannot be condensed: {unsupported}")
    return nn.utils.skip_init(
        CondensedConv2d, like.in_channels, like.out_channels, like.kernel_size, fan_in, like.stride,
        _explicit_padding(like), like.dilation, like.bias is not None, **options,
    )


def _leave_dense_fast_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer / nn.TransformerEncoder have an inference fast
    path that reads their dense weights (linear1.weight, in_proj_weight...): turn it
    off where a part is condensed, through the flags that path itself checks."""
    def condensed_inside(module: nn.Module) -> bool:
        return any(isinstance(m, (CondensedLayer, CondensedMultiheadAttention)) for m in module.modules())

    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and condensed_inside(module):
            module.activation_relu_or_gelu = 0  # read only by the fast path
        elif isinstance(module, nn.TransformerEncoder) and condensed_inside(module):
            module.use_nested_tensor = False


def load_condensed(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True) -> nn.Module:
    """Load a condensed model's ``state_dict`` into ``model`` built the ordinary way.

    Every ``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D`` of ``model`` whose weight the checkpoint
    holds condensed (``<name>.values``, ``<name>.idx`` and, with ablated neurons,
    ``<name>.active_rows``) is replaced by a :class:`CondensedLinear` /
    :class:`CondensedConv2d` of the same shape, sized from the checkpoint; then
    ``model.load_state_dict(state_dict, strict)`` fills everything (and checks
    the condensed layouts: a bad index, dtype or shape raises naming its key). With
    ``strict``, a key the model has but the checkpoint does not is accepted only when
    it is tied to one the checkpoint holds (a tied weight saved once, as
    ``save_pretrained`` and ``safetensors.torch.save_model`` do). Works with
    ``torch.load(path)``'s default ``weights_only=True`` and with safetensors::

        model = make_model()                                  # dense architecture
        condensed_ops.load_condensed(model, torch.load("condensed.pt"))
        condensed_ops.load_condensed(model, safetensors.torch.load_file("model.safetensors"))

    Returns ``model``, changed in place.
    """
    _refuse_distributed_wrappers(model, "load_condensed")
    state_dict = _in_the_models_key_names(model, state_dict)
    # Attention modules first: their projections are layers only once swapped.
    for name, attention in list(model.named_modules()):
        if not isinstance(attention, nn.MultiheadAttention):
            continue
        prefix = f"{name}." if name else ""
        if not any(f"{prefix}{projection}.values" in state_dict for projection in PROJECTIONS):
            continue
        unsupported = attention_unsupported_reason(attention)
        if unsupported is not None:
            raise ValueError(f"load_condensed: {name!r} cannot be condensed: {unsupported}")
        projections: Dict[str, nn.Module] = {}
        for projection, (weight, bias) in attention_projections(attention).items():
            key = prefix + projection
            projections[projection] = (
                _condensed_blank(key, state_dict, nn.Linear(weight.shape[1], weight.shape[0], bias is not None), weight.dtype)
                if key + ".values" in state_dict
                else dense_projection(weight, bias)
            )
        _swap(model, name, CondensedMultiheadAttention.assemble(attention, projections))
    for name in (key[: -len(".values")] for key in list(state_dict) if key.endswith(".values")):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"load_condensed: the checkpoint condenses {name!r}, which the model does not have (a transformers "
                "checkpoint in another key format: save it with save_pretrained(..., save_original_format=False))"
            ) from None
        if isinstance(module, CondensedLayer):
            continue  # already condensed: its load takes the sizes
        if type(module) not in _CONVERTIBLE_TYPES and not is_transformers_conv1d(module):
            raise ValueError(
                f"load_condensed: {name!r} is a {type(module).__name__}, not an nn.Linear, nn.Conv2d or transformers Conv1D"
            )
        like = nn.Linear(*module.weight.shape, module.bias is not None, device="meta") if is_transformers_conv1d(module) else module
        condensed = _condensed_blank(name, state_dict, like, module.weight.dtype)
        if isinstance(condensed, CondensedLinear):
            condensed.transposed_weight = like is not module
        condensed.train(module.training)
        _swap(model, name, condensed)
    _leave_dense_fast_paths(model)
    result = model.load_state_dict(state_dict, strict=False)
    if strict:
        tied = _keys_tied_to_loaded_ones(model, state_dict)
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"load_condensed: the checkpoint does not fit {type(model).__name__}: missing keys {missing}, "
                f"unexpected keys {result.unexpected_keys}"
            )
    return model


def _in_the_models_key_names(model: nn.Module, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A transformers model's ``save_pretrained`` writes some architectures' keys in
    their original checkpoint format (e.g. ViT's ``attention.attention.key``), which
    ``from_pretrained`` renames back: rename them the same way (transformers' own
    renamings, read from its conversion mapping; any other model is left as it is)."""
    if not type(model).__module__.startswith("transformers."):
        return state_dict
    model_keys = set(model.state_dict())
    if all(key in model_keys for key in state_dict):
        return state_dict
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except Exception:  # another transformers version, without this machinery: keep the keys
        return state_dict

    def rename(key: str) -> str:
        for renaming in renamings:
            key = renaming.rename_source_key(key)[0]
        return key

    return {rename(key): value for key, value in state_dict.items()}


def _keys_tied_to_loaded_ones(model: nn.Module, state_dict: Mapping[str, Tensor]) -> set:
    """The model's keys whose tensor the checkpoint holds under another name
    (``save_pretrained`` and ``safetensors.torch.save_model`` keep one name of a tied
    weight, e.g. GPT-2's ``lm_head.weight`` = ``transformer.wte.weight``)."""
    names_of: Dict[int, List[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names_of.setdefault(id(tensor), []).append(name)
    return {key for names in names_of.values() if any(name in state_dict for name in names) for key in names if key not in state_dict}


__all__ = ["CondenseReport", "ConvertedLayer", "SkippedLayer", "condense", "load_condensed"]
