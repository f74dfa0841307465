"""Train an MLP on scikit-learn's handwritten digits three times -- dense, with SRigL
at 90% sparsity on masked dense layers, and with SRigL on condensed layers from the
first step (sparse-to-sparse) --, condense the masked one, deploy the condensed one
through a checkpoint, and compare accuracy, training time and inference time.

    python examples/srigl_digits.py [--epochs N] [--threads N]

The digits (1797 8x8 images) ship with scikit-learn: nothing is downloaded. Exits
non-zero when SRigL's test accuracy is more than 2 points below the dense model's,
when the condensed model does not predict what the masked dense model does, when
sparse-to-sparse training strays from the masked run (accuracy more than 1 point
apart, or final masks agreeing on under 80% of the kept weights), or when the
reloaded checkpoint predicts otherwise.
"""

import argparse
import copy
import io
import math
import statistics
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import condensed_ops
from condensed_ops.srigl import SRigL, initial_masks

SEED = 0
SPARSITY = 0.9
EPOCHS = 60
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.01
LABEL_SMOOTHING = 0.1
TEST_FRACTION = 0.2
MAX_ACCURACY_GAP = 2.0  # percentage points
TIMING_BATCH_SIZES = (1, 32, 256)
HIDDEN = 512  # the hidden layer (512 x 512) is large enough to gain at batch 1

Split = Tuple[Tensor, Tensor]


def load_splits() -> Tuple[Split, Split]:
    """(train, test) as (x [n, 64] in [0, 1], labels [n]), split by a seeded permutation."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16  # pixels are 0..16
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    test_size = round(TEST_FRACTION * len(labels))
    test, train = order[:test_size], order[test_size:]
    return (x[train], labels[train]), (x[test], labels[test])


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def train(
    train_split: Split, epochs: int, sparsity: Optional[float], condensed: bool = False
) -> Tuple[nn.Module, Optional[SRigL]]:
    """AdamW with a cosine schedule on shuffled mini-batches; with ``sparsity``, SRigL
    keeps the masks (``condensed``: of condensed layers, from SRigL's initial masks, so
    the run takes the masked run's decisions). The same recipe for every run."""
    torch.manual_seed(SEED)
    model = make_mlp()
    if condensed:
        masks = initial_masks(model, sparsity, generator=torch.Generator().manual_seed(SEED))
        condensed_ops.condense(model, masks=masks, min_weights=0, max_density=1.0)  # every layer SRigL masks
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    x, labels = train_split
    steps = epochs * math.ceil(len(labels) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    updater = None
    if sparsity is not None:
        # RigL stops rewiring at 75% of training; at 45 steps an epoch, delta_t=100
        # rewires every other epoch until then.
        updater = SRigL(
            model, sparsity, t_end=int(0.75 * steps), delta_t=100, optimizer=optimizer, generator=torch.Generator().manual_seed(SEED)
        )  # (a condensed model keeps its layers' masks; the generator draws none)
    shuffle = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=shuffle).split(BATCH_SIZE):
            # Label smoothing narrows the sparse model's gap to the dense one by about a point.
            loss = F.cross_entropy(model(x[batch]), labels[batch], label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad()
            loss.backward()
            if updater is not None:
                updater.step()  # after backward, before the optimizer step (see its docstring)
            optimizer.step()
            schedule.step()
    return model.eval(), updater


@torch.inference_mode()
def accuracy(model: nn.Module, split: Split) -> float:
    x, labels = split
    return 100.0 * (model(x).argmax(dim=1) == labels).float().mean().item()


@torch.inference_mode()
def median_ms(model: Callable[[Tensor], Tensor], x: Tensor, repeats: int = 50) -> float:
    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    # These layers are small: one thread avoids waking others for microseconds of work.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_split, test_split = load_splits()
    print(f"digits: {len(train_split[1])} train, {len(test_split[1])} test; MLP 64-{HIDDEN}-{HIDDEN}-10, {args.epochs} epochs")

    seconds = {}
    for name, sparsity, condensed in (("dense", None, False), ("masked", SPARSITY, False), ("condensed", SPARSITY, True)):
        start = time.perf_counter()
        trained = train(train_split, args.epochs, sparsity, condensed)
        seconds[name] = time.perf_counter() - start
        if name == "dense":
            dense_model, _ = trained
        elif name == "masked":
            sparse_model, updater = trained
        else:
            sparse_to_sparse_model, condensed_updater = trained
    assert updater is not None and condensed_updater is not None
    dense_accuracy, sparse_accuracy = accuracy(dense_model, test_split), accuracy(sparse_model, test_split)
    sparse_to_sparse_accuracy = accuracy(sparse_to_sparse_model, test_split)
    print("training time: " + ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items()))
    print(f"test accuracy: dense {dense_accuracy:.2f}%, SRigL {100 * SPARSITY:.0f}% sparse {sparse_accuracy:.2f}%, "
          f"SRigL sparse-to-sparse {sparse_to_sparse_accuracy:.2f}%")
    # The same decisions from the same start; over thousands of steps the two runs'
    # float sums (in different orders) drift apart and a few picks at the margin differ.
    kept_alike = sum(int((updater.layers[n].mask.flatten(1) & layer.mask).sum()) for n, layer in condensed_updater.layers.items())
    kept = sum(int(layer.mask.sum()) for layer in condensed_updater.layers.values())
    print(f"sparse-to-sparse vs masked: final masks agree on {100 * kept_alike / kept:.1f}% of the kept weights")

    # Deploy: the checkpoint is the condensed model's state dict; load_condensed puts it
    # into the dense architecture.
    checkpoint = io.BytesIO()
    torch.save(sparse_to_sparse_model.state_dict(), checkpoint)
    checkpoint.seek(0)
    deployed = condensed_ops.load_condensed(make_mlp(), torch.load(checkpoint)).eval()
    with torch.inference_mode():
        reloaded_same = torch.equal(deployed(test_split[0]), sparse_to_sparse_model(test_split[0]))
    print(f"checkpoint {checkpoint.getbuffer().nbytes / 1024:.0f} KiB, reloaded model predicts the same: {reloaded_same}")

    # The SRigL masks say what is kept, even where a kept weight happens to be 0.
    masks: Dict[str, Tensor] = {name: layer.mask for name, layer in updater.layers.items()}
    updater.remove_optimizer_hook()
    masked_dense_model = copy.deepcopy(sparse_model)
    report = condensed_ops.condense(sparse_model, masks=masks)
    condensed_model = report.model
    print()
    print(report)
    print()
    print(condensed_model)

    with torch.inference_mode():
        x_test = test_split[0]
        condensed_logits, dense_logits = condensed_model(x_test), masked_dense_model(x_test)
    same_predictions = bool((condensed_logits.argmax(dim=1) == dense_logits.argmax(dim=1)).all())
    max_logit_difference = (condensed_logits - dense_logits).abs().max().item()
    print(f"\ncondensed vs masked dense model on the test split: same predictions {same_predictions}, "
          f"largest logit difference {max_logit_difference:.2e}")

    print(f"\ninference time, median of 50 ({torch.get_num_threads()} thread(s)):")
    print(f"{'batch':>6}  {'dense':>10}  {'condensed':>10}  {'speed-up':>8}")
    for batch_size in TIMING_BATCH_SIZES:
        x = x_test[:batch_size].repeat(math.ceil(batch_size / len(x_test)), 1)[:batch_size]
        dense_ms, condensed_ms = median_ms(masked_dense_model, x), median_ms(condensed_model, x)
        print(f"{batch_size:>6}  {dense_ms:>7.3f} ms  {condensed_ms:>7.3f} ms  {dense_ms / condensed_ms:>7.2f}x")

    failures = []
    if dense_accuracy - sparse_accuracy > MAX_ACCURACY_GAP:
        failures.append(f"SRigL accuracy {sparse_accuracy:.2f}% is more than {MAX_ACCURACY_GAP} points below dense {dense_accuracy:.2f}%")
    if not same_predictions:
        failures.append("the condensed model's predictions differ from the masked dense model's")
    if kept_alike < 0.8 * kept or abs(sparse_to_sparse_accuracy - sparse_accuracy) > 1.0:
        failures.append(f"sparse-to-sparse training ({sparse_to_sparse_accuracy:.2f}%) strayed from the masked run ({sparse_accuracy:.2f}%)")
    if not reloaded_same:
        failures.append("the reloaded checkpoint predicts otherwise")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
