"""The layers the benchmarks time and the methods that compute them.

Every method computes the same ``y = x Wᵀ`` for one random constant fan-in weight
``W``; each says how many bytes its storage format makes it move at least
(weights as stored, ``x`` read, ``y`` written — intermediates not counted) and
how many floating-point operations it performs (a dense method multiplies the
zeros too). ``training=True`` times forward + backward instead (gradients to
``x`` and the weights, as a training step needs).
"""

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import default_index_dtype, to_dense
from ..ops import condensed_linear, condensed_linear_packed, pack_for_inference
from .timing import first_line, with_tf32

# name -> what the name means, in the order tables show them.
METHOD_DESCRIPTIONS = {
    "condensed": "condensed_ops.condensed_linear (values + int16/int32 idx)",
    "condensed_packed": (
        "CPU: condensed_ops.condensed_linear_packed over the window layout (pack_for_inference, built once "
        "outside the timing): what CondensedLinear runs for inference on up to WINDOW_MAX_BATCH rows"
    ),
    "dense": "F.linear with the dense (zero-filled) weight, same dtype; on CUDA with TF32 off",
    "csr": "F.linear with a torch.sparse CSR weight (int64 indices)",
    "gather": "the SRigL paper's plain PyTorch: (x[..., idx] * values).sum(-1), int64 idx",
    "dense_tf32": "CUDA: F.linear with TF32 matmuls allowed (float32 layers)",
    "dense_bf16": "CUDA: F.linear in bfloat16 (weights and x converted once, outside the timing)",
    "dense_fp32": "F.linear in float32 for a 16-bit layer (weights and x converted once, outside the timing)",
    "semi_structured": "CUDA: 2:4 semi-structured sparse weight (to_sparse_semi_structured), 50% sparse, bf16/fp16",
}
# "grouped<g>" (e.g. grouped8): the grouped layout, runs of g output rows sharing
# their columns (the first row's of each run of the layer); see method_description.
GROUPED_PREFIX = "grouped"


def grouped_method(group_size: int) -> str:
    return f"{GROUPED_PREFIX}{group_size}"


def group_size_of(name: str) -> Optional[int]:
    """g for a grouped<g> method name, else None."""
    suffix = name[len(GROUPED_PREFIX):] if name.startswith(GROUPED_PREFIX) else ""
    return int(suffix) if suffix.isdigit() and int(suffix) > 1 else None


def method_description(name: str) -> str:
    group_size = group_size_of(name)
    if group_size is not None:
        return (
            f"condensed_ops.condensed_linear over the grouped layout: runs of {group_size} output rows share "
            f"their columns (values [out/{group_size}, {group_size}, fan_in], idx [out/{group_size}, fan_in])"
        )
    return METHOD_DESCRIPTIONS[name]


def is_known_method(name: str) -> bool:
    return name in METHOD_DESCRIPTIONS or group_size_of(name) is not None


CPU_METHODS = ("condensed", "condensed_packed", "dense", "csr", "gather")
CUDA_METHODS = ("condensed", "dense", "csr", "gather", "dense_tf32", "dense_bf16", "semi_structured")
SIXTEEN_BIT_METHODS = ("dense_fp32",)  # added for float16 / bfloat16 layers

# The gather baseline materialises x[..., idx] ([batch, out, fan_in]); past this
# many bytes it is reported as skipped rather than thrashing the machine.
GATHER_INTERMEDIATE_LIMIT_BYTES = 1 << 30


@dataclass(frozen=True)
class Layer:
    """A random constant fan-in ``in_features → out_features`` layer (no bias)."""

    in_features: int
    out_features: int
    sparsity: float
    values: Tensor
    idx: Tensor

    @property
    def fan_in(self) -> int:
        return self.values.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()


def fan_in_for_sparsity(sparsity: float, in_features: int) -> int:
    """``round((1 - sparsity) * in_features)``, at least 1."""
    return min(in_features, max(1, round((1.0 - sparsity) * in_features)))


def random_layer(
    in_features: int,
    out_features: int,
    sparsity: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    seed: int = 0,
) -> Layer:
    """Uniformly random columns per row, ascending; normal values; int16 indices when they reach."""
    g = torch.Generator().manual_seed(seed)
    fan_in = fan_in_for_sparsity(sparsity, in_features)
    idx = torch.rand(out_features, in_features, generator=g).topk(fan_in, dim=1).indices.sort(dim=1).values
    values = torch.randn(out_features, fan_in, generator=g)
    return Layer(
        in_features,
        out_features,
        sparsity,
        values.to(device=device, dtype=dtype),
        idx.to(device=device, dtype=default_index_dtype(in_features)),
    )


@dataclass
class Method:
    """One way to compute the layer: ``call()`` runs it on the bound input.

    ``unavailable`` (instead of ``call``) says why it cannot run here.
    """

    name: str
    call: Optional[Callable[[], object]]
    bytes_moved: int
    flops: int
    unavailable: Optional[str] = None
    x: Optional[Tensor] = None  # the input the call reads (in the method's own dtype)


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _training_step(forward: Callable[[], Tensor], grad_y: Tensor, leaves: Sequence[Tensor]) -> Callable[[], object]:
    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_y)

    return step


def _semi_structured_weight(dense: Tensor) -> Tensor:
    """The largest two of every four weights along a row, as a 2:4 semi-structured tensor."""
    from torch.sparse import to_sparse_semi_structured

    groups = dense.reshape(dense.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    pruned = torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(dense.shape)
    return to_sparse_semi_structured(pruned)


def _stored_bytes(weight: Tensor) -> int:
    if weight.layout == torch.strided:
        return _bytes(weight)
    if weight.layout == torch.sparse_csr:
        return _bytes(weight.values()) + _bytes(weight.col_indices()) + _bytes(weight.crow_indices())
    # 2:4 semi-structured: the kept half of the values plus their metadata (None
    # for cuSPARSELt, which packs the metadata with the values).
    return sum(_bytes(t) for t in (getattr(weight, "packed", None), getattr(weight, "meta", None)) if t is not None)


@dataclass(frozen=True)
class _Problem:
    """What every method of one (layer, batch) shares."""

    x: Tensor
    grad_y: Tensor
    activation_bytes: int
    training: bool


def _method(
    name: str,
    problem: _Problem,
    forward: Callable[[Tensor, Tuple[Tensor, ...]], Tensor],
    weights: Tuple[Tensor, ...],
    flops: int,
    trainable: Tuple[int, ...] = (0,),
    x: Optional[Tensor] = None,
    allow_tf32: Optional[bool] = None,
) -> Method:
    """Binds ``forward(x, weights)`` (or a training step through it) and tries it once."""
    x = problem.x if x is None else x
    stored = sum(_stored_bytes(w) for w in weights)
    moved = stored + problem.activation_bytes
    call: Callable[[], object] = lambda: forward(x, weights)
    if problem.training:
        x_leaf = x.detach().requires_grad_()
        trained = tuple(w.detach().requires_grad_() if i in trainable else w for i, w in enumerate(weights))
        leaves = [x_leaf] + [trained[i] for i in trainable]
        call = _training_step(lambda: forward(x_leaf, trained), problem.grad_y.to(x.dtype), leaves)
        # forward (W, x, y) + grad_x (W, grad_y, grad_x) + grad_W (grad_y, x, grad of the trained weights)
        moved = 2 * stored + sum(_bytes(weights[i]) for i in trainable) + 3 * problem.activation_bytes
        flops *= 3
    if allow_tf32 is not None:
        call = with_tf32(call, allow_tf32)
    try:
        call()
    except Exception as error:  # noqa: BLE001 -- reported in the results, not raised mid-sweep
        return Method(name, None, 0, 0, f"unsupported: {first_line(error)}")
    return Method(name, call, moved, flops, x=x)


def _linear(x: Tensor, weights: Tuple[Tensor, ...]) -> Tensor:
    return F.linear(x, weights[0])


def layer_methods(layer: Layer, batch: int, names: Sequence[str], training: bool = False, seed: int = 1) -> List[Method]:
    """``names`` (see :data:`METHOD_DESCRIPTIONS`) bound to a random ``[batch, in_features]`` input.

    A method that cannot run for this layer, dtype or device comes back with
    ``unavailable`` set (found by calling it once), never as an exception.
    """
    unknown = [name for name in names if not is_known_method(name)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHOD_DESCRIPTIONS)} and grouped<g> for g >= 2")
    device, dtype = layer.values.device, layer.values.dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layer.in_features, generator=g).to(device=device, dtype=dtype)
    grad_y = torch.randn(batch, layer.out_features, generator=g).to(device=device, dtype=dtype)
    problem = _Problem(x, grad_y, (batch * layer.in_features + batch * layer.out_features) * x.element_size(), training)
    sparse_flops = 2 * batch * layer.nnz
    dense_flops = 2 * batch * layer.out_features * layer.in_features
    dense = to_dense(layer.values, layer.idx, layer.in_features) if set(names) - {"condensed", "condensed_packed", "gather"} else None

    def build(name: str) -> Method:
        group_size = group_size_of(name)
        if group_size is not None:
            if layer.out_features % group_size:
                return Method(name, None, 0, 0, f"{group_size} does not divide out_features={layer.out_features}")
            values = layer.values.view(layer.out_features // group_size, group_size, layer.fan_in)
            idx = layer.idx[::group_size].contiguous()
            return _method(name, problem, lambda x, w: condensed_linear(x, w[0], w[1]), (values, idx), sparse_flops)
        if name == "condensed":
            return _method(name, problem, lambda x, w: condensed_linear(x, w[0], w[1]), (layer.values, layer.idx), sparse_flops)
        if name == "condensed_packed":
            if device.type != "cpu":
                return Method(name, None, 0, 0, "CPU only")
            if training:
                return Method(name, None, 0, 0, "inference only")
            packed = pack_for_inference(layer.values, layer.idx, layer.in_features)
            return _method(name, problem, lambda x, w: condensed_linear_packed(x, w[0], layer.out_features), (packed,), sparse_flops, trainable=())
        if name == "dense_fp32":
            if dtype == torch.float32:
                return Method(name, None, 0, 0, "the dense method of a float32 layer")
            return _method(name, problem, _linear, (dense.float(),), dense_flops, x=x.float(), allow_tf32=False if device.type == "cuda" else None)
        if name == "gather":
            intermediate = batch * layer.nnz * x.element_size()
            if intermediate > GATHER_INTERMEDIATE_LIMIT_BYTES:
                return Method(name, None, 0, 0, f"skipped: would materialise a {intermediate / 2**30:.1f} GiB [batch, out, fan_in] tensor")
            weights = (layer.values, layer.idx.long())
            return _method(name, problem, lambda x, w: (x[..., w[1]] * w[0]).sum(-1), weights, sparse_flops)
        if name == "dense":
            return _method(name, problem, _linear, (dense,), dense_flops, allow_tf32=False if device.type == "cuda" else None)
        if name == "csr":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
                csr = dense.to_sparse_csr()
            return _method(name, problem, _linear, (csr,), sparse_flops)
        if device.type != "cuda":
            return Method(name, None, 0, 0, "CUDA only")
        if name == "dense_tf32":
            if dtype != torch.float32:
                return Method(name, None, 0, 0, "float32 layers only")
            return _method(name, problem, _linear, (dense,), dense_flops, allow_tf32=True)
        if name == "dense_bf16":
            if dtype == torch.bfloat16:
                return Method(name, None, 0, 0, "the dense method of a bfloat16 layer")
            return _method(name, problem, _linear, (dense.bfloat16(),), dense_flops, x=x.bfloat16())
        # semi_structured
        half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        try:
            weight = _semi_structured_weight(dense.to(half))
        except Exception as error:  # noqa: BLE001 -- shape, dtype or device not supported
            return Method(name, None, 0, 0, f"unsupported: {first_line(error)}")
        return _method(name, problem, _linear, (weight,), dense_flops // 2, trainable=(), x=x.to(half))

    return [build(name) for name in names]


def available_methods(device: torch.device, dtype: torch.dtype = torch.float32) -> Tuple[str, ...]:
    methods = CUDA_METHODS if device.type == "cuda" else CPU_METHODS
    return methods + (SIXTEEN_BIT_METHODS if dtype in (torch.float16, torch.bfloat16) else ())


__all__ = [
    "Layer",
    "Method",
    "METHOD_DESCRIPTIONS",
    "available_methods",
    "fan_in_for_sparsity",
    "group_size_of",
    "grouped_method",
    "is_known_method",
    "layer_methods",
    "method_description",
    "random_layer",
]
