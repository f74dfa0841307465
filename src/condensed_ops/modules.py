"""Drop-in ``nn.Module``s that run constant fan-in layers on the condensed kernels.

:class:`CondensedLinear` replaces an ``nn.Linear`` and :class:`CondensedConv2d` an
``nn.Conv2d`` (groups=1, zeros padding) whose weight keeps the same number of
entries in every active row. Both store the weight's rows ``[out, in]`` (a conv's
``in`` is ``C_in * kh * kw``) the way :class:`CondensedLayer` describes:

- ``values [active, fan_in]`` (a Parameter) and ``idx [active, fan_in]`` (int16 when
  ``in <= 32767``, else int32) hold the active rows only;
- a row with no kept entry is an *ablated neuron*: it is not stored and costs
  nothing in the kernel; its output is its bias (or 0). ``active_rows`` (int64
  ``[active]``, a buffer that exists only when some row is ablated) places the
  active rows' outputs;
- active rows with unequal counts are padded to the largest with zero-valued
  entries (:func:`~condensed_ops.masks.pad_to_constant_fan_in`); ``padded_entries``
  says how many.

Every forward is one call of :func:`condensed_ops.ops.condensed_layer`, which picks
the layout, so the modules train (the autograd is C++), script (also after
save/load) and compile (``fullgraph=True``). For inference on CPU with few rows
(no gradient needed, at most ``condensed_ops.ops.WINDOW_MAX_BATCH`` rows), it runs from the window layout
(:func:`~condensed_ops.pack_for_inference`): built on first use, cached while
``values`` and ``idx`` are unchanged and rebuilt after any in-place change (their
version counters, which the package also moves after every ``torch.optim`` step,
fused ones included; after a write through ``.data`` or numpy call
:func:`~condensed_ops.mark_modified`). It costs about 1.05-1.4x the bytes of
``values`` + ``idx`` for as long as the module lives; set ``inference_layout = False``
to opt out.
"""

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import layout_problems
from .layout import RowPlan, check_index_dtype, default_index_dtype, index_storage, index_view, plan_rows, to_condensed
from .layout import to_dense as _condensed_to_dense
from .ops import WINDOW_MAX_BATCH, condensed_layer
from .weight_view import DenseWeightView

_IntPair = Union[int, Tuple[int, int]]


def _format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _tensor_bytes(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _replace_data(parameter: nn.Parameter, data: Tensor) -> None:
    """Give ``parameter`` new contents of another shape, keeping the Parameter (an
    optimizer holds it). A leaf's gradient accumulator, alive while any graph that
    used it is (e.g. the last step's ``loss``), remembers the leaf's shape and would
    reject the next gradient; autograd drops it only when the dtype changes, so the
    data passes through another dtype first."""
    other_dtype = torch.float64 if parameter.dtype != torch.float64 else torch.float32
    parameter.data = torch.empty(0, dtype=other_dtype, device=parameter.device)
    parameter.data = data


# ---- the shared storage -------------------------------------------------------------------


class CondensedLayer(nn.Module):
    """The weight rows ``[out_features, in_features]`` of a constant fan-in layer,
    stored condensed (see the module docstring); subclasses decide what a row's
    input is (:class:`CondensedLinear`: the last dim of ``x``; :class:`CondensedConv2d`:
    an image patch).

    Attributes:
        values: Parameter ``[active_neurons, fan_in]``; with ``group_size`` g > 1 the
            grouped layout ``[active_neurons / g, g, fan_in]``: each run of g
            consecutive outputs shares one set of columns (fast at large batch).
        idx: ``[active_neurons, fan_in]`` (grouped: ``[active_neurons / g, fan_in]``),
            the column of each value, ascending per row;
            saved as ``idx`` in the state dict and stored in the buffer ``idx_storage``
            (int16 indices as bytes, which distributed backends can broadcast).
        bias: Parameter ``[out_features]`` or None; ablated neurons keep theirs.
        active_rows: int64 buffer ``[active_neurons]``, or None when no row is ablated.
        ablated_rows, output_order: derived from ``active_rows`` (not saved): the
            ablated rows, and where each neuron's output sits in the active
            outputs followed by the ablated ones.
        padded_entries: zero-valued entries added when converting to even out the
            rows (a module made by its constructor, or filled by ``load_state_dict``,
            reports 0: it is a fact of the conversion, not part of the state dict).
            They are trainable like every stored entry.
        inference_layout: run CPU inference on up to ``window_max_batch`` rows from
            the cached window layout (see the module docstring); True by default.
        weight: a :class:`~condensed_ops.weight_view.DenseWeightView` for model code
            that reads the replaced module's ``weight``: its dtype, device and shape
            at no cost, its values built on use (``dense_weight()``).
    """

    in_features: int
    out_features: int
    fan_in: int
    active_neurons: int
    padded_entries: int
    inference_layout: bool
    window_max_batch: int
    group_size: int
    __jit_ignored_attributes__ = ["idx"]
    __jit_unused_properties__ = ["weight"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        bias: bool,
        active_neurons: Optional[int],
        index_dtype: Optional[torch.dtype],
        device: Optional[Union[str, torch.device]],
        dtype: Optional[torch.dtype],
        group_size: int = 1,
    ) -> None:
        super().__init__()
        active_neurons = out_features if active_neurons is None else active_neurons
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if out_features % group_size or active_neurons % group_size:
            raise ValueError(
                f"group_size={group_size} must divide out_features={out_features} and active_neurons={active_neurons}"
            )
        if not 0 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in [0, in_features={in_features}], got {fan_in}")
        if not 0 <= active_neurons <= out_features:
            raise ValueError(f"active_neurons must be in [0, out_features={out_features}], got {active_neurons}")
        index_dtype = default_index_dtype(in_features) if index_dtype is None else index_dtype
        check_index_dtype(index_dtype, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in = fan_in
        self.active_neurons = active_neurons
        self.padded_entries = 0
        self.inference_layout = True
        self.window_max_batch = WINDOW_MAX_BATCH
        self.group_size = group_size
        self.values = nn.Parameter(torch.empty(self._values_shape(active_neurons, fan_in), device=device, dtype=dtype))
        self._set_idx(torch.empty(active_neurons // group_size, fan_in, device=device, dtype=index_dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # The first active_neurons rows until a conversion or load_state_dict says which.
        active_rows = torch.arange(active_neurons, device=device) if active_neurons < out_features else None
        self.register_buffer("active_rows", active_rows)
        self.register_buffer("ablated_rows", None, persistent=False)
        self.register_buffer("output_order", None, persistent=False)
        self._derive_output_order()
        self.reset_parameters()

    def _values_shape(self, rows: int, fan_in: int) -> List[int]:
        g = self.group_size
        return [rows, fan_in] if g == 1 else [rows // g, g, fan_in]

    def _idx_shape(self) -> List[int]:
        """idx's shape: one row per row of values (grouped: per group)."""
        return [self.values.shape[0], self.values.shape[-1]]

    @torch.no_grad()
    def _derive_output_order(self) -> None:
        active_rows = self.active_rows
        if active_rows is None:
            return
        is_active = torch.zeros(self.out_features, dtype=torch.bool, device=active_rows.device)
        is_active[active_rows] = True
        if is_active.device.type != "meta" and int(is_active.sum()) != active_rows.numel():
            raise ValueError(f"active_rows must be distinct rows in [0, out_features={self.out_features}), got {active_rows.tolist()}")
        # A stable sort rather than nonzero(), which a meta tensor (skip_init) cannot size.
        inactive_first = torch.sort(is_active.to(torch.int8), stable=True).indices
        self.ablated_rows = inactive_first[: self.out_features - active_rows.numel()]
        self.output_order = torch.cat([active_rows, self.ablated_rows]).argsort()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:  # type: ignore[override]
        """Checks the stored layout first (every problem names its key; a module
        with a problem is left exactly as it was), then takes its sizes from the
        loaded tensors: ``fan_in``, the active neurons and whether some are ablated
        come from the checkpoint, so a module built with other sizes (or none
        ablated) loads it."""
        problems = layout_problems(state_dict, prefix, self.out_features, self.in_features)
        if problems:
            error_msgs.extend(problems)
            return
        if prefix + "values" in state_dict:
            self._take_sizes(state_dict[prefix + "values"].shape, state_dict.get(prefix + "active_rows"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # idx is saved under its own name, not as the buffer that stores it (_set_idx).
        key = prefix + "idx"
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key in state_dict:
            loaded = state_dict[key]
            with torch.no_grad():
                if local_metadata.get("assign_to_params_buffers", False):
                    self._set_idx(loaded.to(self.idx.dtype))
                else:
                    self.idx.copy_(loaded)
        elif strict:
            missing_keys.append(key)
        self._derive_output_order()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "idx"] = self.idx if keep_vars else self.idx.detach()

    def _set_idx(self, idx: Tensor) -> None:
        """Stores idx in the buffer ``idx_storage`` (:func:`~condensed_ops.layout.index_storage`:
        int16 as bytes, which distributed backends can broadcast), while ``idx`` stays
        the view every op reads (the same tensor on every call)."""
        storage = index_storage(idx)
        self.register_buffer("idx_storage", storage, persistent=False)
        self.idx = index_view(storage, list(idx.shape))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.idx = index_view(self.idx_storage, self._idx_shape())  # the buffer may be a new tensor now (.to(device))
        return self

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("idx", None)  # a view of idx_storage: rebuilt on load (pickling refuses two dtypes of one storage)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("group_size", 1)  # pickled before grouped layouts existed
        if isinstance(self, CondensedLinear):
            self.__dict__.setdefault("transposed_weight", False)  # pickled before Conv1D conversion
        self.idx = index_view(self.idx_storage, self._idx_shape())

    @torch.no_grad()
    def _take_sizes(self, shape: torch.Size, active_rows: Optional[Tensor]) -> None:
        """Resizes values, idx and active_rows to a checkpoint's (contents follow from the
        load); a 3-D values ``[groups, group_size, fan_in]`` makes the layer grouped."""
        self.group_size = int(shape[1]) if len(shape) == 3 else 1
        active_neurons, fan_in = int(shape[0]) * self.group_size, int(shape[-1])
        if tuple(shape) != tuple(self.values.shape):
            # Resized in place: an optimizer built before the load still holds the parameter.
            _replace_data(self.values, self.values.new_empty(shape))
            self._set_idx(self.idx.new_zeros(int(shape[0]), fan_in))
        self.active_neurons, self.fan_in = active_neurons, fan_in
        if active_rows is None:
            self.active_rows = None
            self.ablated_rows = self.output_order = None
        elif self.active_rows is None or self.active_rows.shape != active_rows.shape:
            self.active_rows = torch.zeros(active_neurons, dtype=torch.int64, device=self.values.device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A random static-sparse layer: ``fan_in`` distinct random columns per active
        row, and values and bias uniform in ``±1/sqrt(fan_in)`` (nn.Linear's default
        for a dense layer of that fan-in)."""
        columns = torch.rand(self.idx.shape[0], self.in_features, device=self.idx.device).argsort(dim=1)
        self.idx.copy_(columns[:, : self.fan_in].sort(dim=1).values)
        bound = 1 / math.sqrt(self.fan_in) if self.fan_in > 0 else 0.0
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def _load_rows(self, weight: Tensor, bias: Optional[Tensor], plan: RowPlan) -> None:
        """Fill the storage from a dense ``weight`` (rows ``flatten(1)``) and its plan."""
        rows = weight.detach().flatten(1)
        # Zero what the plan pads with: padding may land on entries the mask dropped.
        rows = rows.masked_fill(plan.padding, 0)
        values, idx = to_condensed(rows[plan.active_rows], plan.kept[plan.active_rows], self.idx.dtype)
        self.values.copy_(values.view(self.values.shape))
        self.idx.copy_(idx[:: self.group_size])  # a group's rows share their (ascending) columns
        if self.active_rows is not None:
            self.active_rows.copy_(plan.active_rows)
            self._derive_output_order()
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias.detach())
        self.padded_entries = plan.padded_entries
        # A frozen layer stays frozen; a plain tensor gives a trainable module.
        if isinstance(weight, nn.Parameter):
            self.values.requires_grad_(weight.requires_grad)
        if self.bias is not None and isinstance(bias, nn.Parameter):
            self.bias.requires_grad_(bias.requires_grad)

    def stored_positions(self) -> Tuple[Tensor, Tensor]:
        """Row ``[active, 1]`` and column ``[active, fan_in]`` (int64) of each stored
        entry, in the order of ``values`` (a group's rows repeat its columns)."""
        columns = self.idx.long()
        if self.group_size > 1:
            columns = columns.repeat_interleave(self.group_size, dim=0)
        rows = self.active_rows if self.active_rows is not None else torch.arange(self.out_features, device=columns.device)
        return rows[:, None], columns

    @torch.no_grad()
    def relayout(self, rows: Tensor, mask: Tensor) -> Tensor:
        """Store the dense rows ``rows [out_features, in_features]`` kept at ``mask``
        (a constant fan-in per kept row; with ``group_size`` g > 1 runs of g rows share
        their columns; rows with no kept entry become ablated), in place: ``values`` stays
        the same Parameter (resized through ``.data`` when the shape changes, so an
        optimizer keeps it), ``idx`` and ``active_rows`` are rewritten, and every cached
        layout follows (new versions or new memory).

        Returns int64 in ``values``' new shape: for each entry, the flat position in the
        old ``values`` that held the same weight, or -1 for an entry that is new, so
        what is kept per entry (a gradient, optimizer moments) can follow it."""
        old_positions = torch.full((self.out_features, self.in_features), -1, dtype=torch.int64, device=rows.device)
        stored_rows, stored_columns = self.stored_positions()
        old_positions[stored_rows, stored_columns] = torch.arange(self.values.numel(), device=rows.device).view_as(stored_columns)

        plan = plan_rows(rows, mask, self.group_size)
        if plan.padded_entries:
            raise ValueError(f"relayout: mask must keep a constant fan-in per kept row (it would pad {plan.padded_entries} entries)")
        kept = plan.kept[plan.active_rows]
        values, idx = to_condensed(rows[plan.active_rows].to(self.values.dtype), kept, self.idx.dtype)
        sources, _ = to_condensed(old_positions[plan.active_rows], kept, self.idx.dtype)
        shape = self._values_shape(plan.active_rows.numel(), plan.fan_in)
        if list(self.values.shape) == shape:
            self.values.copy_(values.view(shape))
        else:
            _replace_data(self.values, values.view(shape))
        group_idx = idx[:: self.group_size].contiguous()
        if self.idx.shape == group_idx.shape:
            self.idx.copy_(group_idx)
        else:
            self._set_idx(group_idx)
        self.fan_in, self.active_neurons, self.padded_entries = plan.fan_in, plan.active_rows.numel(), 0
        if self.active_neurons == self.out_features:
            self.active_rows = self.ablated_rows = self.output_order = None
        else:
            self.active_rows = plan.active_rows.to(torch.int64).clone()
            self._derive_output_order()
        return sources.view(shape)

    def _condensed_rows(self, x: Tensor) -> Tensor:
        """``[..., in_features]`` -> ``[..., out_features]``, through :func:`~condensed_ops.ops.condensed_layer`."""
        in_features = self.in_features
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise ValueError(f"expected input [..., {in_features}], got shape {list(x.shape)}")
        return condensed_layer(
            x,
            self.values,
            self._index_tensor(),
            self.bias,
            self.active_rows,
            self.ablated_rows,
            self.output_order,
            self.out_features,
            self.window_max_batch if self.inference_layout else 0,
        )

    def _index_tensor(self) -> Tensor:
        """``idx`` for the ops. TorchScript keeps no ``idx`` attribute (torch.jit.save
        would give the view the storage's dtype) and makes the view anew; the ops'
        caches key on the memory, so a fresh view still finds them."""
        if torch.jit.is_scripting():
            return index_view(self.idx_storage, self._idx_shape())
        return self.idx

    def _dense_rows(self) -> Tensor:
        """The dense rows ``[out_features, in_features]`` (zeros for ablated neurons)."""
        active_dense = _condensed_to_dense(self.values, self.idx, self.in_features).flatten(0, -2)
        if self.active_rows is None:
            return active_dense
        dense = active_dense.new_zeros(self.out_features, self.in_features)
        return dense.index_copy(0, self.active_rows, active_dense)

    @property
    def weight(self) -> DenseWeightView:
        return DenseWeightView(self)

    def dense_weight_shape(self) -> torch.Size:
        """The shape of the replaced module's weight (what ``weight.shape`` answers)."""
        return torch.Size([self.out_features, self.in_features])

    def dense_weight(self) -> Tensor:
        """The dense weight in the replaced module's shape (``to_dense()``'s, or its
        transpose for a transformers ``Conv1D``)."""
        return self._dense_rows()

    def _describe(self) -> str:
        return f"{type(self).__name__}(out={self.out_features}, in={self.in_features}, fan_in={self.fan_in})"

    def storage_bytes(self) -> int:
        """Bytes of the state dict: values, idx, bias and active_rows. (With ablated
        rows, the derived ablated_rows and output_order add ``8 * (out_features +
        ablated)`` bytes in memory.)"""
        return sum(_tensor_bytes(t) for t in (self.values, self.idx, self.bias, self.active_rows))

    def dense_storage_bytes(self) -> int:
        """Bytes of the dense layer it replaces (weight and bias, same dtype)."""
        return (self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)) * self.values.element_size()

    def _storage_repr(self) -> str:
        ratio = self.storage_bytes() / self.dense_storage_bytes() if self.dense_storage_bytes() else 0.0
        return (
            f"fan_in={self.fan_in}, " + (f"group_size={self.group_size}, " if self.group_size > 1 else "")
            + f"ablated_neurons={self.out_features - self.active_neurons}, "
            f"padded_entries={self.padded_entries}, bias={self.bias is not None}, index_dtype={self.idx.dtype}, "
            f"storage={_format_bytes(self.storage_bytes())} ({100 * ratio:.1f}% of dense {_format_bytes(self.dense_storage_bytes())})"
        )


# ---- Linear -------------------------------------------------------------------------------


class CondensedLinear(CondensedLayer):
    """A constant fan-in ``nn.Linear``: ``y[..., o] = bias[o] + sum_j values[o, j] * x[..., idx[o, j]]``
    over the active neurons, ``bias[o]`` (or 0) for ablated ones. ``x`` is ``[..., in_features]``.

    Build one from a trained layer with :meth:`from_linear` / :meth:`from_dense`. The
    constructor makes a random static-sparse layer of the given shape, which is also
    the blank to ``load_state_dict`` into (``active_neurons`` fixes the stored rows;
    None stores all ``out_features``).

    ``transposed_weight`` is True for one that replaced a transformers ``Conv1D`` (a
    Linear whose weight is stored ``[in, out]``): its ``weight`` answers that shape.
    """

    transposed_weight: bool

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        bias: bool = True,
        *,
        active_neurons: Optional[int] = None,
        index_dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        group_size: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, fan_in, bias, active_neurons, index_dtype, device, dtype, group_size)
        self.transposed_weight = False

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        index_dtype: Optional[torch.dtype] = None,
        group_size: int = 1,
    ) -> "CondensedLinear":
        """Condense a dense ``weight [out, in]`` keeping ``mask`` (or, without one, its nonzeros).

        ``index_dtype`` None picks int16 when it reaches every column, else int32. A
        Parameter ``weight`` / ``bias`` passes on its ``requires_grad``. ``group_size``
        g > 1 stores the grouped layout (see :func:`plan_rows`): exact for a mask whose
        runs of g rows share their columns (grouped SRigL's), padded with zeros otherwise."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
        return cls._from_plan(weight, bias, plan_rows(weight, mask, group_size), index_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: Optional[Tensor] = None,
        index_dtype: Optional[torch.dtype] = None,
        group_size: int = 1,
    ) -> "CondensedLinear":
        """Condense ``linear`` keeping ``mask`` (the weight's shape) or, without one, its
        nonzero weights; ``values`` and ``bias`` keep its parameters' ``requires_grad``.
        ``group_size``: as in :meth:`from_dense`."""
        return cls.from_dense(linear.weight, linear.bias, mask, index_dtype, group_size)

    @classmethod
    def _from_plan(
        cls, weight: Tensor, bias: Optional[Tensor], plan: RowPlan, index_dtype: Optional[torch.dtype] = None
    ) -> "CondensedLinear":
        out_features, in_features = weight.shape
        module = nn.utils.skip_init(
            cls,
            in_features,
            out_features,
            plan.fan_in,
            bias is not None,
            active_neurons=plan.active_rows.numel(),
            index_dtype=index_dtype,
            device=weight.device,
            dtype=weight.dtype,
            group_size=plan.group_size,
        )
        module._load_rows(weight, bias, plan)
        return module

    def forward(self, x: Tensor) -> Tensor:
        return self._condensed_rows(x)

    def to_dense(self) -> Tensor:
        """The equivalent dense weight ``[out_features, in_features]``."""
        return self._dense_rows()

    def dense_weight_shape(self) -> torch.Size:
        shape = [self.in_features, self.out_features] if self.transposed_weight else [self.out_features, self.in_features]
        return torch.Size(shape)

    def dense_weight(self) -> Tensor:
        return self._dense_rows().t() if self.transposed_weight else self._dense_rows()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self._storage_repr()


# ---- Conv2d -------------------------------------------------------------------------------


def _pair(value: _IntPair) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class CondensedConv2d(CondensedLayer):
    """A constant fan-in ``nn.Conv2d`` (groups=1, zeros padding): each output channel
    keeps ``fan_in`` of its ``in_channels * kh * kw`` weights.

    Runs as ``F.unfold`` (patches ``[N, C_in*kh*kw, L]``), the condensed op over the
    patch axis, and a reshape to ``[N, C_out, H_out, W_out]``. Inputs are
    ``[N, C_in, H, W]`` or unbatched ``[C_in, H, W]``.
    """

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntPair,
        fan_in: int,
        stride: _IntPair = 1,
        padding: _IntPair = 0,
        dilation: _IntPair = 1,
        bias: bool = True,
        *,
        active_neurons: Optional[int] = None,
        index_dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        group_size: int = 1,
    ) -> None:
        kernel_size = _pair(kernel_size)
        super().__init__(
            in_channels * kernel_size[0] * kernel_size[1],
            out_channels,
            fan_in,
            bias,
            active_neurons,
            index_dtype,
            device,
            dtype,
            group_size,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        mask: Optional[Tensor] = None,
        index_dtype: Optional[torch.dtype] = None,
        group_size: int = 1,
    ) -> "CondensedConv2d":
        """Condense ``conv`` keeping ``mask`` (the weight's shape) or, without one, its
        nonzero weights; ``values`` and ``bias`` keep its parameters' ``requires_grad``.
        ``group_size``: as in :meth:`CondensedLinear.from_dense` (over output channels)."""
        unsupported = conv2d_unsupported_reason(conv)
        if unsupported is not None:
            raise ValueError(f"CondensedConv2d.from_conv2d: {unsupported}")
        return cls._from_plan(conv, plan_rows(conv.weight, mask, group_size), index_dtype)

    @classmethod
    def _from_plan(cls, conv: nn.Conv2d, plan: RowPlan, index_dtype: Optional[torch.dtype] = None) -> "CondensedConv2d":
        module = nn.utils.skip_init(
            cls,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            plan.fan_in,
            conv.stride,
            _explicit_padding(conv),
            conv.dilation,
            conv.bias is not None,
            active_neurons=plan.active_rows.numel(),
            index_dtype=index_dtype,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            group_size=plan.group_size,
        )
        module._load_rows(conv.weight, conv.bias, plan)
        return module

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 and x.dim() != 4:
            raise ValueError(f"expected input [N, C_in, H, W] or [C_in, H, W], got shape {list(x.shape)}")
        if x.shape[-3] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got shape {list(x.shape)}")
        out_height = self._output_size(x.shape[-2], 0)
        out_width = self._output_size(x.shape[-1], 1)
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [(N,) C_in*kh*kw, L]
        # The op takes any strides, so the transposed patches are not copied.
        y = self._condensed_rows(patches.transpose(-1, -2))  # [(N,) L, C_out]
        out_shape: List[int] = list(x.shape[:-3])
        out_shape.extend([self.out_channels, out_height, out_width])
        return y.transpose(-1, -2).reshape(out_shape)

    def _output_size(self, size: int, dim: int) -> int:
        reach = self.dilation[dim] * (self.kernel_size[dim] - 1) + 1
        return (size + 2 * self.padding[dim] - reach) // self.stride[dim] + 1

    def to_dense(self) -> Tensor:
        """The equivalent dense weight ``[out_channels, in_channels, kh, kw]``."""
        return self._dense_rows().view(self.dense_weight_shape())

    def dense_weight_shape(self) -> torch.Size:
        return torch.Size([self.out_channels, self.in_channels, self.kernel_size[0], self.kernel_size[1]])

    def dense_weight(self) -> Tensor:
        return self.to_dense()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, " + self._storage_repr()
        )


def _explicit_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """``conv.padding`` as ints; None when ``"same"`` would need uneven padding."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        # "same" puts the odd pixel of an odd total on the far side; unfold pads evenly.
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(total % 2 for total in totals):
            return None
        return (totals[0] // 2, totals[1] // 2)
    return _pair(conv.padding)


def conv2d_unsupported_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` cannot become a :class:`CondensedConv2d`, or None if it can."""
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros')"
    if _explicit_padding(conv) is None:
        return f"padding='same' needs uneven padding (kernel_size={conv.kernel_size}, dilation={conv.dilation})"
    return None


__all__ = ["CondensedConv2d", "CondensedLayer", "CondensedLinear", "conv2d_unsupported_reason"]
