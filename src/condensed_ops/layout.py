"""The condensed ``(values, idx)`` layout: conversions to and from a dense weight,
the plan of how a weight's rows are stored (:func:`plan_rows`), the index rules
(dtype, range) and how a module stores its indices."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .masks import pad_to_constant_fan_in

# int16 indices move half the bytes of int32 ones; they reach 32767 columns.
_INT16_MAX_IN_FEATURES = torch.iinfo(torch.int16).max


def default_index_dtype(in_features: int) -> torch.dtype:
    """int16 when every column fits in it (fewer bytes per weight), else int32."""
    return torch.int16 if in_features <= _INT16_MAX_IN_FEATURES else torch.int32


def check_index_dtype(index_dtype: object, in_features: int) -> None:
    """index_dtype must be an integer dtype the ops take that reaches column ``in_features - 1``
    (the one rule for constructors, conversions and loads)."""
    if index_dtype not in (torch.int16, torch.int32, torch.int64):
        raise TypeError(f"index_dtype must be torch.int16, torch.int32 or torch.int64, got {index_dtype}")
    highest = torch.iinfo(index_dtype).max
    if in_features - 1 > highest:
        raise ValueError(
            f"index_dtype={index_dtype} cannot address the layer's {in_features} input columns: it cannot hold "
            f"column {in_features - 1} (its largest index is {highest}); use torch.int32 or leave index_dtype=None"
        )


def first_bad_index(idx: Tensor, in_features: int) -> Optional[Tuple[int, int]]:
    """The first entry (row-major) of a 2-D ``idx`` outside ``[0, in_features)``, or None:
    the ops' rule, for the checks made in Python (checkpoints, :func:`to_dense`)."""
    if idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < in_features):
        return None
    row, column = ((idx < 0) | (idx >= in_features)).nonzero()[0].tolist()
    return row, column


def index_storage(idx: Tensor) -> Tensor:
    """How a module stores ``idx``: int16 indices as a flat run of bytes (the
    backends of DistributedDataParallel, gloo and NCCL, cannot broadcast int16),
    other dtypes as they are. :func:`index_view` gives ``idx`` back."""
    return idx.contiguous().view(-1).view(torch.uint8) if idx.dtype == torch.int16 else idx


def index_view(storage: Tensor, shape: List[int]) -> Tensor:
    """The index tensor of ``shape`` that :func:`index_storage` stored (a view, no copy).
    Scripted code makes it with an op: TorchScript cannot spell ``view(dtype)``."""
    if torch.jit.is_scripting():
        return torch.ops.condensed_ops.index_view(storage, shape)
    return storage.view(dtype=torch.int16).view(shape) if storage.dtype == torch.uint8 else storage


def to_condensed(
    dense_weight: Tensor, mask: Optional[Tensor] = None, index_dtype: Optional[torch.dtype] = None
) -> Tuple[Tensor, Tensor]:
    """Condense a constant fan-in weight ``[out, in]`` into ``(values [out, k], idx [out, k])``.

    The kept entries are ``mask`` (or, without one, the nonzeros of
    ``dense_weight``); every row must keep the same number ``k``. Each row's
    indices come out ascending, so kernels read ``x`` in address order.
    """
    if dense_weight.dim() != 2:
        raise ValueError(f"to_condensed: dense_weight must be 2-D [out_features, in_features], got shape {list(dense_weight.shape)}")
    if mask is None:
        mask = dense_weight != 0
    elif mask.shape != dense_weight.shape:
        raise ValueError(f"to_condensed: mask must have dense_weight's shape {list(dense_weight.shape)}, got {list(mask.shape)}")
    mask = mask.to(device=dense_weight.device, dtype=torch.bool)
    out_features, in_features = dense_weight.shape
    if index_dtype is None:
        index_dtype = default_index_dtype(in_features)
    check_index_dtype(index_dtype, in_features)

    fan_in_per_row = mask.sum(dim=1)
    fan_in = int(fan_in_per_row[0]) if out_features else 0
    if out_features and not bool((fan_in_per_row == fan_in).all()):
        raise ValueError(
            "to_condensed: every row must keep the same number of weights (constant fan-in), got between "
            f"{int(fan_in_per_row.min())} and {int(fan_in_per_row.max())} per row"
        )
    # nonzero() lists the kept entries row by row, columns ascending (no sort).
    idx = mask.nonzero()[:, 1].view(out_features, fan_in)
    values = torch.gather(dense_weight, 1, idx)
    return values.contiguous(), idx.to(index_dtype).contiguous()


def to_dense(values: Tensor, idx: Tensor, in_features: int) -> Tensor:
    """Scatter ``(values, idx)`` back into a dense ``[out, in_features]`` weight.

    Also takes the grouped layout (``values [groups, group_size, fan_in]``,
    ``idx [groups, fan_in]``: ``out = groups * group_size``). Repeated indices in a
    row add up, exactly as ``condensed_linear`` sums them.
    """
    if values.dim() == 3 and idx.dim() == 2 and idx.shape == (values.shape[0], values.shape[2]):
        idx = idx.repeat_interleave(values.shape[1], dim=0)
        values = values.reshape(-1, values.shape[2])
    if values.dim() != 2 or idx.shape != values.shape:
        raise ValueError(
            "to_dense: values and idx must both be [out_features, fan_in] (or values [groups, group_size, fan_in] "
            f"and idx [groups, fan_in]), got {list(values.shape)} and {list(idx.shape)}"
        )
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"to_dense: idx must be an integer tensor, got {idx.dtype}")
    bad = first_bad_index(idx, in_features)
    if bad is not None:
        raise IndexError(f"to_dense: idx[{bad[0]}, {bad[1]}] = {int(idx[bad])} is outside [0, in_features={in_features})")
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter_add_(1, idx.long(), values)


@dataclass(frozen=True)
class RowPlan:
    """How the rows ``[out, in]`` of a weight are stored condensed; computed by
    :func:`plan_rows` before anything is built, so :func:`~condensed_ops.condense`
    can decide whether a layer is worth converting.

    Attributes:
        kept: bool ``[out, in]``, the entries stored (the padding included).
        padding: bool ``[out, in]``, the zero-valued entries added to even the rows out.
        active_rows: int64 ``[active]``, the rows with at least one kept entry, ascending.
        fan_in: entries stored per active row.
        padded_entries: ``padding.sum()``.
        padding_fraction: ``padded_entries`` over the stored entries: the share of
            kernel work spent on zeros.
        group_size: consecutive rows that share their columns (1: each row its own).
    """

    kept: Tensor
    padding: Tensor
    active_rows: Tensor
    fan_in: int
    padded_entries: int
    padding_fraction: float
    group_size: int = 1

    @property
    def out_features(self) -> int:
        return self.kept.shape[0]

    @property
    def in_features(self) -> int:
        return self.kept.shape[1]

    @property
    def ablated_neurons(self) -> int:
        return self.out_features - self.active_rows.numel()

    @property
    def density(self) -> float:
        """Stored entries over the dense weight's: what the kernel reads and computes."""
        dense_entries = self.out_features * self.in_features
        return self.active_rows.numel() * self.fan_in / dense_entries if dense_entries else 0.0


def plan_rows(weight: Tensor, mask: Optional[Tensor] = None, group_size: int = 1) -> RowPlan:
    """Plan the condensed storage of ``weight`` ``[out, in, *kernel]`` (rows are ``flatten(1)``).

    The kept entries are ``mask`` (same shape as ``weight``) or, without one, the
    nonzeros of ``weight``. Rows keeping nothing are ablated; the others are padded
    up to the largest row count. With ``group_size`` g > 1 (it must divide ``out``),
    each run of g consecutive rows is stored as one group over the union of its
    rows' columns: groups keeping nothing are ablated, the others padded to the
    largest union (zeros where a row of the group did not keep the column).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims [out, in, *kernel], got shape {list(weight.shape)}")
    if mask is None:
        kept = weight.detach().flatten(1) != 0
    elif mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {list(weight.shape)}, got {list(mask.shape)}")
    else:
        kept = mask.to(device=weight.device, dtype=torch.bool).flatten(1)
    if group_size > 1:
        return _plan_groups(kept, group_size)

    row_counts = kept.sum(dim=1)
    active = row_counts > 0
    active_counts = row_counts[active]
    padding = torch.zeros_like(kept)
    padded_entries, padding_fraction = 0, 0.0
    if active_counts.numel() and int(active_counts.min()) != int(active_counts.max()):
        padded, report = pad_to_constant_fan_in(kept, pad_empty_rows=False)
        padding = padded & ~kept
        kept = padded
        padded_entries, padding_fraction = report.padded_entries, report.padding_fraction
    return RowPlan(
        kept=kept,
        padding=padding,
        active_rows=active.nonzero().flatten(),
        fan_in=int(active_counts.max()) if active_counts.numel() else 0,
        padded_entries=padded_entries,
        padding_fraction=padding_fraction,
    )


def _plan_groups(kept: Tensor, group_size: int) -> RowPlan:
    out_features, in_features = kept.shape
    if out_features % group_size:
        raise ValueError(f"group_size={group_size} must divide the layer's {out_features} output rows")
    groups = kept.view(out_features // group_size, group_size, in_features).any(dim=1)
    group_plan = plan_rows(groups)  # the groups as rows: ablation and padding
    group_kept = group_plan.kept.repeat_interleave(group_size, dim=0)
    padding = group_kept & ~kept
    stored = group_plan.active_rows.numel() * group_size * group_plan.fan_in
    padded_entries = int(padding.sum())
    active_rows = (group_plan.active_rows[:, None] * group_size + torch.arange(group_size, device=kept.device)).flatten()
    return RowPlan(
        kept=group_kept,
        padding=padding,
        active_rows=active_rows,
        fan_in=group_plan.fan_in,
        padded_entries=padded_entries,
        padding_fraction=padded_entries / stored if stored else 0.0,
        group_size=group_size,
    )
