"""The models users bring, built from configs (nothing downloaded), condensed and timed.

Families: transformers' BERT, GPT-2, Llama, ViT, DeiT, CLIP vision, Swin and ResNet-50;
timm's ViT and torchvision's ResNet-50 when those import. ``"bench"`` sizes are the
published architectures (BERT-base, GPT-2 small, ViT-B/16, ResNet-50...; Llama at 1/8
of Llama-2-7B's width by depth, so it fits a CPU run); ``"tiny"`` sizes are for tests.
Weights are random: speed does not depend on them, and outputs are checked against
the masked dense model.
"""

import importlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import condense
from ..masks import magnitude_masks, sparsifiable_layers
from .timing import time_interleaved

Inputs = Callable[[int], Dict[str, Tensor]]


@dataclass(frozen=True)
class Family:
    """How to build one model family: the library it needs and a builder per size."""

    library: str
    build: Callable[[str], nn.Module]
    inputs: Callable[[nn.Module, str], Inputs]
    description: str


def _tokens(vocab: int, length: int) -> Callable[[nn.Module, str], Inputs]:
    def make(model: nn.Module, size: str) -> Inputs:
        tokens = length if size == "bench" else 16
        return lambda batch: {"input_ids": torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(batch))}

    return make


def _images(bench_size: int, tiny_size: int = 32, keyword: str = "pixel_values") -> Callable[[nn.Module, str], Inputs]:
    def make(model: nn.Module, size: str) -> Inputs:
        side = bench_size if size == "bench" else tiny_size
        return lambda batch: {keyword: torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))}

    return make


def _transformers(config_name: str, model_name: str, bench: Dict, tiny: Dict) -> Callable[[str], nn.Module]:
    def build(size: str) -> nn.Module:
        transformers = importlib.import_module("transformers")
        config = getattr(transformers, config_name)(**(bench if size == "bench" else tiny))
        return getattr(transformers, model_name)(config)

    return build


_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_TINY_ENCODER = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256)
_TINY_VISION = dict(_TINY_ENCODER, image_size=32, patch_size=8)

FAMILIES: Dict[str, Family] = {
    "bert": Family(
        "transformers",
        _transformers("BertConfig", "BertModel", dict(_NO_DROPOUT), dict(_TINY_ENCODER, vocab_size=1000, **_NO_DROPOUT)),
        _tokens(1000, 64),
        "BERT-base (12 layers, 768 wide), 64 tokens",
    ),
    "gpt2": Family(
        "transformers",
        _transformers(
            "GPT2Config", "GPT2LMHeadModel", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
            dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        ),
        _tokens(1000, 64),
        "GPT-2 small (12 layers, 768 wide, transformers Conv1D layers), 64 tokens",
    ),
    "llama": Family(
        "transformers",
        _transformers(
            "LlamaConfig", "LlamaForCausalLM",
            dict(num_hidden_layers=4, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, intermediate_size=5504, vocab_size=32000),
            dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=176, vocab_size=1000),
        ),
        _tokens(1000, 64),
        "Llama (4 layers, 2048 wide, MLP 5504), 64 tokens",
    ),
    "vit": Family(
        "transformers", _transformers("ViTConfig", "ViTModel", dict(_NO_DROPOUT), dict(_TINY_VISION, **_NO_DROPOUT)), _images(224),
        "ViT-B/16 (transformers), 224x224",
    ),
    "deit": Family(
        "transformers", _transformers("DeiTConfig", "DeiTModel", dict(_NO_DROPOUT), dict(_TINY_VISION, **_NO_DROPOUT)), _images(224),
        "DeiT-B/16, 224x224",
    ),
    "clip_vision": Family(
        "transformers", _transformers("CLIPVisionConfig", "CLIPVisionModel", dict(patch_size=16), dict(_TINY_VISION)), _images(224),
        "CLIP ViT-B/16 vision tower, 224x224",
    ),
    "swin": Family(
        "transformers",
        _transformers(
            "SwinConfig", "SwinModel", dict(),
            dict(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4),
        ),
        _images(224),
        "Swin-T, 224x224",
    ),
    "resnet50": Family(
        "transformers",
        _transformers(
            "ResNetConfig", "ResNetModel", dict(layer_type="bottleneck", depths=[3, 4, 6, 3]),
            dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"),
        ),
        _images(224),
        "ResNet-50 (transformers), 224x224",
    ),
    "timm_vit": Family(
        "timm",
        lambda size: importlib.import_module("timm").create_model(
            "vit_base_patch16_224" if size == "bench" else "vit_tiny_patch16_224", pretrained=False,
            **({} if size == "bench" else dict(img_size=32, patch_size=8, depth=2)),
        ),
        _images(224, keyword="x"),
        "timm vit_base_patch16_224, 224x224",
    ),
    "torchvision_resnet50": Family(
        "torchvision",
        lambda size: importlib.import_module("torchvision.models").resnet50() if size == "bench" else importlib.import_module("torchvision.models").resnet18(),
        _images(224, keyword="x"),
        "torchvision resnet50, 224x224",
    ),
}


def unavailable_reason(family: str) -> Optional[str]:
    """Why ``family`` cannot be built here (its library does not import), or None."""
    library = FAMILIES[family].library
    try:
        importlib.import_module(library)
    except Exception as error:  # torchvision built for another torch raises RuntimeError, not ImportError
        return f"{library} does not import: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def build(family: str, size: str = "tiny", sparsity: float = 0.9) -> tuple:
    """``(masked dense model, masks, inputs)``: the family's model in eval mode, its
    sparsifiable layers magnitude-pruned to a constant fan-in (``masks``, applied to
    the weights), and ``inputs(batch)`` giving the forward's keyword arguments."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    if size not in ("tiny", "bench"):
        raise ValueError(f"size must be 'tiny' or 'bench', got {size!r}")
    spec = FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.build(size).eval()
    # A weight tied to another (GPT-2's lm_head is its token embedding) stays dense.
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [name for name, module in sparsifiable_layers(model).items() if owners[id(module.weight)] > 1]
    masks = magnitude_masks(model, sparsity, exclude=tied)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)
    return model, masks, spec.inputs(model, size)


def _first_output(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):  # transformers' ModelOutput is a dict
        return next(iter(output.values()))
    return output[0]


def end_to_end(
    families: Sequence[str],
    batches: Sequence[int] = (1, 32),
    threads: Optional[int] = None,
    sparsity: float = 0.9,
    rounds: int = 5,
    max_seconds: float = 30.0,
    size: str = "bench",
    progress: Optional[Callable[[str], None]] = None,
) -> List[dict]:
    """Latency and throughput of each family's model, dense against condensed
    (``condense(masks=magnitude_masks(...), min_weights=0)``), CPU, float32: one row
    per (family, batch), with the outputs checked against the dense model's."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rows: List[dict] = []
    try:
        for family in families:
            reason = unavailable_reason(family)
            if reason is not None:
                rows.append({"family": family, "skipped": reason})
                continue
            dense, masks, inputs = build(family, size, sparsity)
            report = condense(dense, masks=masks, min_weights=0, inplace=False)
            condensed = report.model
            for batch in batches:
                if progress is not None:
                    progress(f"{family} batch {batch}")
                kwargs = inputs(batch)
                with torch.inference_mode():
                    expected, actual = _first_output(dense(**kwargs)), _first_output(condensed(**kwargs))
                    scale = max(float(expected.abs().max()), 1.0)
                    timings = time_interleaved(
                        {"dense": lambda: dense(**kwargs), "condensed": lambda: condensed(**kwargs)},
                        rounds=rounds, min_rounds=2, max_seconds=max_seconds,
                    )
                rows.append({
                    "family": family,
                    "model": FAMILIES[family].description if size == "bench" else f"{family} (test-sized config)",
                    "batch": batch,
                    "threads": torch.get_num_threads(),
                    "converted_layers": len(report.converted),
                    "dense_layer_bytes": report.dense_bytes(),
                    "condensed_layer_bytes": report.condensed_bytes(),
                    "dense_seconds": timings["dense"].seconds,
                    "condensed_seconds": timings["condensed"].seconds,
                    "speedup": timings["dense"].seconds / timings["condensed"].seconds,
                    "max_abs_diff_over_scale": float((actual - expected).abs().max()) / scale,
                })
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def format_markdown(rows: Sequence[dict], sparsity: float = 0.9) -> str:
    """The rows of :func:`end_to_end` as a Markdown table."""
    lines = [
        f"Whole models, {100 * sparsity:.0f}% constant fan-in (magnitude) in every Linear / Conv2d / Conv1D, float32, CPU",
        "",
        "| model | batch | threads | dense ms | condensed ms | speed-up | layers converted (bytes) | max diff / scale |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['family']} | — | — | — | — | — | skipped: {row['skipped']} | — |")
            continue
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['threads']} | {1e3 * row['dense_seconds']:.1f} | "
            f"{1e3 * row['condensed_seconds']:.1f} | {row['speedup']:.2f}× | {row['converted_layers']} "
            f"({row['dense_layer_bytes'] / 2**20:.1f} -> {row['condensed_layer_bytes'] / 2**20:.1f} MiB) | "
            f"{row['max_abs_diff_over_scale']:.1e} |"
        )
    return "\n".join(lines)


__all__ = ["FAMILIES", "Family", "build", "end_to_end", "format_markdown", "unavailable_reason"]
