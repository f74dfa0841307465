"""Two gloo processes train condensed models under DistributedDataParallel.

    python tests/ddp_worker.py OUT_DIR

Each rank starts from its own random initialisation (different values and
indices: DDP's broadcast must make them equal), trains on its own data, and
writes its final state to OUT_DIR/rank{r}.pt: a condensed MLP, a dense MLP
trained with SRigL (its masks included), and a condensed MLP trained with SRigL
sparse-to-sparse. The test compares the ranks.
"""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import condensed_ops
from condensed_ops.srigl import SRigL, initial_masks

WORLD = 2


def _condensed_mlp() -> nn.Module:
    # Built directly: random static-sparse layers, different on every rank.
    return nn.Sequential(
        condensed_ops.CondensedLinear(16, 64, 6, active_neurons=60), nn.ReLU(), condensed_ops.CondensedLinear(64, 4, 12)
    )


def _train(model: nn.Module, rank: int, steps: int, updater_for=None) -> None:
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    updater = updater_for(model, optimizer) if updater_for else None
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        if updater is not None:
            updater.step()
        optimizer.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)
    condensed = _condensed_mlp()
    _train(condensed, rank, steps=6)

    torch.manual_seed(10 + rank)
    dense = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def srigl(model, optimizer):
        return SRigL(model, sparsity=0.8, t_end=8, delta_t=2, optimizer=optimizer, generator=torch.Generator().manual_seed(0))

    # SRigL masks the dense model before DDP sees it: wrap after the masks exist.
    holder = {}

    def updater_for(model, optimizer):
        holder["updater"] = srigl(model, optimizer)
        return holder["updater"]

    _train_srigl(dense, rank, updater_for)
    masks = {name: layer.mask.clone() for name, layer in holder["updater"].layers.items()}

    sparse_to_sparse, resized = _train_condensed_srigl(rank)

    try:  # condensing inside DDP would leave the new parameters unsynchronised
        condensed_ops.condense(DistributedDataParallel(nn.Sequential(nn.Linear(16, 16))), min_weights=0)
        refused = ""
    except ValueError as error:
        refused = str(error)

    # FSDP2: every rank starts from the same weights (fully_shard does not broadcast).
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    sharded = _condensed_mlp()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer)
    fully_shard(sharded)
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)  # one batch: the loss must fall
    fsdp_losses = []
    for _ in range(6):
        loss = F.cross_entropy(sharded(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        fsdp_losses.append(loss.item())
    fsdp_state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.state_dict().items()}
    torch.save(
        {"condensed": condensed.state_dict(), "dense": dense.state_dict(), "masks": masks, "refused": refused,
         "fsdp": fsdp_state, "fsdp_losses": fsdp_losses,
         "sparse_to_sparse": sparse_to_sparse, "resized": resized},
        f"{out_dir}/rank{rank}.pt",
    )
    dist.barrier()  # no rank tears down gloo while the other still communicates
    dist.destroy_process_group()


def _train_srigl(model: nn.Module, rank: int, updater_for) -> None:
    # DDP broadcasts rank 0's weights at construction; SRigL then masks the same weights on every rank.
    _train(model, rank, steps=10, updater_for=updater_for)


def _train_condensed_srigl(rank: int):
    """SRigL over condensed layers: each rank starts from its own weights (DDP
    broadcasts rank 0's), the same initial masks, and its own data. DDP is rebuilt
    after a step that resized values (it sizes its buckets once)."""
    torch.manual_seed(20 + rank)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4))
    masks = initial_masks(model, 0.8, generator=torch.Generator().manual_seed(0))
    condensed_ops.condense(model, masks=masks, min_weights=0, max_density=1.0)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    updater = SRigL(model, 0.8, t_end=40, delta_t=4, gamma_sal=0.5, optimizer=optimizer)
    g = torch.Generator().manual_seed(200 + rank)
    resized = 0
    for _ in range(40):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        updater.step()
        optimizer.step()
        if updater.layout_changed:
            resized += 1
            ddp = DistributedDataParallel(model)
    state = dict(model.state_dict())
    state.update({f"mask.{name}": layer.mask for name, layer in updater.layers.items()})
    return state, resized


def main() -> None:
    out_dir = sys.argv[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(port, out_dir), nprocs=WORLD, join=True)
    print("DDP OK")


if __name__ == "__main__":
    main()
