"""condensed_ops.srigl.SRigL: constant fan-in dynamic sparse training.

Invariants are checked after real training steps on small random models, with
expectations recomputed here from the weights, gradients and masks."""

import copy
import math
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condensed_ops.masks import fan_in_for_density, layer_densities
from condensed_ops.srigl import SRigL

CLASSES = 4


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, CLASSES))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, CLASSES),
    )


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "mlp": (make_mlp, (12,)),
    "cnn": (make_cnn, (3, 6, 6)),
}
OPTIMIZERS: Dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3),
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # These layers are tiny: with a busy CPU, waking a second thread per op costs
    # far more than it saves. (conftest restores the thread count afterwards.)
    torch.set_num_threads(1)


class Run:
    """A model, optimizer and updater, trained on seeded random batches."""

    def __init__(self, model_kind: str = "mlp", optimizer_kind: str = "sgd_momentum", seed: int = 0, **srigl_kwargs):
        make_model, self.input_shape = MODELS[model_kind]
        torch.manual_seed(seed)
        self.model = make_model()
        self.optimizer = OPTIMIZERS[optimizer_kind](self.model)
        self.data = torch.Generator().manual_seed(seed + 1000)
        kwargs = dict(sparsity=0.7, t_end=60, delta_t=5, alpha=0.3, gamma_sal=0.3, optimizer=self.optimizer)
        kwargs.update(srigl_kwargs)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        self.updater = SRigL(self.model, **kwargs)

    def batch(self) -> Tuple[Tensor, Tensor]:
        x = torch.randn(16, *self.input_shape, generator=self.data)
        return x, torch.randint(0, CLASSES, (16,), generator=self.data)

    def backward(self) -> None:
        x, y = self.batch()
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(x), y).backward()

    def train_step(self) -> bool:
        self.backward()
        updated = self.updater.step()
        self.optimizer.step()
        return updated

    def masks(self) -> Dict[str, Tensor]:
        return {name: layer.mask.clone() for name, layer in self.updater.layers.items()}


def check_layer_invariants(updater: SRigL) -> None:
    for name, layer in updater.layers.items():
        rows = layer.mask.flatten(1)
        active = ~layer.ablated_neurons
        row_counts = rows.sum(dim=1)
        assert row_counts[active].tolist() == [layer.fan_in] * int(active.sum()), f"{name}: fan-in not constant"
        assert int(row_counts[~active].sum()) == 0, f"{name}: an ablated neuron has weights"
        assert int(active.sum()) >= 1
        # The fan-in is budget // active neurons: never above the budget, and less
        # than one weight per active neuron below it.
        assert layer.fan_in == min(layer.in_features, layer.budget // int(active.sum())), name
        assert 0 <= layer.budget - int(rows.sum()) < int(active.sum()), name
        assert bool((layer.weight[~layer.mask] == 0).all()), f"{name}: a masked weight is nonzero"
        # Rows of a group share their columns and are ablated together.
        first_of_group = torch.arange(rows.shape[0]) // layer.group_size * layer.group_size
        assert torch.equal(rows, rows[first_of_group]), f"{name}: rows of a group differ"
        assert torch.equal(layer.ablated_neurons, layer.ablated_neurons[first_of_group]), f"{name}: part of a group ablated"


# ---- construction ------------------------------------------------------------------


@pytest.mark.parametrize("model_kind", MODELS)
@pytest.mark.parametrize("density_method", ["erk", "uniform"])
def test_initial_masks_follow_the_density_allocation(model_kind, density_method):
    run = Run(model_kind, sparsity=0.8, density_method=density_method, exclude={"6"} if model_kind == "cnn" else ())
    shapes = {name: tuple(m.weight.shape) for name, m in run.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if model_kind == "cnn":
        del shapes["6"]
        assert torch.count_nonzero(run.model[6].weight) == run.model[6].weight.numel()  # excluded: left dense
    densities = layer_densities(shapes, 0.8, density_method)
    assert list(run.updater.layers) == list(shapes)
    for name, shape in shapes.items():
        layer = run.updater.layers[name]
        in_features = math.prod(shape[1:])  # C_in * kh * kw for a conv
        assert layer.in_features == in_features
        assert layer.fan_in == fan_in_for_density(densities[name], in_features)
        assert layer.budget == shape[0] * layer.fan_in
        assert not layer.ablated_neurons.any()
        assert torch.equal(layer.weight != 0, layer.mask)  # random init: no accidental zeros
    check_layer_invariants(run.updater)


def test_masks_are_reproducible_from_a_seeded_generator():
    first, second = Run(seed=3), Run(seed=3)
    for _ in range(30):
        first.train_step()
        second.train_step()
    assert first.masks().keys() == second.masks().keys()
    for name, mask in first.masks().items():
        assert torch.equal(mask, second.masks()[name])
        assert torch.equal(first.updater.layers[name].ablated_neurons, second.updater.layers[name].ablated_neurons)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)

    other = Run(seed=3, generator=torch.Generator().manual_seed(4))
    assert any(not torch.equal(mask, other.masks()[name]) for name, mask in Run(seed=3).masks().items())


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(delta_t=0), "delta_t"),
        (dict(alpha=1.5), "alpha"),
        (dict(gamma_sal=-0.1), "gamma_sal"),
        (dict(t_end=-1), "t_end"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(exclude={"9"}), "exclude"),
        (dict(ablation_exempt={"1"}), "ablation_exempt"),  # a ReLU
        (dict(density_method="snip"), "method"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=True), "group_size"),
        (dict(group_size=2.0), "group_size"),
        (dict(group_size={"9": 2}), "group_size"),
        (dict(group_size={"0": 0}), "group_size"),
        (dict(drop_rule="global"), "drop_rule"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Run(**kwargs)


def test_a_model_without_sparsifiable_layers_is_rejected():
    with pytest.raises(ValueError, match="no Linear"):
        SRigL(nn.Sequential(nn.ReLU()), 0.5, t_end=10)


# ---- training invariants ---------------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("optimizer_kind", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("model_kind", MODELS)
def test_invariants_hold_through_many_updates(model_kind, optimizer_kind, group_size):
    run = Run(model_kind, optimizer_kind, gamma_sal=0.6, t_end=100, delta_t=4, group_size=group_size)
    initial = run.masks()
    updates = 0
    for _ in range(110):
        updates += run.train_step()
        check_layer_invariants(run.updater)
    assert updates == 24  # steps 4, 8, ..., 96
    for name, layer in run.updater.layers.items():
        if layer.fan_in < layer.in_features:  # ERK can leave a small layer dense: nothing to rewire
            assert not torch.equal(initial[name], layer.mask), f"{name}: the mask never moved"


@pytest.mark.parametrize("optimizer_kind", list(OPTIMIZERS))
def test_the_optimizer_hook_keeps_masked_weights_zero(optimizer_kind):
    # Without updater.step() the optimizer sees dense gradients (and weight decay
    # and momentum at masked positions): only the post-step hook holds them at 0.
    run = Run(optimizer_kind=optimizer_kind)
    for _ in range(5):
        run.backward()
        run.optimizer.step()
        for layer in run.updater.layers.values():
            assert bool((layer.weight[~layer.mask] == 0).all())
    run.updater.remove_optimizer_hook()
    run.backward()
    run.optimizer.step()
    assert any(bool((layer.weight[~layer.mask] != 0).any()) for layer in run.updater.layers.values())


def test_step_zeroes_gradients_outside_the_masks():
    run = Run()
    run.backward()
    assert any(bool((layer.weight.grad[~layer.mask] != 0).any()) for layer in run.updater.layers.values())
    run.updater.step()
    for layer in run.updater.layers.values():
        assert bool((layer.weight.grad[~layer.mask] == 0).all())


# ---- the update rule ---------------------------------------------------------------------


def run_to_update_step(run: Run) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Tensor]]:
    """Train up to the step before the next update, then back-propagate that
    step's batch; returns (masks, weights, dense grads) just before ``updater.step()``."""
    while not run.updater.is_update_step(run.updater.steps_taken + 1):
        run.train_step()
    run.backward()
    layers = run.updater.layers
    return (
        run.masks(),
        {name: layer.weight.detach().clone() for name, layer in layers.items()},
        {name: layer.weight.grad.clone() for name, layer in layers.items()},
    )


@pytest.mark.parametrize("model_kind", MODELS)
def test_the_neuron_rule_drops_each_neurons_smallest_weights_and_grows_at_its_largest_gradients(model_kind):
    run = Run(model_kind, gamma_sal=0.0, alpha=0.5, t_end=40, delta_t=5, drop_rule="neuron")
    drops_checked = 0
    for _ in range(4):  # updates at steps 5, 10, 15, 20
        masks, weights, grads = run_to_update_step(run)
        t = run.updater.steps_taken + 1
        assert run.updater.step()
        for name, layer in run.updater.layers.items():
            fan_in, in_features = layer.fan_in, layer.in_features
            expected_drops = min(round(0.5 / 2 * (1 + math.cos(math.pi * t / 40)) * fan_in), in_features - fan_in)
            old, new = masks[name].flatten(1), layer.mask.flatten(1)
            magnitude, grad_magnitude = weights[name].flatten(1).abs(), grads[name].flatten(1).abs()
            for row in range(old.shape[0]):
                dropped, grown = old[row] & ~new[row], new[row] & ~old[row]
                kept, passed_over = old[row] & new[row], ~old[row] & ~new[row]
                assert int(dropped.sum()) == int(grown.sum()) == expected_drops, (name, row)
                drops_checked += expected_drops
                if expected_drops:
                    assert magnitude[row][dropped].max() <= magnitude[row][kept].min()
                    if passed_over.any():
                        assert grad_magnitude[row][grown].min() >= grad_magnitude[row][passed_over].max()
        run.optimizer.step()
    assert drops_checked > 0


def test_grown_weights_start_at_zero_and_kept_weights_are_untouched():
    run = Run(gamma_sal=0.0)
    masks, weights, _ = run_to_update_step(run)
    for layer in run.updater.layers.values():  # junk where the weights are masked
        layer.weight.data.masked_fill_(~layer.mask, 7.0)
    run.updater.step()
    grown_somewhere = False
    for name, layer in run.updater.layers.items():
        old, new, weight = masks[name], layer.mask, layer.weight.detach()
        grown = new & ~old
        grown_somewhere |= bool(grown.any())
        assert bool((weight[grown] == 0).all())
        assert torch.equal(weight[old & new], weights[name][old & new])
        assert bool((weight[~new] == 0).all())
    assert grown_somewhere


@pytest.mark.parametrize("optimizer_kind", ["sgd_momentum", "adam"])
def test_optimizer_state_is_zeroed_where_the_mask_changed(optimizer_kind):
    run = Run(optimizer_kind=optimizer_kind, gamma_sal=0.5)
    masks, _, _ = run_to_update_step(run)
    states: List[Tuple[str, Tensor]] = []
    for name, layer in run.updater.layers.items():
        for value in run.optimizer.state[layer.weight].values():
            if value.shape == layer.weight.shape:
                value.fill_(1.0)
                states.append((name, value))
    assert len(states) == len(run.updater.layers) * (1 if optimizer_kind == "sgd_momentum" else 2)
    run.updater.step()
    for name, value in states:
        changed = masks[name] != run.updater.layers[name].mask
        assert changed.any()
        assert bool((value[changed] == 0).all())
        assert bool((value[~changed] == 1).all())


# ---- neuron ablation ---------------------------------------------------------------------


@pytest.mark.parametrize("drop_rule", ["layer", "neuron"])
@pytest.mark.parametrize("gamma_sal,ablated", [(0.3, False), (0.5, False), (0.6, True)])
def test_a_neuron_with_too_few_salient_weights_is_ablated_and_the_fan_in_rises(gamma_sal, ablated, drop_rule):
    # One layer, 4 neurons x 10 inputs, fan-in 5 (uniform 50%), drop fraction ~0.4:
    # the neuron rule drops 2 per neuron (8), the layer rule int(0.4 * 20) = 7, so
    # unstructured RigL keeps the layer's top 12 (13) |w| among its 20 active weights
    # and grows the top 8 (7) |grad| among its 20 inactive ones.
    # Neuron 0 has tiny weights and gradients except 2 large inactive gradients:
    # 2 salient weights, below the threshold max(1, int(gamma_sal * 5)) = 3 at 0.6,
    # not below it at 0.5 (2) or 0.3 (1).
    # Neurons 1-3 each have 4 weights above their one weight of 1.0: >= 4 salient each.
    model = nn.Sequential(nn.Linear(10, 4))
    updater = SRigL(
        model, 0.5, t_end=100, delta_t=1, alpha=0.4, gamma_sal=gamma_sal, density_method="uniform",
        ablation_exempt=(), generator=torch.Generator().manual_seed(0), drop_rule=drop_rule,
    )
    layer = updater.layers["0"]
    assert layer.fan_in == 5
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(4, 10, generator=g) + 2
    grad = torch.rand(4, 10, generator=g) + 1
    weight[0], grad[0] = 1e-3, 1e-3
    grad[0, (~layer.mask[0]).nonzero().flatten()[:2]] = 5.0
    for row in range(1, 4):
        weight[row, layer.mask[row].nonzero().flatten()[0]] = 1.0
    with torch.no_grad():
        model[0].weight.copy_(weight)
    model[0].weight.grad = grad
    updater.apply_masks()
    assert updater.step()
    if ablated:
        # The 20-weight budget is spread over 3 neurons: 20 // 3 = 6 (not above the budget).
        assert layer.ablated_neurons.tolist() == [True, False, False, False]
        assert layer.fan_in == 6
        assert layer.mask.sum(dim=1).tolist() == [0, 6, 6, 6]
        assert bool((model[0].weight[0] == 0).all())
    else:
        assert not layer.ablated_neurons.any()
        assert layer.fan_in == 5
        assert layer.mask.sum(dim=1).tolist() == [5, 5, 5, 5]


def test_ablation_keeps_enough_neurons_to_hold_the_budget():
    # 8 inputs at 50% density: fan-in 4, budget 40 * 4 = 160, so at least 160 / 8 =
    # 20 neurons must stay for the fan-in to fit in 8 inputs; the reference rule keeps
    # the neuron ranked 160 // 8 = 20 (0-based) too, and every one above it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigL(model, 0.5, t_end=1000, delta_t=1, alpha=0.5, gamma_sal=1.0, density_method="uniform", optimizer=optimizer)
    data = torch.Generator().manual_seed(1)
    for _ in range(20):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 8, generator=data)), torch.randint(0, CLASSES, (8,), generator=data)).backward()
        updater.step()
        optimizer.step()
    layer = updater.layers["0"]
    assert layer.active_neurons == 21
    assert layer.fan_in == 160 // 21
    assert not updater.layers["2"].ablated_neurons.any()  # the output layer is exempt by default
    check_layer_invariants(updater)


@pytest.mark.parametrize("model_kind", MODELS)
def test_ablated_neurons_stay_ablated_and_output_their_bias(model_kind):
    run = Run(model_kind, gamma_sal=0.9, alpha=0.5, t_end=80, delta_t=3)
    ablated_before = {name: layer.ablated_neurons.clone() for name, layer in run.updater.layers.items()}
    for _ in range(90):
        run.train_step()
        for name, layer in run.updater.layers.items():
            assert bool(layer.ablated_neurons[ablated_before[name]].all()), f"{name}: a neuron came back"
            ablated_before[name] = layer.ablated_neurons.clone()
    last = list(run.updater.layers)[-1]
    assert not run.updater.layers[last].ablated_neurons.any()
    first = run.updater.layers["0"]
    assert first.ablated_neurons.any(), "nothing was ablated: the test would prove nothing"

    x = torch.randn(5, *run.input_shape) * 10
    with torch.no_grad():
        out = first.module(x)
    ablated = first.ablated_neurons
    bias = first.module.bias[ablated]
    expected = bias.view(1, -1, *([1] * (out.dim() - 2))).expand_as(out[:, ablated])
    assert torch.equal(out[:, ablated], expected)
    assert not torch.equal(out[:, ~ablated], first.module.bias[~ablated].view(1, -1, *([1] * (out.dim() - 2))).expand_as(out[:, ~ablated]))


# ---- schedule ------------------------------------------------------------------------------


def test_updates_run_every_delta_t_steps_until_t_end():
    run = Run(t_end=50, delta_t=7, gamma_sal=0.0)
    update_steps = []
    for t in range(1, 81):
        before = run.masks()
        if run.train_step():
            update_steps.append(t)
        else:
            assert all(torch.equal(before[name], mask) for name, mask in run.masks().items()), f"masks moved at step {t}"
    assert update_steps == [7, 14, 21, 28, 35, 42, 49]
    assert run.updater.steps_taken == 80


def test_the_drop_fraction_decays_with_a_cosine():
    updater = Run(t_end=200, alpha=0.4).updater
    assert updater.drop_fraction(0) == pytest.approx(0.4)
    assert updater.drop_fraction(50) == pytest.approx(0.2 * (1 + math.sqrt(0.5)))
    assert updater.drop_fraction(100) == pytest.approx(0.2)
    assert updater.drop_fraction(200) == pytest.approx(0.0, abs=1e-12)


# ---- checkpointing ---------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    run = Run(gamma_sal=0.6)
    for _ in range(23):
        run.train_step()
    state = copy.deepcopy(run.updater.state_dict())

    resumed = Run(gamma_sal=0.6, generator=torch.Generator().manual_seed(99))  # other initial masks
    resumed.model.load_state_dict(run.model.state_dict())
    resumed.optimizer.load_state_dict(copy.deepcopy(run.optimizer.state_dict()))  # else the buffers are shared
    resumed.data.set_state(run.data.get_state())
    with torch.no_grad():
        for name, layer in resumed.updater.layers.items():
            layer.weight.masked_fill_(~state["layers"][name]["mask"], 1.0)  # junk: loading re-applies the masks
    resumed.updater.load_state_dict(state)
    assert resumed.updater.steps_taken == 23
    for name, layer in resumed.updater.layers.items():
        original = run.updater.layers[name]
        assert torch.equal(layer.mask, original.mask)
        assert layer.fan_in == original.fan_in and layer.budget == original.budget
        assert torch.equal(layer.ablated_neurons, original.ablated_neurons)
        assert torch.equal(layer.weight, original.weight)

    for _ in range(12):  # two more updates
        run.train_step()
        resumed.train_step()
    for name, mask in run.masks().items():
        assert torch.equal(mask, resumed.masks()[name])


def test_load_state_dict_rejects_another_models_state():
    state = Run("mlp").updater.state_dict()
    with pytest.raises(ValueError, match="layers"):
        Run("cnn").updater.load_state_dict(state)


# ---- the reference (per-layer) drop rule and grouped masks -------------------------------------------


def expected_layer_rule(old: Tensor, weight: Tensor, grad: Tensor, group_size: int, drop_fraction: float) -> Tensor:
    """The per-layer rule without ablation, written group by group: the layer's
    ``int(drop_fraction * n)`` active (group, column) pairs with the smallest L2 norm of
    the group's weights go; each group grows as many at the largest summed |grad| among
    the columns it did not hold."""
    rows, in_features = old.shape
    starts = list(range(0, rows, group_size))
    group_mask = old[starts]
    drop_score = torch.stack([weight[s : s + group_size].double().pow(2).sum(0).sqrt() for s in starts])
    grow_score = torch.stack([grad[s : s + group_size].double().abs().sum(0) for s in starts])
    active = group_mask.nonzero().tolist()
    drops = int(len(active) * drop_fraction)
    dropped = sorted(active, key=lambda gc: float(drop_score[gc[0], gc[1]]))[:drops]
    new_group_mask = group_mask.clone()
    for group, column in dropped:
        new_group_mask[group, column] = False
    for group in range(len(starts)):
        regrow = int(group_mask[group].sum() - new_group_mask[group].sum())
        candidates = (~group_mask[group]).nonzero().flatten().tolist()
        for column in sorted(candidates, key=lambda c: -float(grow_score[group, c]))[:regrow]:
            new_group_mask[group, column] = True
    return new_group_mask.repeat_interleave(group_size, dim=0)[:rows]


@pytest.mark.parametrize("group_size", [1, 3, 8])
@pytest.mark.parametrize("model_kind", MODELS)
def test_the_layer_rule_drops_the_layers_weakest_columns_and_regrows_every_group_to_its_fan_in(model_kind, group_size):
    # Density 0.3 (<= 0.5): every group can regrow its drops at columns it did not
    # hold, so exactly int(drop_fraction * n) pairs change. No ablation.
    run = Run(model_kind, gamma_sal=0.0, alpha=0.5, t_end=40, delta_t=5, density_method="uniform", group_size=group_size)
    changes = 0
    for _ in range(4):  # updates at steps 5, 10, 15, 20
        masks, weights, grads = run_to_update_step(run)
        drop_fraction = run.updater.drop_fraction(run.updater.steps_taken + 1)
        assert run.updater.step()
        for name, layer in run.updater.layers.items():
            old, new = masks[name].flatten(1), layer.mask.flatten(1)
            group_starts = old[::group_size]
            pairs = int(group_starts.sum())
            dropped, grown = (old & ~new)[::group_size], (new & ~old)[::group_size]
            # Exactly int(n * drop_fraction) pairs dropped, as many regrown, none of them
            # at a column the group held before (no weight dropped and regrown at once).
            assert int(dropped.sum()) == int(grown.sum()) == int(pairs * drop_fraction), name
            assert new.sum(dim=1).tolist() == [layer.fan_in] * old.shape[0], name
            expected = expected_layer_rule(old, weights[name].flatten(1), grads[name].flatten(1), group_size, drop_fraction)
            assert torch.equal(new, expected), name
            changes += int(dropped.sum())
        run.optimizer.step()
    assert changes > 0


def test_a_group_size_dict_of_ones_is_group_size_1():
    # (That group_size=1 is the per-row rule is checked against expected_layer_rule
    # above and by the neuron-rule test; this one checks the dict form.)
    first, second = Run(gamma_sal=0.5), Run(gamma_sal=0.5, group_size={"0": 1, "2": 1})
    for _ in range(40):
        first.train_step()
        second.train_step()
    assert any(layer.ablated_neurons.any() for layer in first.updater.layers.values())
    for name, mask in first.masks().items():
        assert torch.equal(mask, second.masks()[name])
        assert torch.equal(first.updater.layers[name].ablated_neurons, second.updater.layers[name].ablated_neurons)


def test_a_group_size_dict_groups_only_the_named_layers():
    run = Run(group_size={"2": 4})
    assert [layer.group_size for layer in run.updater.layers.values()] == [1, 4, 1]
    rows = run.updater.layers["0"].mask
    assert len({tuple(row.nonzero().flatten().tolist()) for row in rows}) > 1  # per-row masks
    for _ in range(30):
        run.train_step()
    check_layer_invariants(run.updater)


@pytest.mark.parametrize("gamma_sal,ablated", [(0.1, False), (0.3, False), (0.4, True)])
def test_a_group_with_too_few_salient_weights_is_ablated_whole(gamma_sal, ablated):
    # One layer, 8 neurons x 10 inputs in groups of 2, fan-in 5 (uniform 50%), drop
    # fraction ~0.4: int(0.4 * 40) = 15 weights dropped, so unstructured RigL keeps
    # the top 25 |w| (all in rows 2-7) and grows the top 15 |grad| among 40 inactive.
    # Row 0 has 2 large inactive gradients, row 1 (same group) nothing: the group holds
    # 2 salient weights, below 2 rows * max(1, int(gamma_sal * 5)) = 4 at 0.4, not
    # below 2 at 0.3 or 0.1.
    # Rows 2-7 each hold >= 4 of their own 5 weights: >= 0.8 per group.
    model = nn.Sequential(nn.Linear(10, 8))
    updater = SRigL(
        model, 0.5, t_end=100, delta_t=1, alpha=0.4, gamma_sal=gamma_sal, density_method="uniform",
        ablation_exempt=(), generator=torch.Generator().manual_seed(0), group_size=2,
    )
    layer = updater.layers["0"]
    assert layer.fan_in == 5
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(8, 10, generator=g) + 2
    grad = torch.rand(8, 10, generator=g) + 1
    weight[:2], grad[:2] = 1e-3, 1e-3
    grad[0, (~layer.mask[0]).nonzero().flatten()[:2]] = 5.0
    for row in range(2, 8):
        weight[row, layer.mask[row].nonzero().flatten()[0]] = 1.0
    with torch.no_grad():
        model[0].weight.copy_(weight)
    model[0].weight.grad = grad
    updater.apply_masks()
    assert updater.step()
    if ablated:
        # The 40-weight budget over 6 rows: 40 // 6 = 6 (36 <= 40; rounding would give 7, 42 > 40).
        assert layer.ablated_neurons.tolist() == [True, True] + [False] * 6
        assert layer.fan_in == 6
        assert layer.mask.sum(dim=1).tolist() == [0, 0] + [6] * 6
        assert bool((model[0].weight[:2] == 0).all())
    else:
        assert not layer.ablated_neurons.any()
        assert layer.mask.sum(dim=1).tolist() == [5] * 8
    check_layer_invariants(updater)


@pytest.mark.parametrize("group_size", [1, 2, 5])
def test_the_fan_in_after_ablation_never_exceeds_the_budget(group_size):
    # Heavy ablation on a layer whose row count is not a multiple of most group sizes.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 37), nn.ReLU(), nn.Linear(37, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    updater = SRigL(model, 0.7, t_end=1000, delta_t=1, alpha=0.5, gamma_sal=0.9, density_method="uniform",
                    optimizer=optimizer, group_size=group_size)
    layer = updater.layers["0"]
    data = torch.Generator().manual_seed(1)
    fan_ins = {layer.fan_in}
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(8, 16, generator=data)), torch.randint(0, CLASSES, (8,), generator=data)).backward()
        updater.step()
        optimizer.step()
        assert int(layer.mask.sum()) <= layer.budget
        fan_ins.add(layer.fan_in)
        check_layer_invariants(updater)
    assert layer.ablated_neurons.any() and len(fan_ins) > 1, "no ablation: the test would prove nothing"


def test_state_dict_carries_the_group_size():
    run = Run(group_size=4, gamma_sal=0.6)
    for _ in range(12):
        run.train_step()
    state = run.updater.state_dict()
    assert {saved["group_size"] for saved in state["layers"].values()} == {4}
    resumed = Run(group_size=4, gamma_sal=0.6)
    resumed.updater.load_state_dict(copy.deepcopy(state))
    for name, mask in run.masks().items():
        assert torch.equal(resumed.masks()[name], mask)
    with pytest.raises(ValueError, match="group_size"):
        Run(group_size=2).updater.load_state_dict(copy.deepcopy(state))


def test_the_ablation_threshold_is_fixed_by_the_initial_fan_in():
    # 6 neurons x 20 inputs at 50%: initial fan-in 10, budget 60. Neuron 0 was ablated,
    # so the fan-in rose to 60 // 5 = 12. Neuron 1 holds 7 salient weights: at or above
    # max(1, int(0.6 * 10)) = 6, so it stays, though 7 is below 0.6 of the current 12
    # (a threshold on the current fan-in would ablate it, and ablation would feed on itself).
    model = nn.Sequential(nn.Linear(20, 6))
    updater = SRigL(model, 0.5, t_end=100, delta_t=1, alpha=0.4, gamma_sal=0.6, density_method="uniform",
                    ablation_exempt=(), generator=torch.Generator().manual_seed(0))
    layer = updater.layers["0"]
    assert layer.initial_fan_in == 10 and layer.budget == 60
    mask = torch.zeros(6, 20, dtype=torch.bool)
    mask[1:, :12] = True
    layer.mask, layer.fan_in = mask, 12
    layer.ablated_neurons = torch.tensor([True] + [False] * 5)
    magnitude = torch.where(mask, 2.0, 0.0)
    magnitude[1, 7:12] = 1e-3  # neuron 1: 7 large weights, 5 tiny
    grad = torch.zeros(6, 20)
    grad[2, 12:17] = 1.0  # the layer's top 5 |grad| all lie in neuron 2
    # 5 drops: the top 55 |w| stay (neuron 1's tiny five go), and the top 5 |grad| count.
    assert not updater._groups_to_ablate(layer, mask, magnitude, grad, weight_drops=5).any()
    updater.gamma_sal = 0.8  # int(0.8 * 10) = 8 > 7: now neuron 1 goes
    assert updater._groups_to_ablate(layer, mask, magnitude, grad, weight_drops=5).tolist() == [False, True] + [False] * 4


def test_the_threshold_drops_to_keep_the_rows_the_budget_needs():
    # The reference rule: the live neuron ranked budget // in_features (0-based, most
    # salient first) bounds the threshold, so it and every neuron above it stay.
    model = nn.Sequential(nn.Linear(20, 6))
    updater = SRigL(model, 0.5, t_end=100, delta_t=1, alpha=0.4, gamma_sal=1.0, density_method="uniform",
                    ablation_exempt=(), generator=torch.Generator().manual_seed(0))
    layer = updater.layers["0"]
    mask = torch.zeros(6, 20, dtype=torch.bool)
    mask[:, :10] = True
    layer.mask = mask
    magnitude = torch.where(mask, 2.0, 0.0)
    for neuron, tiny in enumerate([0, 1, 2, 3, 3, 4]):  # salient counts 10, 9, 8, 7, 7, 6
        magnitude[neuron, 10 - tiny:10] = 1e-3
    grad = torch.zeros(6, 20)
    # 13 drops leave the 47 large |w|; the top 13 |grad| land on active weights, so add none.
    grad[0, :10] = grad[1, :3] = 1.0
    # Threshold 10 would ablate five; 60 // 20 = 3 bounds it by the count of the neuron
    # ranked 3 (7, tied): the two 7s and everything above stay.
    assert updater._groups_to_ablate(layer, mask, magnitude, grad, weight_drops=13).tolist() == [False] * 5 + [True]
    updater.gamma_sal = 0.75  # threshold int(0.75 * 10) = 7 binds first: the same one goes
    assert updater._groups_to_ablate(layer, mask, magnitude, grad, weight_drops=13).tolist() == [False] * 5 + [True]
    updater.gamma_sal = 0.65  # threshold 6: nothing below it
    assert not updater._groups_to_ablate(layer, mask, magnitude, grad, weight_drops=13).any()


@pytest.mark.parametrize("seed", range(6))
def test_top_k_selections_match_a_stable_sort_ties_included(seed):
    """The threshold selections (no full sort) keep exactly what a stable descending
    sort keeps: ties go to the lower index. Few distinct values, so ties are everywhere."""
    from condensed_ops.srigl import _top_overall, _top_per_row

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (9, 13), generator=g).double()
    scores[0] = -math.inf  # a row with nothing to choose from
    among = torch.rand(9, 13, generator=g) < 0.6
    counts = torch.randint(0, 14, (9,), generator=g)

    def by_sort(flat_scores, count):
        order = torch.sort(flat_scores, descending=True, stable=True).indices[:count]
        return torch.zeros(flat_scores.shape, dtype=torch.bool).scatter_(0, order, True)

    finite = torch.where(torch.isinf(scores), 1.0, scores)  # scores are |w| or |grad|: -inf only marks the left out
    for count in (0, 1, 7, 40, int(among.sum()), 200):
        masked = torch.where(among, finite, -math.inf).flatten()
        assert torch.equal(_top_overall(finite, count, among=among).flatten(), by_sort(masked, count) & among.flatten())
        assert torch.equal(_top_overall(scores, count).flatten(), by_sort(scores.flatten(), count))
    expected = torch.stack([by_sort(row, int(c)) for row, c in zip(scores, counts)])
    assert torch.equal(_top_per_row(scores, counts), expected)
    assert torch.equal(_top_per_row(scores, 5), torch.stack([by_sort(row, 5) for row in scores]))
