"""End to end: a ViT-B/16-sized encoder with 90% sparse constant fan-in MLP linears
(optionally the attention projections too), condensed, against the masked dense model.

The masked dense model is the baseline: it computes the same function with the
dense kernels, so the comparison isolates what condensing buys a whole network,
attention, LayerNorms and the dense layers left as they were included. The model
is plain PyTorch with random weights (nothing downloaded): speed does not depend
on what the weights are, and the outputs are checked against the baseline's.
"""

from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import condense
from ..masks import constant_fan_in_mask, fan_in_for_density
from .timing import time_interleaved

VIT_B16: Dict[str, int] = dict(image_size=224, patch_size=16, width=768, depth=12, heads=12, mlp_width=3072, num_classes=1000)

# Relative to the output's scale: summation order differs from the dense GEMM's
# in every converted layer, and the differences add up over the blocks.
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        # [3, batch, heads, tokens, head_width]
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A pre-norm ViT encoder and classification head (ViT-B/16 by default)."""

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_width: int = 3072,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position_embedding = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2 + 1, width))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [batch, patches, width]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        return self.head(self.norm(self.blocks(x))[:, 0])


def sparsify_(model: nn.Module, sparsity: float = 0.9, include_attention: bool = False, seed: int = 0) -> Dict[str, Tensor]:
    """Zero all but a random constant fan-in of every block's MLP linears (and
    attention projections with ``include_attention``), in place; returns ``{name: mask}``."""
    suffixes = ("mlp.fc1", "mlp.fc2") + (("attn.qkv", "attn.proj") if include_attention else ())
    generator = torch.Generator().manual_seed(seed)
    masks: Dict[str, Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("blocks.") and name.endswith(suffixes):
                out_features, in_features = module.weight.shape
                fan_in = fan_in_for_density(1.0 - sparsity, in_features)
                mask = constant_fan_in_mask(out_features, in_features, fan_in, generator=generator)
                masks[name] = mask.to(module.weight.device)
                module.weight.mul_(masks[name])
    return masks


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def end_to_end(
    batches: Sequence[int] = (1, 64, 256),
    sparsity: float = 0.9,
    include_attention: bool = False,
    threads: Optional[int] = None,
    rounds: int = 5,
    max_seconds: float = 60.0,
    config: Optional[Mapping[str, int]] = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[str], None]] = None,
) -> dict:
    """Latency (batch 1) and throughput (large batches) of the condensed ViT against
    the masked dense one, with a check that their outputs agree.

    Args:
        batches: batch sizes, one row each.
        sparsity: fraction of each converted layer's weights removed, in (0, 1).
        include_attention: condense the attention's qkv and proj too, not only the MLP.
        threads: torch's CPU threads for the run (restored after); None keeps the setting.
        rounds, max_seconds: passed to :func:`~condensed_ops.bench.timing.time_interleaved`
            (at least 2 rounds run even past ``max_seconds``).
        config: :class:`VisionTransformer` arguments; None is ViT-B/16.
        device, dtype: where and in what the models run.
        progress: called with ``"ViT batch {b}"`` before each batch.

    Returns:
        A JSON-serialisable dict (see ``format_markdown`` for the fields shown); times
        are graph-replay seconds on CUDA, eager seconds on CPU.
    """
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    config = dict(VIT_B16 if config is None else config)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):  # the same weights every run, global RNG untouched
            torch.manual_seed(0)
            dense = VisionTransformer(**config).eval()
        masks = sparsify_(dense, sparsity, include_attention)
        # Just above the masks' density: the dense patch embedding and head stay as they are.
        densest = max(float(mask.sum(dim=1).max()) / mask.shape[1] for mask in masks.values())
        report = condense(dense, max_density=min(1.0, densest + 1e-6), min_weights=0, masks=masks, inplace=False)
        if sorted(layer.name for layer in report.converted) != sorted(masks):
            raise RuntimeError(f"condense converted {[layer.name for layer in report.converted]}, expected {sorted(masks)}\n{report}")
        target = torch.device(device)
        dense, condensed = dense.to(target, dtype), report.model.to(target, dtype)
        parameters = sum(p.numel() for p in dense.parameters())
        name = "ViT-B/16 encoder" if config == VIT_B16 else "ViT encoder " + ", ".join(f"{k}={v}" for k, v in config.items())
        result = {
            "model": f"{name} ({parameters / 1e6:.1f}M parameters)",
            "config": config,
            "sparsity": sparsity,
            "include_attention": include_attention,
            "converted_layers": len(report.converted),
            "dense_parameter_bytes": _state_bytes(dense),
            "condensed_parameter_bytes": _state_bytes(condensed),
            "threads": torch.get_num_threads(),
            "device": str(target),
            "dtype": str(dtype),
            "rows": [],
        }
        size = config["image_size"]
        for batch in batches:
            if progress is not None:
                progress(f"ViT batch {batch}")
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(target, dtype)
            with torch.inference_mode():
                expected, actual = dense(images), condensed(images)
                max_abs_diff = float((actual - expected).abs().max())
                tolerance = _TOLERANCE.get(dtype, 1e-4) * max(float(expected.abs().max()), 1.0)
                outputs_match = bool(torch.allclose(actual, expected, rtol=_TOLERANCE.get(dtype, 1e-4), atol=tolerance))
                calls = {"dense": lambda: dense(images), "condensed": lambda: condensed(images)}
                timings = time_interleaved(calls, device=target, rounds=rounds, min_rounds=2, max_seconds=max_seconds)
            # graph-replay times when both models captured, else eager ones (never mixed)
            both_graphed = timings["dense"].graph_seconds is not None and timings["condensed"].graph_seconds is not None
            dense_seconds, condensed_seconds = (
                (timings["dense"].graph_seconds, timings["condensed"].graph_seconds) if both_graphed else (timings["dense"].seconds, timings["condensed"].seconds)
            )
            result["rows"].append({
                "batch": batch,
                "dense_seconds": dense_seconds,
                "condensed_seconds": condensed_seconds,
                "speedup": dense_seconds / condensed_seconds,
                "dense_images_per_second": batch / dense_seconds,
                "condensed_images_per_second": batch / condensed_seconds,
                "max_abs_diff": max_abs_diff,
                "outputs_match": outputs_match,
            })
        return result
    finally:
        torch.set_num_threads(previous_threads)


def format_markdown(result: dict) -> str:
    """The rows of :func:`end_to_end` as a Markdown table under a one-line description."""
    layers = "MLP and attention" if result["include_attention"] else "MLP"
    lines = [
        f"{result['model']}, {layers} linears {100 * result['sparsity']:.0f}% sparse ({result['converted_layers']} layers, "
        f"{result['dense_parameter_bytes'] / 2**20:.1f} -> {result['condensed_parameter_bytes'] / 2**20:.1f} MiB), "
        f"{result['threads']} threads, {result['device']}, {result['dtype']}",
        "",
        "| batch | dense ms | condensed ms | speed-up | dense img/s | condensed img/s | outputs match |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['batch']} | {1e3 * row['dense_seconds']:.2f} | {1e3 * row['condensed_seconds']:.2f} | "
            f"{row['speedup']:.2f}× | {row['dense_images_per_second']:.1f} | {row['condensed_images_per_second']:.1f} | "
            f"{'yes' if row['outputs_match'] else 'NO'} (max diff {row['max_abs_diff']:.1e}) |"
        )
    return "\n".join(lines)


__all__ = ["VIT_B16", "VisionTransformer", "end_to_end", "format_markdown", "sparsify_"]
