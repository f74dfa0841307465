"""Conversions between a dense weight and the condensed ``(values, idx)`` layout."""

from typing import Optional, Tuple

import torch
from torch import Tensor

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
    # A stable sort of the row mask puts the kept columns first, in ascending order.
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices
    idx = order[:, :fan_in]
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
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= in_features):
        raise IndexError(f"to_dense: idx must lie in [0, in_features={in_features}), got [{int(idx.min())}, {int(idx.max())}]")
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter_add_(1, idx.long(), values)
