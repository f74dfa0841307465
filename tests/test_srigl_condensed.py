"""SRigL over condensed layers (sparse-to-sparse training).

Every check trains a condensed model next to its masked-dense twin (the same
initial masks and weights, the same batches) and compares what the masked-dense
updater did, which test_srigl.py checks against the SRigL rules."""

import copy
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from condensed_ops import CondensedConv2d, CondensedLinear, condense
from condensed_ops.srigl import SRigL, initial_masks

CLASSES = 5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny layers (conftest restores the count)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, CLASSES),
    )


MODELS = {"mlp": (make_mlp, (20,)), "cnn": (make_cnn, (3, 8, 8))}
OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}
SRIGL = dict(t_end=150, delta_t=5, alpha=0.3, gamma_sal=0.5)


class Twins:
    """A masked-dense model and its condensed copy, trained side by side."""

    def __init__(self, model_kind="mlp", optimizer_kind="adamw", group_size=1, seed=0, **srigl_kwargs):
        make_model, self.input_shape = MODELS[model_kind]
        torch.manual_seed(seed)
        self.dense = make_model()
        kwargs = {**SRIGL, **srigl_kwargs}
        # Groups only where they divide the rows (condense stores the rest per row).
        sizes = {name: group_size for name, m in self.dense.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] % group_size == 0}
        self.condensed = condensed_copy(self.dense, 0.8, sizes, seed)
        self.dense_optimizer = OPTIMIZERS[optimizer_kind](self.dense.parameters())
        self.dense_updater = SRigL(self.dense, 0.8, optimizer=self.dense_optimizer, group_size=sizes,
                                   generator=torch.Generator().manual_seed(seed), **kwargs)
        self.condensed_optimizer = OPTIMIZERS[optimizer_kind](self.condensed.parameters())
        self.condensed_updater = SRigL(self.condensed, 0.8, optimizer=self.condensed_optimizer, **kwargs)
        self.data = torch.Generator().manual_seed(seed + 1000)

    def step(self) -> bool:
        x = torch.randn(12, *self.input_shape, generator=self.data)
        y = torch.randint(0, CLASSES, (12,), generator=self.data)
        updated = []
        for model, optimizer, updater in (
            (self.dense, self.dense_optimizer, self.dense_updater),
            (self.condensed, self.condensed_optimizer, self.condensed_updater),
        ):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            updated.append(updater.step())
            optimizer.step()
        assert updated[0] == updated[1]
        return updated[0]


def condensed_copy(dense: nn.Module, sparsity: float, group_size, seed: int) -> nn.Module:
    """``dense`` with SRigL's initial masks (the same draw as a masked-dense SRigL with
    this seed), condensed."""
    model = copy.deepcopy(dense)
    masks = initial_masks(model, sparsity, group_size=group_size, generator=torch.Generator().manual_seed(seed))
    report = condense(model, masks=masks, min_weights=0, max_density=1.0, group_size=group_size)
    assert not report.skipped
    return model


def layer_pairs(twins: Twins) -> List[Tuple[str, nn.Module, nn.Module]]:
    return [(name, twins.dense.get_submodule(name), twins.condensed.get_submodule(name)) for name in twins.dense_updater.layers]


def scattered(module, tensor: Tensor) -> Tensor:
    """A tensor in ``values``' layout (a moment, a gradient) scattered into the dense rows."""
    rows = torch.zeros(module.out_features, module.in_features, dtype=tensor.dtype)
    stored_rows, columns = module.stored_positions()
    rows[stored_rows.expand_as(columns), columns] = tensor.reshape(columns.shape)
    return rows


def assert_same_state(twins: Twins, step: int) -> None:
    for name, dense, condensed in layer_pairs(twins):
        dense_layer, condensed_layer = twins.dense_updater.layers[name], twins.condensed_updater.layers[name]
        where = f"{name!r} after step {step}"
        assert torch.equal(dense_layer.mask.flatten(1), condensed_layer.mask), f"masks differ at {where}"
        assert torch.equal(dense_layer.ablated_neurons, condensed_layer.ablated_neurons), where
        assert dense_layer.fan_in == condensed_layer.fan_in == condensed.fan_in, where
        assert condensed.active_neurons == int((~condensed_layer.ablated_neurons).sum()), where
        torch.testing.assert_close(condensed.to_dense(), dense.weight.detach(), atol=2e-5, rtol=1e-4, msg=lambda m: f"{where}: {m}")
        # Optimizer state follows each weight.
        dense_state = twins.dense_optimizer.state[dense.weight]
        condensed_state = twins.condensed_optimizer.state[condensed.values]
        for key, value in dense_state.items():
            if isinstance(value, Tensor) and value.shape == dense.weight.shape:
                assert condensed_state[key].shape == condensed.values.shape, where
                torch.testing.assert_close(scattered(condensed, condensed_state[key]), value.flatten(1), atol=2e-5, rtol=1e-3, msg=f"{key} at {where}")


def _side_by_side_cases():
    # The quick tier keeps two that between them cover every value.
    quick = {("mlp", 1, "sgd_momentum"), ("cnn", 4, "adamw")}
    for model_kind in ("mlp", "cnn"):
        for group_size in (1, 4):
            for optimizer_kind in ("sgd_momentum", "adamw"):
                case = (model_kind, group_size, optimizer_kind)
                yield case if case in quick else pytest.param(*case, marks=pytest.mark.slow(reason="one more combination"))


@pytest.mark.parametrize("model_kind, group_size, optimizer_kind", list(_side_by_side_cases()))
def test_condensed_training_takes_the_masked_dense_decisions(model_kind, group_size, optimizer_kind):
    # a higher threshold where whole groups of 4 channels must go (so some do)
    twins = Twins(model_kind, optimizer_kind, group_size, gamma_sal=0.8 if group_size > 1 else 0.5)
    assert all(layer.is_condensed for layer in twins.condensed_updater.layers.values())
    updates, reshaped = 0, 0
    for step in range(1, 181):
        shapes = [tuple(m.values.shape) for _, _, m in layer_pairs(twins)]
        if twins.step():
            updates += 1
            reshaped += shapes != [tuple(m.values.shape) for _, _, m in layer_pairs(twins)]
            assert_same_state(twins, step)
    # Compared at update steps only: float sums in another order can flip a ReLU at its
    # kink, and from there the weights drift apart (seen after t_end, where no update
    # re-checks them; the masks cannot change any more).
    assert updates == 29
    assert reshaped > 0, "no update ablated a neuron: the test would not see parameters change shape"
    # values stay the optimizer's parameters through every change of shape
    params = {id(p) for group in twins.condensed_optimizer.param_groups for p in group["params"]}
    assert all(id(m.values) in params for _, _, m in layer_pairs(twins))


def test_a_layer_saves_its_input_and_gradient_only_on_update_steps():
    twins = Twins("mlp", delta_t=3)
    updater = twins.condensed_updater
    calls: Dict[int, int] = {}
    original = updater._dense_gradient

    def counting(name, layer):
        calls[updater.steps_taken] = calls.get(updater.steps_taken, 0) + len(updater._taps[name])
        return original(name, layer)

    updater._dense_gradient = counting
    model, optimizer = twins.condensed, twins.condensed_optimizer
    for step in range(1, 8):
        x = torch.randn(6, 20)
        loss = F.cross_entropy(model(x), torch.zeros(6, dtype=torch.long))
        saved = sum(len(records) for records in updater._taps.values())
        assert saved == (3 if step % 3 == 0 else 0), f"step {step} saved {saved} calls"
        optimizer.zero_grad()
        loss.backward()
        updater.step()
        optimizer.step()
        assert all(not records for records in updater._taps.values()), "saved tensors outlive the step"
    assert calls == {3: 3, 6: 3}
    with torch.no_grad():  # inference of an update step saves nothing
        model(torch.randn(2, 20))
    model.eval()
    model(torch.randn(2, 20))
    assert all(not records for records in updater._taps.values())


def test_every_cached_layout_follows_a_rewired_layer():
    """Batch-1 inference runs from the cached window layout; after each rewiring it must
    compute the new layer, checked against float64."""
    twins = Twins("mlp")
    layer = twins.condensed.get_submodule("0")
    x = torch.randn(1, 20)
    checked = 0
    for _ in range(40):
        with torch.no_grad():
            layer(x)  # builds (or reuses) the cached layouts
        if twins.step():
            with torch.no_grad():
                expected = F.linear(x.double(), layer.to_dense().double(), layer.bias.double())
                torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=1e-5)
                expected = F.linear(x.repeat(64, 1).double(), layer.to_dense().double(), layer.bias.double())
                torch.testing.assert_close(layer(x.repeat(64, 1)).double(), expected, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked == 8


def test_a_checkpoint_mid_training_resumes_to_the_same_result():
    def fresh() -> Tuple[nn.Module, torch.optim.Optimizer, SRigL]:
        torch.manual_seed(0)
        model = condensed_copy(make_mlp(), 0.8, 1, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, SRigL(model, 0.8, optimizer=optimizer, **SRIGL)

    def train(model, optimizer, updater, steps, seed):
        data = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x, y = torch.randn(12, 20, generator=data), torch.randint(0, CLASSES, (12,), generator=data)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            updater.step()
            optimizer.step()

    model, optimizer, updater = fresh()
    train(model, optimizer, updater, 60, seed=1)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "srigl": updater.state_dict()})
    train(model, optimizer, updater, 60, seed=2)
    assert model.get_submodule("0").active_neurons < 48, "no ablation before the checkpoint: resume would not resize"

    resumed, resumed_optimizer, resumed_updater = fresh()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_updater.load_state_dict(checkpoint["srigl"])
    train(resumed, resumed_optimizer, resumed_updater, 60, seed=2)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for name, layer in updater.layers.items():
        assert torch.equal(resumed_updater.layers[name].mask, layer.mask), name


def test_relayout_keeps_the_parameter_and_reports_where_each_weight_came_from():
    torch.manual_seed(3)
    weight = torch.randn(8, 10)
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[:, :4] = True
    layer = CondensedLinear.from_dense(weight * mask, torch.randn(8), mask)
    values = layer.values
    new_mask = torch.zeros_like(mask)
    new_mask[1::2, 2:8] = True  # rows 0, 2, 4, 6 ablated; fan-in 4 -> 6
    rows = torch.where(new_mask, weight, torch.zeros(()))
    sources = layer.relayout(rows, new_mask)
    assert layer.values is values and values.shape == (4, 6) and layer.fan_in == 6
    assert layer.active_rows.tolist() == [1, 3, 5, 7]
    torch.testing.assert_close(layer.to_dense(), rows)
    # columns 2 and 3 were stored before (positions row*4 + 2, + 3); 4..7 are new
    expected = torch.tensor([[r * 4 + 2, r * 4 + 3, -1, -1, -1, -1] for r in (1, 3, 5, 7)])
    assert torch.equal(sources, expected)
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(layer.double()(x), F.linear(x, rows.double(), layer.bias.detach().double()))
    with pytest.raises(ValueError, match="constant fan-in"):
        uneven = new_mask.clone()
        uneven[1, 9] = True
        layer.relayout(rows, uneven)


def test_a_condensed_attention_trains_as_separate_projection_layers():
    """condense splits an attention's in_proj_weight into q/k/v CondensedLinear layers;
    SRigL drives each one (its own budget), and every layout stays what its mask says."""
    from condensed_ops.srigl import _stored_rows_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True))
    masks = initial_masks(model, 0.8, generator=torch.Generator().manual_seed(0))
    condense(model, masks=masks, min_weights=0, max_density=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updater = SRigL(model, 0.8, optimizer=optimizer, t_end=100, delta_t=5, gamma_sal=0.5)
    assert sorted(updater.layers) == sorted(
        f"0.{name}" for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"))
    start = {name: layer.mask.clone() for name, layer in updater.layers.items()}
    for _ in range(40):
        loss = model(torch.randn(4, 7, 32)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        updater.step()
        optimizer.step()
    for name, layer in updater.layers.items():
        module = model.get_submodule(name)
        assert not torch.equal(layer.mask, start[name]), f"{name} never rewired"
        assert torch.equal(_stored_rows_mask(module), layer.mask), name
        rows = layer.mask.sum(dim=1)
        assert set(rows[~layer.ablated_neurons].tolist()) == {module.fan_in}, name
        assert int(rows[layer.ablated_neurons].sum()) == 0, name
