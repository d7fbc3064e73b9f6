"""Pure bfloat16 training under FSDP2 with stochastic rounding: torchrun --standalone --nproc-per-node 2 THIS.

Every rank holds a Shard(0) slice of each parameter and of its momentum buffer, in bfloat16; torchsgd.SGD
rounds each update stochastically, with noise keyed by the element's index in the whole parameter, so the
run rounds as one process would (docs/distributed.md). Runs on CPU with gloo; on GPUs use nccl and cuda.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import torchsgd


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and data on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    ).to(torch.bfloat16)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    # The same seed on every rank: the noise is the seed's.
    optimizer = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, stochastic_rounding=True, seed=1234)

    x = torch.randn(512, 16)
    y = (x[:, :1] * x[:, 1:2]).tanh()  # a smooth target the network can fit
    shard = slice(rank * len(x) // dist.get_world_size(), (rank + 1) * len(x) // dist.get_world_size())
    x, y = x[shard].to(torch.bfloat16), y[shard].to(torch.bfloat16)  # each rank its part of the batch
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        optimizer.step()
        average = loss.detach().clone()
        dist.all_reduce(average)
        losses.append(average.item() / dist.get_world_size())
    weight = model[0].weight
    if rank == 0:
        print(
            f"ranks {dist.get_world_size()}, parameters {weight.dtype}, local shard {tuple(weight.to_local().shape)} "
            f"of {tuple(weight.shape)}; engine {optimizer.engine_report()[0]['ran']}"
        )
        print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
