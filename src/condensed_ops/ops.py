"""The Python door to the compiled ops: typed, scriptable wrappers, the one call
path of the condensed modules (:func:`condensed_layer`), and the fake (meta)
kernels that let torch.compile trace the ops."""

from typing import List, Optional

import torch
from torch import Tensor

from . import _C

# Batch rows up to which the window layout beats the row layout (CPU inference).
WINDOW_MAX_BATCH: int = int(_C.WINDOW_MAX_BATCH)

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def condensed_linear(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Constant fan-in sparse linear layer.

    ``y[..., o] = bias[o] + sum_j values[o, j] * x[..., idx[o, j]]``

    Args:
        x: ``[..., in_features]``, float32 / float16 / bfloat16 / float64, any strides.
        values: ``[out_features, fan_in]``, same dtype as ``x``; or, for the
            *grouped* layout, ``[groups, group_size, fan_in]``: the ``group_size``
            consecutive outputs of a group share its ``fan_in`` columns
            (``out_features = groups * group_size``), so each column of ``x`` a
            kernel loads serves ``group_size`` outputs (fast at large batch).
        idx: ``[out_features, fan_in]`` (grouped: ``[groups, fan_in]``), int16 /
            int32 / int64, every entry in ``[0, in_features)`` (checked; an
            IndexError names the first bad one).
        bias: optional ``[out_features]``, same dtype as ``x``.

    Returns:
        ``[..., out_features]`` in ``x``'s dtype, summed in float32 (float64 for float64).

    Differentiable in ``x``, ``values`` and ``bias`` (the backward is registered
    in C++, so it also works in TorchScript models loaded without this package).
    """
    if not torch.jit.is_scripting():
        _check_tensors("condensed_linear", x=x, values=values, idx=idx, bias=bias)
        if torch.onnx.is_in_onnx_export():
            return _condensed_linear_in_standard_ops(x, values, idx, bias)
    if values.dim() == 3:
        return torch.ops.condensed_ops.condensed_linear_grouped(x, values, idx, bias)
    return torch.ops.condensed_ops.condensed_linear(x, values, idx, bias)


def condensed_layer(
    x: Tensor,
    values: Tensor,
    idx: Tensor,
    bias: Optional[Tensor],
    active_rows: Optional[Tensor],
    ablated_rows: Optional[Tensor],
    output_order: Optional[Tensor],
    out_features: int,
    window_max_batch: int = WINDOW_MAX_BATCH,
) -> Tensor:
    """A stored layer's forward: the one call path of
    :class:`~condensed_ops.CondensedLinear` and :class:`~condensed_ops.CondensedConv2d`.
    It decides how this call runs, then runs it:

    - CPU inference on at most ``window_max_batch`` batch rows (no gradient
      needed, outside autocast and ONNX export, ``x`` in the values' dtype): the
      window layout (:func:`pack_for_inference`, cached per version of
      ``values`` / ``idx``), which computes all ``out_features`` outputs in order;
      ablated neurons are empty lanes that output their bias.
    - Otherwise :func:`condensed_linear` over the stored (active) rows, and the
      ablated neurons' outputs (their bias, or 0) put in place by one gather.

    ``active_rows`` (the output of each stored row), ``ablated_rows`` and
    ``output_order`` (where each output sits in ``[active outputs, ablated ones]``)
    are all None when no neuron is ablated. ``window_max_batch`` 0 turns the window
    layout off.
    """
    if _runs_window_layout(x, values, bias, window_max_batch):
        return torch.ops.condensed_ops.condensed_linear_windowed(x, values, idx, out_features, bias, active_rows)
    if active_rows is None or ablated_rows is None or output_order is None:
        return condensed_linear(x, values, idx, bias)
    active_out = condensed_linear(x, values, idx, None if bias is None else bias.index_select(0, active_rows))
    ablated_shape: List[int] = list(active_out.shape[:-1])
    ablated_shape.append(ablated_rows.numel())
    ablated_out = active_out.new_zeros(ablated_shape) if bias is None else bias.index_select(0, ablated_rows).expand(ablated_shape)
    # One gather along the last dim puts the neurons back in order: about twice
    # as fast as index_copy into a [..., out_features] tensor at batch 256.
    return torch.cat([active_out, ablated_out], dim=-1).index_select(-1, output_order)


def _runs_window_layout(x: Tensor, values: Tensor, bias: Optional[Tensor], window_max_batch: int) -> bool:
    if window_max_batch <= 0 or not x.is_cpu or x.dtype != values.dtype:
        return False  # (a dtype mismatch: the row layout's op raises the TypeError naming x and both dtypes)
    if x.numel() > window_max_batch * x.shape[-1] or _exporting_to_onnx() or _autocast_enabled("cpu"):
        return False  # autocast casts the weights per region: the row layout's op runs then
    return not torch.is_grad_enabled() or not (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad))


def _exporting_to_onnx() -> bool:
    if torch.jit.is_scripting():
        return False
    return torch.onnx.is_in_onnx_export()


def _autocast_enabled(device_type: str) -> bool:
    if torch.jit.is_scripting():
        # TorchScript has no torch.amp autocast here (torch.is_autocast_cpu_enabled()
        # even crashes a scripted function under autocast, torch 2.13).
        return False
    return torch.is_autocast_enabled(device_type)


# How torch.onnx.export writes condensed_linear (see onnx_export_as).
_ONNX_FORMS = ("gather", "dense")
_onnx_form = "gather"


@torch.jit.unused
def _condensed_linear_in_standard_ops(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The op in operators every ONNX runtime has: Gather + Mul + ReduceSum, or a
    dense MatMul of the scattered weight."""
    if values.dim() == 3:  # grouped: the same sums over rows, each group's idx row repeated
        idx = idx.repeat_interleave(values.shape[1], dim=0)
        values = values.reshape(-1, values.shape[2])
    if _onnx_form == "dense":
        weight = values.new_zeros(values.shape[0], x.shape[-1]).scatter_add(1, idx.long(), values)
        return torch.nn.functional.linear(x, weight, bias)
    y = (x[..., idx.long()] * values).sum(-1)  # x[..., idx]: [..., out, fan_in]
    return y if bias is None else y + bias


class onnx_export_as:
    """Context manager choosing how ``torch.onnx.export`` writes condensed layers
    (both in standard ONNX operators that onnxruntime runs):

    - ``"gather"`` (the default): Gather of ``x``'s columns, Mul by the values, ReduceSum;
      the model keeps its sparse size.
    - ``"dense"``: the weight scattered to dense (at export) and one MatMul; faster in
      runtimes with a fast GEMM, the size of the dense model.

    ::

        with condensed_ops.onnx_export_as("dense"):
            torch.onnx.export(model, (x,), "model.onnx")
    """

    def __init__(self, form: str) -> None:
        if form not in _ONNX_FORMS:
            raise ValueError(f"onnx_export_as: form must be one of {_ONNX_FORMS}, got {form!r}")
        self.form = form
        self._previous = _onnx_form

    def __enter__(self) -> "onnx_export_as":
        global _onnx_form
        self._previous, _onnx_form = _onnx_form, self.form
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _onnx_form
        _onnx_form = self._previous


@torch.jit.unused
def _check_tensors(op: str, **arguments: object) -> None:
    """TypeError naming the first argument that is not a tensor (None allowed for bias)."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor) and not (name == "bias" and value is None):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def pack_for_inference(
    values: Tensor, idx: Tensor, in_features: int, active_rows: Optional[Tensor] = None, out_features: Optional[int] = None
) -> Tensor:
    """``(values, idx)`` rearranged for fast small-batch inference on CPU (the *window layout*).

    Rows are interleaved 16 at a time, one per SIMD lane, and each row's entries
    are grouped by windows of ``x``'s columns, so the kernel reads ``x`` with
    register permutes (AVX-512) or scalar loads instead of gathers. Use the
    result with :func:`condensed_linear_packed`; it is a uint8 tensor with no
    meaning of its own. ``CondensedLinear`` / ``CondensedConv2d`` do this for you
    when no gradient is needed.

    Cached: calling again with the same ``values`` and ``idx``, unchanged (their
    version counters and a sample of their elements), returns the same tensor in
    microseconds; after any in-place torch op or ``torch.optim`` step (fused ones
    included) it is rebuilt. After a write that torch does not see (``.data``,
    numpy, DLPack) call :func:`~condensed_ops.mark_modified`: a change of a few
    entries can otherwise go unseen (the result is then stale, never out of
    bounds). The cache holds a layout while its ``values`` and ``idx`` live.

    Memory: each step (one entry of each of 16 rows, padded where a row has
    fewer) takes 16 * (value bytes + 1); at 90% sparsity with random columns the
    layout is about 1.4x the bytes of ``values`` + ``idx`` with AVX-512 (64-column
    windows) and about 1.05x elsewhere (256-column windows), float32.
    With ``active_rows`` (int64 ``[values.shape[0]]``: the output each row computes,
    distinct, in ``[0, out_features)``), the layout computes all ``out_features``
    outputs in order; the others (ablated neurons) output their bias, at no cost
    but padding.

    Validates ``idx`` like :func:`condensed_linear` (IndexError naming the entry). CPU only.
    """
    if not torch.jit.is_scripting():
        _check_tensors("pack_for_inference", values=values, idx=idx)
    return torch.ops.condensed_ops.pack_for_inference(values, idx, in_features, active_rows, out_features)


def condensed_linear_packed(x: Tensor, packed: Tensor, out_features: int, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`condensed_linear` from a layout made by :func:`pack_for_inference`.

    Args:
        x: ``[..., in_features]`` in the packed values' dtype.
        packed: ``pack_for_inference(values, idx, in_features)``; checked before use
            (a tensor that is not one raises ValueError, never reads out of bounds).
        out_features: ``values.shape[0]``.
        bias: optional ``[out_features]``, ``x``'s dtype.

    Fastest for a few batch rows (``condensed_ops._C.WINDOW_MAX_BATCH``); correct for
    any. Not differentiable: the layout is for inference. CPU only.
    """
    if not torch.jit.is_scripting():
        _check_tensors("condensed_linear_packed", x=x, packed=packed, bias=bias)
    return torch.ops.condensed_ops.condensed_linear_packed(x, packed, out_features, bias)


def _check_weight_layout(values: Tensor, idx: Tensor, op: str = "condensed_linear") -> None:
    torch._check_value(values.dim() == 2, lambda: f"{op}: values must be 2-D [out_features, fan_in], got shape {list(values.shape)}")
    _check_index_dtype(idx, op)
    torch._check_value(idx.shape == values.shape, lambda: f"{op}: idx must have the same shape as values, got idx {list(idx.shape)} and values {list(values.shape)}")
    torch._check_type(values.dtype in _VALUE_DTYPES, lambda: f"{op}: values must be float32, float16, bfloat16 or float64, got {values.dtype}")


def _check_grouped_layout(values: Tensor, idx: Tensor, op: str) -> None:
    torch._check_value(values.dim() == 3, lambda: f"{op}: values must be 3-D [groups, group_size, fan_in], got shape {list(values.shape)}")
    torch._check_type(idx.dtype in _INDEX_DTYPES, lambda: f"{op}: idx must be int16, int32 or int64, got {idx.dtype}")
    torch._check_value(
        idx.dim() == 2 and idx.shape[0] == values.shape[0] and idx.shape[1] == values.shape[2],
        lambda: f"{op}: idx must be [groups, fan_in] = [{values.shape[0]}, {values.shape[2]}] for values of shape {list(values.shape)}, got {list(idx.shape)}",
    )
    torch._check_type(values.dtype in _VALUE_DTYPES, lambda: f"{op}: values must be float32, float16, bfloat16 or float64, got {values.dtype}")


def _check_index_dtype(idx: Tensor, op: str = "condensed_linear") -> None:
    torch._check_type(idx.dtype in _INDEX_DTYPES, lambda: f"{op}: idx must be int16, int32 or int64, got {idx.dtype}")
    torch._check_value(idx.dim() == 2, lambda: f"{op}: idx must be 2-D [out_features, fan_in], got shape {list(idx.shape)}")


def _check_same_device(name: str, t: Tensor, reference: Tensor, reference_name: str, op: str = "condensed_linear") -> None:
    torch._check_value(t.device == reference.device, lambda: f"{op}: {name} must be on {reference_name}'s device ({reference.device}), got {t.device}")


# Fake (meta) kernels: the same shape/dtype contract as the C++ checks
# (csrc/condensed_linear.cpp), with the same messages, so torch.compile reports
# bad calls at trace time. Index values are data: only real kernels check them.


@torch.library.register_fake("condensed_ops::condensed_linear")
def _condensed_linear_fake(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _check_weight_layout(values, idx)
    torch._check_value(x.dim() >= 1, lambda: "condensed_linear: x must have at least 1 dimension [..., in_features], got a scalar")
    torch._check_type(x.dtype == values.dtype, lambda: f"condensed_linear: x and values must share a dtype, got x {x.dtype} and values {values.dtype}")
    _check_same_device("values", values, x, "x")
    _check_same_device("idx", idx, x, "x")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == values.shape[0], lambda: f"condensed_linear: bias must have shape [out_features] = [{values.shape[0]}], got {list(bias.shape)}")
        torch._check_type(bias.dtype == values.dtype, lambda: f"condensed_linear: bias must have values' dtype ({values.dtype}), got {bias.dtype}")
        _check_same_device("bias", bias, x, "x")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("condensed_ops::condensed_linear_grouped")
def _condensed_linear_grouped_fake(x: Tensor, values: Tensor, idx: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    op = "condensed_linear_grouped"
    _check_grouped_layout(values, idx, op)
    torch._check_value(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension [..., in_features], got a scalar")
    torch._check_type(x.dtype == values.dtype, lambda: f"{op}: x and values must share a dtype, got x {x.dtype} and values {values.dtype}")
    _check_same_device("values", values, x, "x", op)
    _check_same_device("idx", idx, x, "x", op)
    out_features = values.shape[0] * values.shape[1]
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == out_features, lambda: f"{op}: bias must have shape [out_features] = [{out_features}], got {list(bias.shape)}")
        torch._check_type(bias.dtype == values.dtype, lambda: f"{op}: bias must have values' dtype ({values.dtype}), got {bias.dtype}")
        _check_same_device("bias", bias, x, "x", op)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("condensed_ops::condensed_linear_grad_input")
def _condensed_linear_grad_input_fake(grad_y: Tensor, values: Tensor, idx: Tensor, in_features: int) -> Tensor:
    _check_weight_layout(values, idx)
    torch._check_value(grad_y.dim() >= 1 and grad_y.shape[-1] == values.shape[0], lambda: f"condensed_linear: grad_y must be [..., out_features] with out_features = {values.shape[0]}, got shape {list(grad_y.shape)}")
    torch._check_type(grad_y.dtype == values.dtype, lambda: f"condensed_linear: grad_y must have values' dtype ({values.dtype}), got {grad_y.dtype}")
    _check_same_device("values", values, grad_y, "grad_y")
    _check_same_device("idx", idx, grad_y, "grad_y")
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@torch.library.register_fake("condensed_ops::condensed_linear_grad_values")
def _condensed_linear_grad_values_fake(grad_y: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    _check_index_dtype(idx)
    torch._check_type(x.dtype in _VALUE_DTYPES, lambda: f"condensed_linear: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    torch._check_type(grad_y.dtype == x.dtype, lambda: f"condensed_linear: grad_y must have x's dtype ({x.dtype}), got {grad_y.dtype}")
    torch._check_value(
        x.dim() >= 1 and grad_y.dim() == x.dim() and grad_y.shape[-1] == idx.shape[0] and grad_y.shape[:-1] == x.shape[:-1],
        lambda: f"condensed_linear: grad_y must be x's leading dims + [out_features = {idx.shape[0]}], got grad_y {list(grad_y.shape)} and x {list(x.shape)}",
    )
    _check_same_device("grad_y", grad_y, x, "x")
    _check_same_device("idx", idx, x, "x")
    return x.new_empty(idx.shape)


def _check_pack_inputs(values: Tensor, idx: Tensor, active_rows: Optional[Tensor], out_features: Optional[int], op: str) -> None:
    if values.dim() == 3:
        _check_grouped_layout(values, idx, op)
    else:
        _check_weight_layout(values, idx, op)
    _check_same_device("idx", idx, values, "values", op)
    rows = values.shape[0] * values.shape[1] if values.dim() == 3 else values.shape[0]
    outputs = rows if out_features is None else out_features
    if active_rows is None:
        torch._check_value(outputs == rows, lambda: f"{op}: out_features must be the rows of values ({rows}) without active_rows, got {outputs}")
    else:
        torch._check_type(active_rows.dtype == torch.int64, lambda: f"{op}: active_rows must be int64, got {active_rows.dtype}")
        torch._check_value(active_rows.dim() == 1 and active_rows.shape[0] == rows, lambda: f"{op}: active_rows must have one entry per row of values ({rows}), got shape {list(active_rows.shape)}")
        _check_same_device("active_rows", active_rows, values, "values", op)
        torch._check_value(outputs >= rows, lambda: f"{op}: out_features must be >= the rows of values ({rows}) with active_rows, got {outputs}")


@torch.library.register_fake("condensed_ops::condensed_linear_grouped_grad_input")
def _condensed_linear_grouped_grad_input_fake(grad_y: Tensor, values: Tensor, idx: Tensor, in_features: int) -> Tensor:
    op = "condensed_linear_grouped"
    _check_grouped_layout(values, idx, op)
    out_features = values.shape[0] * values.shape[1]
    torch._check_value(grad_y.dim() >= 1 and grad_y.shape[-1] == out_features, lambda: f"{op}: grad_y must be [..., out_features] with out_features = groups * group_size = {out_features}, got shape {list(grad_y.shape)}")
    torch._check_type(grad_y.dtype == values.dtype, lambda: f"{op}: grad_y must have values' dtype ({values.dtype}), got {grad_y.dtype}")
    _check_same_device("values", values, grad_y, "grad_y", op)
    _check_same_device("idx", idx, grad_y, "grad_y", op)
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@torch.library.register_fake("condensed_ops::condensed_linear_grouped_grad_values")
def _condensed_linear_grouped_grad_values_fake(grad_y: Tensor, x: Tensor, idx: Tensor, group_size: int) -> Tensor:
    op = "condensed_linear_grouped"
    torch._check_type(idx.dtype in _INDEX_DTYPES, lambda: f"{op}: idx must be int16, int32 or int64, got {idx.dtype}")
    torch._check_value(idx.dim() == 2, lambda: f"{op}: idx must be 2-D [groups, fan_in], got shape {list(idx.shape)}")
    torch._check_value(group_size >= 1, lambda: f"{op}: group_size must be >= 1, got {group_size}")
    torch._check_type(x.dtype in _VALUE_DTYPES, lambda: f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    torch._check_type(grad_y.dtype == x.dtype, lambda: f"{op}: grad_y must have x's dtype ({x.dtype}), got {grad_y.dtype}")
    out_features = idx.shape[0] * group_size
    torch._check_value(
        x.dim() >= 1 and grad_y.dim() == x.dim() and grad_y.shape[-1] == out_features and grad_y.shape[:-1] == x.shape[:-1],
        lambda: f"{op}: grad_y must be x's leading dims + [out_features = groups * group_size = {out_features}], got grad_y {list(grad_y.shape)} and x {list(x.shape)}",
    )
    _check_same_device("grad_y", grad_y, x, "x", op)
    _check_same_device("idx", idx, x, "x", op)
    return x.new_empty((idx.shape[0], group_size, idx.shape[1]))


@torch.library.register_fake("condensed_ops::pack_for_inference")
def _pack_for_inference_fake(
    values: Tensor, idx: Tensor, in_features: int, active_rows: Optional[Tensor] = None, out_features: Optional[int] = None
) -> Tensor:
    _check_pack_inputs(values, idx, active_rows, out_features, "pack_for_inference")
    # The layout's size depends on where idx's entries fall: data, not shape.
    size = torch.library.get_ctx().new_dynamic_size()
    return values.new_empty((size,), dtype=torch.uint8)


def _check_packed_call(x: Tensor, out_features: int, bias: Optional[Tensor], op: str) -> None:
    torch._check_value(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension [..., in_features], got a scalar")
    torch._check_type(x.dtype in _VALUE_DTYPES, lambda: f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    torch._check_value(out_features >= 0, lambda: f"{op}: out_features must be >= 0, got {out_features}")
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == out_features, lambda: f"{op}: bias must have shape [out_features] = [{out_features}], got {list(bias.shape)}")
        torch._check_type(bias.dtype == x.dtype, lambda: f"{op}: bias must have x's dtype ({x.dtype}), got {bias.dtype}")
        _check_same_device("bias", bias, x, "x", op)


@torch.library.register_fake("condensed_ops::condensed_linear_packed")
def _condensed_linear_packed_fake(x: Tensor, packed: Tensor, out_features: int, bias: Optional[Tensor] = None) -> Tensor:
    op = "condensed_linear_packed"
    _check_packed_call(x, out_features, bias, op)
    torch._check_type(packed.dtype == torch.uint8 and packed.dim() == 1, lambda: f"{op}: packed must be the 1-D uint8 tensor pack_for_inference returns, got {packed.dtype} of shape {list(packed.shape)}")
    _check_same_device("packed", packed, x, "x", op)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("condensed_ops::condensed_linear_windowed")
def _condensed_linear_windowed_fake(
    x: Tensor, values: Tensor, idx: Tensor, out_features: int, bias: Optional[Tensor] = None, active_rows: Optional[Tensor] = None
) -> Tensor:
    op = "condensed_linear_windowed"
    _check_packed_call(x, out_features, bias, op)
    _check_pack_inputs(values, idx, active_rows, out_features, op)
    torch._check_type(x.dtype == values.dtype, lambda: f"{op}: x must have the values' dtype ({values.dtype}), got {x.dtype}")
    _check_same_device("values", values, x, "x", op)
    return x.new_empty((*x.shape[:-1], out_features))
