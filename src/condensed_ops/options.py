"""Forcing a kernel path: for benchmarks, bisecting a wrong result, or a machine
where the automatic choice is slow.

Each option starts from its environment variable (``CONDENSED_OPS_<NAME>``, read
once per process) and :func:`kernel_options` overrides it inside a ``with`` block.
The options and their choices (the first, ``"auto"``, lets the package decide):

- ``cpu_isa``: ``auto``, ``portable``, ``avx2``, ``avx512`` (the widest this CPU runs);
- ``cpu_strategy``: ``auto``, ``gather``, ``scalar``, ``tiled`` (the row layout's
  kernel at every batch size);
- ``cpu_small_batch``: ``auto``, ``gather``, ``scalar`` (the one-row kernel; ``auto``
  is a 2 ms calibration on first use, so pin it to reproduce another process's
  result bits exactly: ``cpu_capabilities()["small_batch_pin"]`` says how);
- ``cuda_x``: ``auto``, ``shared``, ``global``; ``cuda_grad_input``: ``auto``,
  ``scatter``, ``columns``;
- the CUDA forward's variants (``benchmarks/cuda_sweep.py`` times them all):
  ``cuda_lanes_per_row``: ``auto``, ``1`` .. ``32`` (powers of two);
  ``cuda_packs_in_flight``: ``auto``, ``2``, ``4``; ``cuda_splits``: ``auto``,
  ``1``, ``2``, ``4``, ``8`` (blocks sharing one row's fan-in); ``cuda_batch_tile``:
  ``auto``, ``1`` .. ``16`` (batch rows per pass, powers of two); ``cuda_tuned``:
  ``auto`` (variants measured on this GPU architecture first, where the package
  has them), ``off`` (the planner's rule alone).

``condensed_ops._C.cpu_capabilities()`` shows the options in force and what the
calibration chose.
"""

import contextlib
from typing import Dict, Iterator

from . import _C


def current_kernel_options() -> Dict[str, str]:
    """Every option's name and the choice in force."""
    return dict(_C._kernel_options())


@contextlib.contextmanager
def kernel_options(**options: str) -> Iterator[Dict[str, str]]:
    """Force kernel choices inside the block, then restore the ones before it::

        with condensed_ops.kernel_options(cpu_isa="avx2", cpu_strategy="gather"):
            y = layer(x)

    Raises ValueError naming the option for an unknown option or choice, or a
    choice this CPU or build cannot run (nothing is changed then). The options
    are process-wide: other threads see them too. Yields the options in force.
    """
    before = current_kernel_options()
    try:
        for name, value in options.items():
            if not isinstance(value, str):
                raise TypeError(f"kernel_options: {name} must be a str, got {type(value).__name__}")
            _C._set_kernel_option(name, value)
        yield current_kernel_options()
    finally:
        for name in options:
            if name in before:
                _C._set_kernel_option(name, before[name])


__all__ = ["current_kernel_options", "kernel_options"]
