"""The two tasks that 8-bit momentum is checked on: the demo's digits convnet, and a character-level language model.

Both train with torchsgd.SGD at the demo's settings (momentum 0.9, Nesterov, weight decay 5e-4), the
momentum kept in float32 or in int8 (``momentum_dtype=torch.int8``, optionally ``stochastic_rounding``);
the same seed gives the same initial weights and the same batches in the same order whatever the storage.
``train_digits`` and ``train_chars`` return a Curves: held-out accuracy and mean training loss per epoch.

The character task needs no download: its text is generated here, from ``random.Random(seed).random()``
alone (the one stream Python guarantees across versions), by a small grammar of three kinds of sentence:

- ``the old cats see a red ball near the house.`` — the determiner fixes singular or plural, and the
  noun's ending and the verb's agree with it, several characters later;
- ``seven plus eight is fifteen.`` — the answer's spelling follows from the two numbers, up to 24
  characters back;
- ``four five six seven.`` — counting on, spelled out.

The model sees the previous CONTEXT characters (an embedding each, concatenated, as Bengio et al. 2003) and
predicts the next through one tanh layer of HIDDEN units; it is scored on every character of a separately
generated held-out text (TEST_CHARS of them, so 0.3 points is 60 characters).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchsgd

LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

STORAGES = {  # name: extra torchsgd.SGD options
    "float32": {},
    "int8 nearest": {"momentum_dtype": torch.int8},
    "int8 stochastic": {"momentum_dtype": torch.int8, "stochastic_rounding": True},
}


@dataclass
class Curves:
    """Per epoch, after it: held-out accuracy in percent and the epoch's mean training loss."""

    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


def _train(
    model: nn.Module,
    options: dict,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    cosine: bool = False,
) -> Curves:
    opt = torchsgd.SGD(
        model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, **options
    )
    steps = epochs * -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    order = torch.Generator().manual_seed(seed)
    curves = Curves()
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in torch.randperm(len(train_x), generator=order).split(batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            loss.backward()
            opt.step()
            if schedule is not None:
                schedule.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(test_x.split(4096), test_y.split(4096)))
        curves.test_accuracy.append(100 * correct / len(test_y))
        curves.train_loss.append(total / count)
    return curves


# The digits: the demo's convnet and split (torchsgd.cli), 450 test images.

DIGITS_EPOCHS = 12


def train_digits(seed: int, options: dict, epochs: int = DIGITS_EPOCHS) -> Curves:
    """The demo's convnet on the digits split of ``seed``, batch 32, lr 0.1: what ``torchsgd demo`` trains."""
    from torchsgd.cli.data import load_digits_split
    from torchsgd.cli.models import small_convnet

    data = load_digits_split(seed)
    torch.manual_seed(seed)
    model = small_convnet()
    return _train(
        model, options, seed, epochs, 32, LR, data.train_images, data.train_labels, data.test_images, data.test_labels
    )


# The characters.

ALPHABET = " .abcdefghijklmnopqrstuvwxyz"
CONTEXT = 24  # characters the model sees: both numbers of a sum while its answer is spelled out
EMBEDDING = 16
HIDDEN = 128
TRAIN_CHARS = 160_000
TEST_CHARS = 20_000
TRAIN_TEXT_SEED, TEST_TEXT_SEED = 1, 2  # the text is the same for every training seed
CHARS_EPOCHS = 4
CHARS_BATCH = 256
CHARS_LR = 0.2

NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
]
ADJECTIVES = ["red", "old", "small", "big", "happy", "green", "quiet", "tall"]
NOUNS = ["cat", "dog", "bird", "ball", "house", "tree", "car", "cup", "boat", "hat"]  # plural: + s
VERBS = ["see", "like", "chase", "find", "want", "draw"]  # third person singular: + s
PREPOSITIONS = ["near", "under", "behind", "over"]
SINGULAR = ["the", "a", "one", "this", "every"]
PLURAL = ["the", "two", "some", "these", "many"]


def _choice(rng: random.Random, items: list[str]) -> str:
    return items[int(rng.random() * len(items))]


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    plural = rng.random() < 0.5
    words = [_choice(rng, PLURAL if plural else SINGULAR)]
    if rng.random() < 0.5:
        words.append(_choice(rng, ADJECTIVES))
    words.append(_choice(rng, NOUNS) + "s" * plural)
    return " ".join(words), plural


def _sentences(rng: random.Random) -> Iterator[str]:
    while True:
        kind = rng.random()
        if kind < 0.5:
            subject, plural = _noun_phrase(rng)
            verb = _choice(rng, VERBS) + "s" * (not plural)
            sentence = f"{subject} {verb} {_noun_phrase(rng)[0]}"
            if rng.random() < 0.4:
                sentence += f" {_choice(rng, PREPOSITIONS)} {_noun_phrase(rng)[0]}"
        elif kind < 0.8:
            a, b = int(rng.random() * 11), int(rng.random() * 11)
            sentence = f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}"
        else:
            start, count = int(rng.random() * 17), 2 + int(rng.random() * 3)
            sentence = " ".join(NUMBERS[start : start + count])
        yield sentence + "."


def generate_text(seed: int, chars: int) -> str:
    """``chars`` characters of the grammar's sentences, separated by spaces; the same on every machine."""
    pieces, length = [], 0
    for sentence in _sentences(random.Random(seed)):
        pieces.append(sentence)
        length += len(sentence) + 1
        if length >= chars + CONTEXT:
            break
    return " ".join(pieces)[: chars + CONTEXT]


def char_examples(seed: int, chars: int) -> tuple[Tensor, Tensor]:
    """Every position of a generated text: the CONTEXT characters before it (as indices) and the character."""
    codes = torch.tensor([ALPHABET.index(c) for c in generate_text(seed, chars)], dtype=torch.int64)
    windows = codes.unfold(0, CONTEXT + 1, 1)
    return windows[:, :CONTEXT].contiguous(), windows[:, CONTEXT].contiguous()


def char_model() -> nn.Sequential:
    """Embedding(28, 16) per context character, concatenated, → Linear(384, 128) → tanh → Linear(128, 28)."""
    return nn.Sequential(
        nn.Embedding(len(ALPHABET), EMBEDDING),
        nn.Flatten(),
        nn.Linear(CONTEXT * EMBEDDING, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, len(ALPHABET)),
    )


def train_chars(
    seed: int,
    options: dict,
    epochs: int = CHARS_EPOCHS,
    lr: float = CHARS_LR,
    batch: int = CHARS_BATCH,
    cosine: bool = True,
) -> Curves:
    """The character model from the initial weights of ``seed``, in the batch order of ``seed``."""
    train_x, train_y = char_examples(TRAIN_TEXT_SEED, TRAIN_CHARS)
    test_x, test_y = char_examples(TEST_TEXT_SEED, TEST_CHARS)
    torch.manual_seed(seed)
    model = char_model()
    return _train(model, options, seed, epochs, batch, lr, train_x, train_y, test_x, test_y, cosine)


TASKS: dict[str, tuple[str, Callable[[int, dict], Curves]]] = {
    "digits": ("digits convnet, 450 test images", train_digits),
    "chars": (f"character model, {TEST_CHARS:,} held-out characters", train_chars),
}
