"""scikit-learn's bundled digits (1797 images of 8×8 pixels, ten classes) as torch tensors, split once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Digits:
    """A fixed stratified train/test split; images are ``(N, 1, 8, 8)`` float32 in [0, 1]."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits_split(seed: int, train_samples: int | None = None) -> Digits:
    """The digits data, split 75/25 with the classes' proportions kept, the same for the same ``seed``.

    ``train_samples`` keeps only the first that many training images (for quick runs); the test set
    stays whole.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    if train_samples is not None:
        if train_samples < 1:
            raise ValueError(f"train_samples must be at least 1, got {train_samples}")
        train_x, train_y = train_x[:train_samples], train_y[:train_samples]
    return Digits(train_x, train_y, test_x, test_y)
