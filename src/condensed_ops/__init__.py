"""condensed_ops: fast kernels for constant fan-in (Structured RigL) sparse layers.

A constant fan-in layer stores, for each of its ``out`` neurons, exactly ``k``
weights (``values [out, k]``) and the input columns they read (``idx [out, k]``):

    y[..., o] = bias[o] + sum_j values[o, j] * x[..., idx[o, j]]
"""

import torch  # noqa: F401  -- loads libtorch before the extension that links it

_REBUILD = "pip install scikit-build-core pybind11 && pip install --no-build-isolation --force-reinstall --no-deps ."


def _check_built_torch() -> None:
    """The extension links libtorch's C++ ABI, which changes between torch releases."""
    try:
        from ._build_info import TORCH_VERSION as built
    except ImportError:  # a source tree that was never built: the import below says so
        return
    release = lambda version: version.split("+")[0].split(".")[:2]  # noqa: E731
    if release(built) != release(torch.__version__):
        raise ImportError(
            f"condensed_ops was built against torch {built}, but torch {torch.__version__} is installed; "
            f"rebuild it against this torch: {_REBUILD}"
        )


_check_built_torch()
try:
    from . import _C  # noqa: F401  -- registers torch.ops.condensed_ops.*
except ImportError as error:  # a source tree that was never built
    raise ImportError(
        "condensed_ops: the compiled extension condensed_ops._C is missing or does not load "
        f"({error}). Build and install the package against the installed torch: {_REBUILD}"
    ) from error
from . import masks, srigl
from .attention import CondensedMultiheadAttention
from .convert import CondenseReport, condense, load_condensed
from .freshness import mark_modified
from .layout import to_condensed, to_dense
from .modules import CondensedConv2d, CondensedLinear
from .ops import condensed_linear, condensed_linear_packed, onnx_export_as, pack_for_inference
from .options import current_kernel_options, kernel_options

__version__: str = _C.__version__

__all__ = [
    "CondenseReport",
    "CondensedConv2d",
    "CondensedMultiheadAttention",
    "CondensedLinear",
    "condense",
    "condensed_linear",
    "condensed_linear_packed",
    "current_kernel_options",
    "kernel_options",
    "load_condensed",
    "mark_modified",
    "masks",
    "onnx_export_as",
    "pack_for_inference",
    "srigl",
    "to_condensed",
    "to_dense",
    "__version__",
]
