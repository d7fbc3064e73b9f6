"""The demo's model: a small convolutional net for 8×8 single-channel images, built from torch.nn."""

from __future__ import annotations

from torch import nn


def small_convnet(num_classes: int = 10) -> nn.Sequential:
    """Two 3×3 convolutions, one 2×2 max-pool and two linear layers (38,282 parameters).

    Tanh rather than ReLU: with ReLU, plain SGD (no momentum) at the demo's learning rate now and then
    collapses to a constant output (loss back at ln 10), and the comparison would be about dead units
    instead of about momentum.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2),  # 8×8 → 4×4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.Tanh(),
        nn.Linear(64, num_classes),
    )
