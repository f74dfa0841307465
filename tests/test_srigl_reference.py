"""Per-row SRigL takes the reference code's decisions.

``benchmarks/reference_srigl.py`` states the rules of the paper's reference code again,
independently of the package. With its two switches for the package's deliberate
differences off (neurons revive there; a just-dropped weight may regrow there), every
update must give the same mask, fan-in, ablated set and weights, on random layer states
and along real training runs re-synchronised at every update.
"""

import importlib.util
import pathlib
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condensed_ops.srigl import SRigL

_path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "reference_srigl.py"
_spec = importlib.util.spec_from_file_location("reference_srigl", _path)
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

PACKAGE_RULES = dict(revive=False, regrow_dropped=False)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny layers (conftest restores the count)


def load_state(layer, state: "reference.ReferenceLayer") -> None:
    """Put a reference layer's state into the package's SparseLayer (and its weight)."""
    layer.mask = state.mask.view(layer.mask.shape).clone()
    live = ~state.ablated
    layer.fan_in = int(state.mask[live][0].sum()) if bool(live.any()) else 0
    layer.ablated_neurons = state.ablated.clone()
    layer.budget = state.budget
    layer.weight.data.copy_(state.weight.view(layer.weight.shape))


def state_of(layer) -> "reference.ReferenceLayer":
    return reference.ReferenceLayer(
        layer.mask.flatten(1).clone(), layer.weight.detach().flatten(1).clone(), layer.ablated_neurons.clone(),
        layer.budget, layer.ablation_allowed,
    )


def masks_may_differ(before: "reference.ReferenceLayer", after: "reference.ReferenceLayer", drop_fraction: float) -> bool:
    """Two cases where the package parts from the reference on purpose (the ablation
    still agrees):

    - the neurons ablated in this update held more (nonzero) weights than it drops: the
      reference keeps its layer-wide count, so zero-valued weights at the lowest positions
      of live neurons; the package keeps every live nonzero weight and grows the rest by
      gradient;
    - the new fan-in plus the old one exceeds the inputs (above ~50% density): without
      regrowing just-dropped weights a neuron may not reach the fan-in from the columns it
      never held, so the package keeps more of its weights (the reference variant is
      undefined there).
    """
    n_ones = int(before.mask.sum())
    n_keep = min(n_ones - int(n_ones * drop_fraction), int(torch.count_nonzero(before.weight)))
    live = ~after.ablated
    old_fan_in = int(before.mask[~before.ablated][0].sum())
    new_fan_in = after.fan_in_with(int(after.ablated.sum()))
    return n_keep > int(torch.count_nonzero(before.weight[live])) or new_fan_in + old_fan_in > before.in_features


def assert_same_update(layer, expected: "reference.ReferenceLayer", where: str, *, quirk: bool = False) -> None:
    assert torch.equal(layer.ablated_neurons, expected.ablated), f"ablated neurons differ {where}"
    if quirk:  # see masks_may_differ
        assert layer.fan_in == expected.fan_in_with(int(expected.ablated.sum())), where
        assert (layer.mask.flatten(1)[~expected.ablated].sum(dim=1) == layer.fan_in).all(), where
        return
    assert torch.equal(layer.mask.flatten(1), expected.mask), f"masks differ {where}"
    live = ~expected.ablated
    assert layer.fan_in == expected.fan_in_with(int(expected.ablated.sum())), where
    assert (expected.mask[live].sum(dim=1) == layer.fan_in).all(), where
    assert torch.equal(layer.weight.detach().flatten(1), expected.weight), f"weights differ {where}"


def random_state(out_features, in_features, density, ablated_count, generator):
    """A layer mid-training: ``ablated_count`` neurons ablated, the rest at the fan-in
    the budget gives them, random nonzero weights on the mask."""
    state = reference.initial_layer(out_features, in_features, density, generator)
    ablated = torch.zeros(out_features, dtype=torch.bool)
    ablated[torch.randperm(out_features, generator=generator)[:ablated_count]] = True
    fan_in = state.fan_in_with(ablated_count)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    for row in (~ablated).nonzero().flatten().tolist():
        mask[row, torch.randperm(in_features, generator=generator)[:fan_in]] = True
    weight = (torch.rand(out_features, in_features, generator=generator) + 0.01) * mask
    return reference.ReferenceLayer(mask, weight, ablated, state.budget)


def test_random_layer_states_give_the_reference_decisions():
    generator = torch.Generator().manual_seed(0)
    cases, ablating, bounded, quirks = 0, 0, 0, 0
    for out_features, in_features, density in [(24, 40, 0.2), (37, 16, 0.3), (64, 33, 0.1), (9, 50, 0.3), (48, 24, 0.25), (30, 60, 0.15)]:
        for ablated_count in (0, out_features // 4):
            for gamma_sal in (0.0, 0.3, 0.7, 1.0):
                for drop_fraction in (0.1, 0.2, 0.3):
                    state = random_state(out_features, in_features, density, ablated_count, generator)
                    if cases % 2:  # weights at exactly 0 (grown where no gradient reached): always dropped
                        active = state.mask.flatten().nonzero().flatten()
                        state.weight.view(-1)[active[torch.randperm(len(active), generator=generator)[: len(active) // 5]]] = 0
                    # Weak gradients on some neurons, so whole neurons lose their salience
                    # (on most of them at gamma 1, so the budget's bound on ablation binds).
                    grad = torch.randn(out_features, in_features, generator=generator)
                    weak_share = 0.9 if gamma_sal == 1.0 else 0.1
                    grad *= (torch.rand(out_features, 1, generator=generator) >= weak_share) + 1e-3
                    model = nn.Sequential(nn.Linear(in_features, out_features))
                    updater = SRigL(model, 1 - density, t_end=100, gamma_sal=gamma_sal, ablation_exempt=(),
                                    density_method="uniform", generator=torch.Generator().manual_seed(1))
                    layer = updater.layers["0"]
                    load_state(layer, state)
                    expected = reference.update(state, grad, drop_fraction, gamma_sal, **PACKAGE_RULES)
                    with torch.no_grad():  # as SRigL.step runs it
                        updater._rewire(layer, grad, drop_fraction)
                    where = f"({out_features}x{in_features}, {density}, ablated {ablated_count}, gamma {gamma_sal}, drop {drop_fraction})"
                    quirk = masks_may_differ(state, expected, drop_fraction)
                    assert_same_update(layer, expected, where, quirk=quirk)
                    cases += 1
                    quirks += quirk
                    newly = int(expected.ablated.sum()) - ablated_count
                    ablating += newly > 0
                    bounded += newly > 0 and int((~expected.ablated).sum()) == state.budget // in_features + 1
    # The cases must reach the rules that differ between versions of SRigL.
    assert cases == 144 and ablating - quirks >= 10 and bounded >= 1, (ablating, quirks, bounded)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 10),
    )


@pytest.mark.parametrize("model_kind", ["mlp", "cnn"])
def test_a_training_run_takes_the_reference_decisions_at_every_update(model_kind):
    torch.manual_seed(0)
    model, input_shape = (make_mlp(), (20,)) if model_kind == "mlp" else (make_cnn(), (3, 8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    gamma_sal = 0.6
    updater = SRigL(model, 0.8, t_end=300, delta_t=10, gamma_sal=gamma_sal, optimizer=optimizer,
                    generator=torch.Generator().manual_seed(0))
    # Start from the reference's own initial masks: fan-in budget // out (floor), and a
    # budget that is not a multiple of the rows (so the fan-in after ablation differs from
    # out * fan_in // live).
    generator = torch.Generator().manual_seed(2)
    for layer in updater.layers.values():
        out_features, in_features = layer.mask.shape[0], layer.in_features
        start = reference.initial_layer(out_features, in_features, (layer.fan_in + 0.5) / in_features, generator)
        start.weight = start.weight / in_features**0.5
        load_state(layer, start)

    compared: List[str] = []
    rewire = updater._rewire

    def checked_rewire(layer, grad, drop_fraction):
        name = next(n for n, candidate in updater.layers.items() if candidate is layer)
        before = state_of(layer)
        expected = reference.update(before, grad.flatten(1), drop_fraction, gamma_sal, **PACKAGE_RULES)
        rewire(layer, grad, drop_fraction)
        quirk = masks_may_differ(before, expected, drop_fraction)
        assert_same_update(layer, expected, f"at layer {name!r}, step {updater.steps_taken}", quirk=quirk)
        compared.append(name if not quirk else "quirk")

    updater._rewire = checked_rewire
    data = torch.Generator().manual_seed(3)
    for _ in range(300):
        x = torch.randn(32, *input_shape, generator=data)
        y = torch.randint(0, 10, (32,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        updater.step()
        optimizer.step()
    assert len(compared) == 29 * len(updater.layers)
    assert compared.count("quirk") <= 2, compared  # the first updates may ablate many at once
    ablated = sum(int(layer.ablated_neurons.sum()) for layer in updater.layers.values())
    assert ablated > 0, "no neuron was ablated: the run would not reach the ablation rules"
