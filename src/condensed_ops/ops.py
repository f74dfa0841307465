"""The Python door to the compiled ops: typed, scriptable wrappers and the fake
(meta) kernels that let torch.compile trace them."""

from typing import Optional

import torch
from torch import Tensor

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def condensed_linear(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Constant fan-in sparse linear layer.

    ``y[..., o] = bias[o] + sum_j values[o, j] * x[..., idx[o, j]]``

    Args:
        x: ``[..., in_features]``, float32 / float16 / bfloat16 / float64, any strides.
        values: ``[out_features, fan_in]``, same dtype as ``x``.
        idx: ``[out_features, fan_in]``, int16 / int32 / int64, every entry in
            ``[0, in_features)`` (checked; an IndexError names the first bad one).
        bias: optional ``[out_features]``, same dtype as ``x``.

    Returns:
        ``[..., out_features]`` in ``x``'s dtype, summed in float32 (float64 for float64).
    """
    return torch.ops.condensed_ops.condensed_linear(x, values, idx, bias)


@torch.library.register_fake("condensed_ops::condensed_linear")
def _condensed_linear_fake(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    # The same shape/dtype contract as the C++ checks, so torch.compile reports
    # bad calls at trace time with the same messages. Index values are data:
    # only the real kernels can check them.
    torch._check_value(values.dim() == 2, lambda: f"condensed_linear: values must be 2-D [out_features, fan_in], got shape {list(values.shape)}")
    torch._check_value(idx.dim() == 2, lambda: f"condensed_linear: idx must be 2-D [out_features, fan_in], got shape {list(idx.shape)}")
    torch._check_value(idx.shape == values.shape, lambda: f"condensed_linear: idx must have the same shape as values, got idx {list(idx.shape)} and values {list(values.shape)}")
    torch._check_value(x.dim() >= 1, lambda: "condensed_linear: x must have at least 1 dimension [..., in_features], got a scalar")
    torch._check_type(values.dtype in _VALUE_DTYPES, lambda: f"condensed_linear: values must be float32, float16, bfloat16 or float64, got {values.dtype}")
    torch._check_type(x.dtype == values.dtype, lambda: f"condensed_linear: x and values must share a dtype, got x {x.dtype} and values {values.dtype}")
    torch._check_type(idx.dtype in _INDEX_DTYPES, lambda: f"condensed_linear: idx must be int16, int32 or int64, got {idx.dtype}")
    torch._check_value(values.device == x.device, lambda: f"condensed_linear: values must be on x's device ({x.device}), got {values.device}")
    torch._check_value(idx.device == x.device, lambda: f"condensed_linear: idx must be on x's device ({x.device}), got {idx.device}")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == values.shape[0], lambda: f"condensed_linear: bias must have shape [out_features] = [{values.shape[0]}], got {list(bias.shape)}")
        torch._check_type(bias.dtype == values.dtype, lambda: f"condensed_linear: bias must have values' dtype ({values.dtype}), got {bias.dtype}")
        torch._check_value(bias.device == x.device, lambda: f"condensed_linear: bias must be on x's device ({x.device}), got {bias.device}")
    return x.new_empty((*x.shape[:-1], values.shape[0]))
