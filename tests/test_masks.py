"""condensed_ops.masks: random constant fan-in masks, per-layer density allocation,
magnitude pruning to a fan-in and padding uneven masks."""

import math

import pytest
import torch
from torch import nn

from condensed_ops.layout import to_condensed
from condensed_ops.masks import (
    constant_fan_in_mask,
    fan_in_for_density,
    grouped_fan_in_mask,
    layer_densities,
    magnitude_prune_to_fan_in,
    pad_to_constant_fan_in,
    sparsifiable_layers,
)

# ---- constant_fan_in_mask ---------------------------------------------------------


@pytest.mark.parametrize("out_features,in_features,fan_in", [(1, 1, 1), (7, 10, 3), (5, 9, 0), (6, 9, 9), (0, 4, 2), (33, 100, 17)])
def test_constant_fan_in_mask_has_fan_in_distinct_columns_per_row(out_features, in_features, fan_in):
    mask = constant_fan_in_mask(out_features, in_features, fan_in, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (out_features, in_features)
    assert mask.sum(dim=1).tolist() == [fan_in] * out_features


def test_constant_fan_in_mask_is_reproducible_from_a_seed():
    def draw(seed):
        return constant_fan_in_mask(20, 30, 7, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_constant_fan_in_mask_picks_columns_uniformly():
    out_features, in_features, fan_in = 4000, 10, 3
    mask = constant_fan_in_mask(out_features, in_features, fan_in, generator=torch.Generator().manual_seed(0))
    column_share = mask.sum(dim=0).double() / out_features
    # Binomial(4000, 0.3) per column: 5 standard deviations is ~0.036.
    torch.testing.assert_close(column_share, torch.full((in_features,), fan_in / in_features, dtype=torch.float64), atol=0.036, rtol=0)
    # Rows are not all the same draw.
    assert len({tuple(row.nonzero().flatten().tolist()) for row in mask[:200]}) > 50


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(out_features=3, in_features=5, fan_in=6), "fan_in"),
        (dict(out_features=3, in_features=5, fan_in=-1), "fan_in"),
        (dict(out_features=3, in_features=5, fan_in=2.0), "fan_in"),
        (dict(out_features=-1, in_features=5, fan_in=2), "out_features"),
        (dict(out_features=3, in_features=-5, fan_in=0), "in_features"),
    ],
)
def test_constant_fan_in_mask_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        constant_fan_in_mask(**kwargs)


# ---- layer_densities ---------------------------------------------------------------


def test_erk_closed_form_with_a_layer_made_dense():
    # Raw ERK densities: a (10+20)/200 = 0.15, b (30+40)/1200 = 7/120. At sparsity
    # 0.5 the target is 700 weights: the common scale 700 / (30 + 70) = 7 would put
    # a at 1.05, so a is dense and b gets the remaining 500 of its 1200 weights.
    densities = layer_densities({"a": (10, 20), "b": (30, 40)}, 0.5, "erk")
    assert densities["a"] == 1.0
    assert densities["b"] == pytest.approx(500 / 1200)


def test_erk_ratios_follow_the_kernel_formula():
    shapes = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 5, 5), "fc": (10, 64)}
    densities = layer_densities(shapes, 0.98, "erk")
    raw = {
        "conv1": (16 + 3 + 3 + 3) / (16 * 3 * 3 * 3),
        "conv2": (32 + 16 + 3 + 3) / (32 * 16 * 3 * 3),
        "conv3": (64 + 32 + 5 + 5) / (64 * 32 * 5 * 5),
        "fc": (10 + 64) / (10 * 64),
    }
    assert all(d < 1 for d in densities.values())  # 98% sparse: nothing saturates
    for name in shapes:
        assert densities[name] / densities["conv3"] == pytest.approx(raw[name] / raw["conv3"])
    kept = sum(densities[name] * math.prod(shape) for name, shape in shapes.items())
    assert kept == pytest.approx(0.02 * sum(math.prod(shape) for shape in shapes.values()))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("method", ["erk", "uniform"])
def test_allocated_total_matches_the_target(method, sparsity):
    shapes = {"stem": (8, 3, 3, 3), "block": (16, 8, 3, 3), "wide": (64, 16, 1, 1), "fc1": (200, 64), "fc2": (10, 200)}
    densities = layer_densities(shapes, sparsity, method)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    target = (1 - sparsity) * sum(numels.values())
    assert all(0 < d <= 1 for d in densities.values())
    assert sum(densities[name] * numels[name] for name in shapes) == pytest.approx(target)
    if method == "uniform":
        assert all(d == pytest.approx(1 - sparsity) for d in densities.values())

    # After rounding to a fan-in each layer is off by at most half a weight per
    # row, unless the floor of one weight per row lifted it.
    fan_ins = {name: fan_in_for_density(densities[name], math.prod(shape[1:])) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        in_features = math.prod(shape[1:])
        assert abs(fan_ins[name] - densities[name] * in_features) <= 0.5 or fan_ins[name] == 1
    kept = sum(shape[0] * fan_ins[name] for name, shape in shapes.items())
    slack = sum(shape[0] * max(0.5, 1 - densities[name] * math.prod(shape[1:])) for name, shape in shapes.items())
    assert abs(kept - target) <= slack


def test_layer_densities_from_a_model_picks_linear_and_dense_convs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise: no constant fan-in over channels
        nn.Conv2d(8, 16, 1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.Linear(32, 10),
    )
    assert list(sparsifiable_layers(model)) == ["0", "3", "5", "6"]
    densities = layer_densities(model, 0.8, "erk", exclude={"6"})
    assert list(densities) == ["0", "3", "5"]
    expected = layer_densities({"0": (8, 3, 3, 3), "3": (16, 8, 1, 1), "5": (32, 16)}, 0.8, "erk")
    assert densities == expected


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda: layer_densities({"a": (4, 4)}, 1.0), "sparsity"),
        (lambda: layer_densities({"a": (4, 4)}, -0.1), "sparsity"),
        (lambda: layer_densities({"a": (4, 4)}, 0.5, "random"), "method"),
        (lambda: layer_densities({"a": (4, 4)}, 0.5, exclude={"b"}), "exclude"),
        (lambda: layer_densities(nn.Linear(3, 3), 0.5, exclude={"fc"}), "exclude"),
        (lambda: layer_densities({"a": (4,)}, 0.5), "weight shape"),
        (lambda: fan_in_for_density(1.5, 10), "density"),
    ],
)
def test_allocation_rejects_bad_arguments(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("density,in_features,expected", [(0.3, 10, 3), (0.001, 100, 1), (0.0, 8, 1), (1.0, 7, 7), (0.26, 100, 26), (0.6, 5, 3)])
def test_fan_in_for_density(density, in_features, expected):
    assert fan_in_for_density(density, in_features) == expected


# ---- magnitude_prune_to_fan_in -----------------------------------------------------


@pytest.mark.parametrize("shape,fan_in", [((6, 20), 5), ((6, 20), 0), ((6, 20), 20), ((8, 3, 3, 3), 7)])
def test_magnitude_prune_keeps_each_rows_largest_magnitudes(shape, fan_in):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    mask = magnitude_prune_to_fan_in(weight, fan_in)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    for row_weights, row_mask in zip(weight.flatten(1).abs(), mask.flatten(1)):
        assert int(row_mask.sum()) == fan_in
        expected = set(row_weights.argsort(descending=True)[:fan_in].tolist())
        assert set(row_mask.nonzero().flatten().tolist()) == expected


def test_magnitude_prune_breaks_ties_towards_lower_columns():
    weight = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0]])
    assert magnitude_prune_to_fan_in(weight, 2).tolist() == [[False, True, True, False, False]]


def test_magnitude_prune_rejects_bad_fan_in():
    with pytest.raises(ValueError, match="fan_in"):
        magnitude_prune_to_fan_in(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="weight"):
        magnitude_prune_to_fan_in(torch.ones(3), 1)


# ---- pad_to_constant_fan_in ----------------------------------------------------------

UNEVEN_MASK = torch.tensor(
    [
        [1, 0, 1, 0, 1, 0],  # 3: already full
        [0, 0, 0, 1, 0, 0],  # 1: pads columns 0, 1
        [0, 0, 0, 0, 0, 0],  # 0: an ablated neuron
        [0, 1, 0, 0, 0, 1],  # 2: pads column 0
    ],
    dtype=torch.bool,
)


def test_padding_fills_every_row_with_its_lowest_unused_columns():
    padded, report = pad_to_constant_fan_in(UNEVEN_MASK)
    expected = torch.tensor(
        [[1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(padded, expected)
    assert report.fan_in == 3
    assert report.padded_entries == 6  # 0 + 2 + 3 + 1
    assert report.padding_fraction == pytest.approx(6 / 12)
    assert report.empty_rows.tolist() == [False, False, True, False]
    assert report.empty_rows_padded


def test_padding_can_leave_ablated_rows_out():
    padded, report = pad_to_constant_fan_in(UNEVEN_MASK, pad_empty_rows=False)
    assert padded[2].sum() == 0
    assert padded.sum(dim=1).tolist() == [3, 3, 0, 3]
    assert report.padded_entries == 3
    assert report.padding_fraction == pytest.approx(3 / 9)  # three stored rows of 3
    assert report.empty_rows.tolist() == [False, False, True, False]
    assert not report.empty_rows_padded


def test_padding_a_sparse_conv_weight_condenses_with_zeros():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 2, 3, 3, generator=g)
    weight[weight.abs() < 0.8] = 0  # unstructured: uneven rows
    padded, report = pad_to_constant_fan_in(weight)
    assert padded.shape == weight.shape
    row_counts = (weight.flatten(1) != 0).sum(dim=1)
    assert report.fan_in == int(row_counts.max())
    assert report.padded_entries == int((report.fan_in - row_counts).sum())
    assert padded.flatten(1).sum(dim=1).tolist() == [report.fan_in] * 5
    assert bool((padded | (weight == 0)).all())  # every nonzero kept
    values, idx = to_condensed(weight.flatten(1), padded.flatten(1))
    assert int((values != 0).sum()) == int((weight != 0).sum())  # the padding stores zeros


def test_padding_an_even_mask_adds_nothing():
    mask = constant_fan_in_mask(7, 12, 4, generator=torch.Generator().manual_seed(3))
    padded, report = pad_to_constant_fan_in(mask)
    assert torch.equal(padded, mask)
    assert (report.fan_in, report.padded_entries, report.padding_fraction) == (4, 0, 0.0)


# ---- grouped_fan_in_mask -------------------------------------------------------------


@pytest.mark.parametrize("out_features,in_features,fan_in,group_size", [(16, 10, 3, 4), (19, 10, 3, 4), (5, 7, 2, 8), (6, 9, 9, 2), (0, 4, 2, 3), (33, 100, 17, 32)])
def test_grouped_fan_in_mask_shares_fan_in_columns_within_each_group(out_features, in_features, fan_in, group_size):
    mask = grouped_fan_in_mask(out_features, in_features, fan_in, group_size, generator=torch.Generator().manual_seed(1))
    assert mask.dtype == torch.bool and mask.shape == (out_features, in_features)
    assert mask.sum(dim=1).tolist() == [fan_in] * out_features
    for start in range(0, out_features, group_size):  # the last group may be partial
        group = mask[start : start + group_size]
        assert bool((group == group[0]).all()), f"rows of the group at {start} differ"


def test_grouped_fan_in_mask_draws_each_group_at_random():
    mask = grouped_fan_in_mask(800, 10, 3, 4, generator=torch.Generator().manual_seed(0))
    firsts = mask[::4]
    assert len({tuple(row.nonzero().flatten().tolist()) for row in firsts}) > 50
    column_share = firsts.sum(dim=0).double() / firsts.shape[0]
    # Binomial(200, 0.3) per column: 5 standard deviations is ~0.16.
    torch.testing.assert_close(column_share, torch.full((10,), 0.3, dtype=torch.float64), atol=0.16, rtol=0)


@pytest.mark.parametrize("out_features", [1, 7, 32])
def test_grouped_fan_in_mask_with_group_size_1_is_constant_fan_in_mask(out_features):
    grouped = grouped_fan_in_mask(out_features, 20, 6, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(grouped, constant_fan_in_mask(out_features, 20, 6, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(group_size=0), "group_size"),
        (dict(group_size=2.0), "group_size"),
        (dict(group_size=True), "group_size"),
        (dict(fan_in=6), "fan_in"),
        (dict(out_features=-1), "out_features"),
    ],
)
def test_grouped_fan_in_mask_rejects_bad_arguments(kwargs, argument):
    arguments = dict(out_features=8, in_features=5, fan_in=2, group_size=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        grouped_fan_in_mask(**arguments)
