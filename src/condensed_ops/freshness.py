"""Keeping the ops' cached layouts in step with every write to a layer's tensors.

The C++ ops cache what they derive from ``values`` and ``idx`` (validated indices,
the window layout, W's column layout, a grouped layer's expanded indices) and
rebuild it when a tensor's version counter moves, which every in-place torch op
does. Some writers do not move it:

- fused optimizers (``torch.optim.AdamW(..., fused=True)``, also ``Adam`` and
  ``SGD``) and optimizers that write through ``p.data``: handled here, for every
  ``torch.optim.Optimizer``, by a step post-hook that marks each parameter it
  stepped (one with a gradient) as modified, as the non-fused optimizers' own
  in-place ops do;
- writes through ``.data``, numpy or DLPack, and custom kernels: call
  :func:`mark_modified` on the tensor or module afterwards. (A rewrite of a
  whole tensor is usually detected anyway, from a sample of its elements, but a
  write of a few entries is not.)

Whatever is missed, no op reads memory out of bounds: the kernels check every
index they read, and a window layout is only ever built from indices scanned
while it is built.
"""

from typing import Any, Dict, Iterator, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def mark_modified(*targets: Union[Tensor, nn.Module]) -> None:
    """Tell the ops' caches that ``targets`` changed without torch seeing it.

    Each target is a tensor or a module (all its parameters and buffers). Needed
    after a write through ``.data``, numpy, DLPack or a custom kernel; not after
    in-place torch ops or ``torch.optim`` steps (fused ones included), which the
    caches see themselves. Example::

        layer.idx.data[0, 0] = 5
        condensed_ops.mark_modified(layer)
    """
    tensors = []
    for target in targets:
        if isinstance(target, nn.Module):
            tensors.extend(_own_tensors(target))
        elif isinstance(target, Tensor):
            tensors.append(target)
        else:
            raise TypeError(f"mark_modified: expected tensors or nn.Modules, got {type(target).__name__}")
    _increment_versions(tensors)


def _own_tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from module.parameters()
    yield from (b for b in module.buffers() if b is not None)


def _increment_versions(tensors: list) -> None:
    if not tensors:
        return
    try:
        torch.autograd.graph.increment_version(tensors)  # skips inference tensors (torch 2.13)
    except RuntimeError:
        # Inference tensors have no version counter (some torch releases refuse
        # them), and the ops never cache them.
        counted = [t for t in tensors if not t.is_inference()]
        if counted:
            torch.autograd.graph.increment_version(counted)


def _mark_stepped_parameters(optimizer: torch.optim.Optimizer, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Step post-hook for every optimizer: bumps each stepped parameter's version.
    A second bump after a non-fused step is harmless (a version only has to move)."""
    del args, kwargs
    _increment_versions([p for group in optimizer.param_groups for p in group["params"] if p.grad is not None])


_optimizer_hook = register_optimizer_step_post_hook(_mark_stepped_parameters)

__all__ = ["mark_modified"]
