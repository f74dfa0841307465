"""``module.weight`` of a condensed module: what model code reads of the dense weight.

Model code in the libraries users bring reads its layers' weights for their metadata
(``proj.weight.dtype`` to cast an input, ``.device``, ``.shape``). A condensed module
has no dense weight; its ``weight`` is a :class:`DenseWeightView` that answers those
at no cost and builds the dense weight only when its values are used.
"""

from typing import Optional, Union

import torch
from torch import Tensor, nn


class DenseWeightView:
    """The dense weight a condensed module stands for, in the shape of the module it
    replaced (``[out, in]`` for a Linear, ``[out, C_in, kh, kw]`` for a Conv2d, ``[in,
    out]`` for transformers' ``Conv1D``).

    ``dtype``, ``device``, ``shape`` / ``size()``, ``dim()``, ``numel()`` and
    ``requires_grad`` cost nothing. Using the values -- passing the view to a torch
    function or calling a Tensor method on it -- builds the dense weight first
    (``module.dense_weight()``: ``out * in`` elements, every use; gradients flow to
    ``values``). Writing through it raises: a write would change a temporary copy,
    not the module; write ``values`` instead.
    """

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    @property
    def dtype(self) -> torch.dtype:
        return self._module.values.dtype

    @property
    def device(self) -> torch.device:
        return self._module.values.device

    @property
    def shape(self) -> torch.Size:
        return self._module.dense_weight_shape()

    @property
    def requires_grad(self) -> bool:
        return self._module.values.requires_grad

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, dim: Optional[int] = None) -> Union[torch.Size, int]:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.shape[0]

    def _refuse_write(self, what: str) -> None:
        raise RuntimeError(
            f"{what} would write to the dense weight of a {self._module._describe()}, which is a temporary "
            "copy built from its condensed storage; write its `values` instead (or convert it back with to_dense())"
        )

    def dense(self) -> Tensor:
        """The dense weight, built now."""
        return self._module.dense_weight()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        views = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, DenseWeightView)]
        if name.endswith("_") and not name.endswith("__") and views:
            views[0]._refuse_write(f"{name}()")

        def unwrap(value):
            if isinstance(value, DenseWeightView):
                return value.dense()
            if isinstance(value, (list, tuple)):
                return type(value)(unwrap(v) for v in value)
            return value

        return func(*unwrap(args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str):
        # Tensor attributes other than the metadata above: in-place methods and .data
        # (whose writes would be lost) raise; the rest run on the dense weight.
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "data" or (name.endswith("_") and hasattr(Tensor, name)):
            self._refuse_write(f"weight.{name}")
        return getattr(self.dense(), name)

    def __repr__(self) -> str:
        return f"DenseWeightView(shape={list(self.shape)}, dtype={self.dtype}, device={self.device}) of a {self._module._describe()}"


def _binary(name: str):
    def method(self, *args):
        return getattr(self.dense(), name)(*args)

    method.__name__ = name
    return method


# Operators look up dunder methods on the type, not through __getattr__.
for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__matmul__", "__rmatmul__",
              "__truediv__", "__neg__", "__getitem__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(DenseWeightView, _name, _binary(_name))
DenseWeightView.__hash__ = object.__hash__  # type: ignore[assignment]
del _name

__all__ = ["DenseWeightView"]
