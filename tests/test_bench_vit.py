"""The end-to-end ViT benchmark at a tiny size: masks, conversion, output check, report."""

import json

import pytest
import torch

from condensed_ops.bench import vit
from condensed_ops.bench.vit import VIT_B16, VisionTransformer, end_to_end, format_markdown, sparsify_

TINY = dict(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_width=256, num_classes=10)


def expected_parameters(image_size, patch_size, width, depth, heads, mlp_width, num_classes) -> int:
    """Counted from the architecture: weights + biases of every layer, LayerNorm scale + shift."""
    patch_embed = 3 * patch_size**2 * width + width
    tokens = (image_size // patch_size) ** 2 + 1
    block = (
        2 * (2 * width)  # two LayerNorms
        + width * 3 * width + 3 * width  # qkv
        + width * width + width  # proj
        + width * mlp_width + mlp_width  # fc1
        + mlp_width * width + width  # fc2
    )
    return patch_embed + width + tokens * width + depth * block + 2 * width + width * num_classes + num_classes


def test_vit_b16_parameter_count():
    with torch.device("meta"):  # no memory, no init cost
        model = VisionTransformer()
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_parameters(**VIT_B16) == 86_567_656


def test_tiny_forward_shape():
    model = VisionTransformer(**TINY)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.parametrize("include_attention", [False, True])
def test_sparsify_masks_have_constant_fan_in(include_attention):
    model = VisionTransformer(**TINY)
    masks = sparsify_(model, sparsity=0.9, include_attention=include_attention, seed=3)
    suffixes = ["mlp.fc1", "mlp.fc2"] + (["attn.qkv", "attn.proj"] if include_attention else [])
    assert sorted(masks) == sorted(f"blocks.{i}.{s}" for i in range(TINY["depth"]) for s in suffixes)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert mask.dtype == torch.bool and mask.shape == weight.shape
        fan_in = round(0.1 * weight.shape[1])  # 6 of 64, 26 of 256
        assert (mask.sum(dim=1) == fan_in).all()
        assert (weight[~mask] == 0).all() and (weight[mask] != 0).all()
    # Same seed, same masks.
    again = sparsify_(VisionTransformer(**TINY), sparsity=0.9, include_attention=include_attention, seed=3)
    assert all(torch.equal(masks[name], again[name]) for name in masks)


@pytest.mark.parametrize("include_attention", [False, True])
def test_end_to_end_tiny(include_attention):
    messages = []
    result = end_to_end(batches=(1, 3), rounds=2, config=TINY, include_attention=include_attention, threads=1, progress=messages.append)
    json.dumps(result)  # serialisable
    assert messages == ["ViT batch 1", "ViT batch 3"]
    assert result["converted_layers"] == (4 if include_attention else 2) * TINY["depth"]
    assert result["include_attention"] is include_attention
    assert result["threads"] == 1
    assert result["condensed_parameter_bytes"] < result["dense_parameter_bytes"]
    assert [row["batch"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["outputs_match"] is True
        assert row["dense_seconds"] > 0 and row["condensed_seconds"] > 0
        assert row["speedup"] == pytest.approx(row["dense_seconds"] / row["condensed_seconds"])
        assert row["condensed_images_per_second"] == pytest.approx(row["batch"] / row["condensed_seconds"])

    table = format_markdown(result)
    lines = table.splitlines()
    assert "90% sparse" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[-2:]] == ["1", "3"]


def test_end_to_end_notices_wrong_outputs(monkeypatch):
    # The check must be able to fail: nudge one condensed bias after conversion.
    def condense_then_break(*args, **kwargs):
        report = real_condense(*args, **kwargs)
        with torch.no_grad():
            report.model.get_submodule(report.converted[0].name).bias.add_(0.1)
        return report

    real_condense = vit.condense
    monkeypatch.setattr(vit, "condense", condense_then_break)
    (row,) = end_to_end(batches=(2,), rounds=2, config=TINY)["rows"]
    assert row["outputs_match"] is False and row["max_abs_diff"] > 1e-3
    assert "NO" in format_markdown(end_to_end(batches=(1,), rounds=2, config=TINY))


def test_end_to_end_restores_threads():
    threads = torch.get_num_threads()
    end_to_end(batches=(1,), rounds=2, config=TINY, threads=1)
    assert torch.get_num_threads() == threads


def test_end_to_end_rejects_bad_sparsity():
    with pytest.raises(ValueError, match="sparsity"):
        end_to_end(batches=(1,), sparsity=1.0, config=TINY)
