"""Checks of a checkpoint's condensed layout before a module takes it: every
problem names its key, and a module with a problem is left as it was."""

from typing import Any, List, Mapping

import torch
from torch import Tensor

from .layout import first_bad_index


def layout_problems(state: Mapping[str, Any], prefix: str, out_features: int, in_features: int) -> List[str]:
    """What is wrong with the condensed layout stored under ``prefix`` in ``state``
    for a layer of ``out_features`` outputs over ``in_features`` columns; each
    problem names its key. Empty when it loads (or when none of its keys is there:
    strict loading reports missing keys)."""
    values, idx, active_rows = (state.get(prefix + name) for name in ("values", "idx", "active_rows"))
    if values is None and idx is None and active_rows is None:
        return []  # nothing of ours here (strict loading reports the missing keys)
    problems: List[str] = []

    def problem(key: str, what: str) -> None:
        problems.append(f"{prefix}{key}: {what}")

    if values is None or idx is None:
        problem("values" if values is None else "idx", "missing, while the checkpoint has the rest of the condensed layout")
        return problems
    if not isinstance(values, Tensor) or not values.is_floating_point() or values.dim() not in (2, 3):
        problem(
            "values",
            f"must be a floating-point tensor [active_neurons, fan_in] (or grouped [groups, group_size, fan_in]), got {_describe(values)}",
        )
        return problems
    rows, fan_in = values.shape[0] * (values.shape[1] if values.dim() == 3 else 1), values.shape[-1]
    idx_shape = [values.shape[0], fan_in]
    if rows > out_features or fan_in > in_features:
        problem("values", f"has shape {list(values.shape)}; this layer has out_features={out_features} and in_features={in_features}")
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8):
        problem("idx", f"must be an integer tensor, got {_describe(idx)}")
    elif list(idx.shape) != idx_shape:
        problem("idx", f"must have shape {idx_shape} for values of shape {list(values.shape)}, got {list(idx.shape)}")
    elif (bad := first_bad_index(idx, in_features)) is not None:
        problem("idx", f"entry [{bad[0]}, {bad[1]}] = {int(idx[bad])} is outside [0, in_features={in_features})")
    if active_rows is None:
        if rows != out_features:
            problem("active_rows", f"missing: values has {rows} rows for out_features={out_features} (the others must be named as ablated)")
    elif not isinstance(active_rows, Tensor) or active_rows.dtype.is_floating_point or active_rows.dtype == torch.bool or active_rows.dim() != 1:
        problem("active_rows", f"must be a 1-D integer tensor, got {_describe(active_rows)}")
    elif active_rows.numel() != rows:
        problem("active_rows", f"must name one output per row of values ({rows}), got {active_rows.numel()}")
    elif active_rows.numel() and (int(active_rows.min()) < 0 or int(active_rows.max()) >= out_features):
        problem("active_rows", f"entries must lie in [0, out_features={out_features}), got [{int(active_rows.min())}, {int(active_rows.max())}]")
    elif torch.unique(active_rows).numel() != active_rows.numel():
        problem("active_rows", "entries must be distinct outputs")
    return problems


def _describe(t: object) -> str:
    return f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
