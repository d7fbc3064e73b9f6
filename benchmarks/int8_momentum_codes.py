"""Which int8 code book and block size train best for SGD momentum: the digits task, several seeds.

Trains the demo's convnet on the digits data with torch.optim.SGD's recurrence (momentum 0.9, the demo's
lr and batches), the buffer kept in float32, or as int8 codes with per-block scales (rules/quantize.py):
each step dequantizes, updates in float32, steps with the float32 buffer and stores it quantized. Prints
final test accuracy per setup (mean over seeds) and its difference from float32. Run:

    python benchmarks/int8_momentum_codes.py [--seeds 3] [--epochs 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from torchsgd.cli.data import load_digits_split
from torchsgd.cli.models import small_convnet
from torchsgd.rules import quantize as q
from torchsgd.rules.rounding import stream_key


def train(seed: int, epochs: int, setup: tuple[str, int, bool] | None, lr: float = 0.1, momentum: float = 0.9) -> float:
    data = load_digits_split(seed)
    torch.manual_seed(seed)
    model = small_convnet()
    params = list(model.parameters())
    state: dict[int, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
    order = torch.Generator().manual_seed(seed)
    step = 0
    if setup is not None:
        code, block, stochastic = setup
        q.BLOCK = block
    for _ in range(epochs):
        for batch in torch.randperm(len(data.train_images), generator=order).split(32):
            model.zero_grad()
            F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch]).backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    g = p.grad
                    if i not in state:
                        b = g.clone()
                    elif setup is None:
                        b = state[i].mul_(momentum).add_(g)
                    else:
                        codes, scales = state[i]
                        b = q.dequantize(codes, scales, code).mul_(momentum).add_(g)
                    p.add_(b, alpha=-lr)
                    if setup is None:
                        state[i] = b
                    else:
                        state[i] = q.quantize(b, code, stream_key(seed, step, i) if stochastic else None)
            step += 1
    with torch.no_grad():
        predicted = model(data.test_images).argmax(dim=1)
    return float((predicted == data.test_labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    setups: list[tuple[str, int, bool] | None] = [None]
    setups += [(code, block, sr) for code in q.CODES for block in (256, 2048) for sr in (False, True)]
    baseline: list[float] = []
    print(f"digits convnet, {args.epochs} epochs, lr 0.1, momentum 0.9, seeds 0..{args.seeds - 1}")
    print("| momentum storage | test accuracy % (mean) | vs float32 (points) | per seed |")
    print("|---|---|---|---|")
    for setup in setups:
        start = time.perf_counter()
        accuracies = [100 * train(seed, args.epochs, setup) for seed in range(args.seeds)]
        if setup is None:
            baseline = accuracies
            name = "float32"
        else:
            name = f"int8 {setup[0]}, block {setup[1]}, {'stochastic' if setup[2] else 'nearest'}"
        mean = statistics.mean(accuracies)
        delta = mean - statistics.mean(baseline)
        per_seed = " ".join(f"{a:.2f}" for a in accuracies)
        print(f"| {name} | {mean:.2f} | {delta:+.2f} | {per_seed} | ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
