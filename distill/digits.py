"""The digits worlds: scikit-learn's 1,797 bundled 8x8 handwritten digits as training data and reference, alone
("a handwritten digit 3"), side by side ("a 3 on the left and a 7 on the right"), stacked ("a 3 above a 7"), and
the three shapes together as aspect-ratio buckets (docs/worlds.md)."""
from __future__ import annotations

import re

import torch

from distill.errors import DistillError

DIGIT_PROMPTS = [f"a handwritten digit {k}" for k in range(10)]


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 1,797 bundled 8x8 handwritten digits, captioned 'a handwritten digit k'."""

    provides = {"prompt", "image"}

    def __init__(self, resolution: int):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images, self.labels, self.resolution = d.images / 16.0, d.target, resolution

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.from_numpy(self.images[i]).float()[None, None] * 2 - 1
        img = torch.nn.functional.interpolate(img, size=self.resolution, mode="bilinear", align_corners=False)[0]
        return {"prompt": DIGIT_PROMPTS[int(self.labels[i])], "image": img.expand(3, -1, -1).clone()}


def pair_prompt(left: int, right: int) -> str:
    return f"a {left} on the left and a {right} on the right"


PAIR = re.compile(r"\ba (\d) on the left and a (\d) on the right\b")
# The 20 ordered pairs no teacher trains on (each digit twice on each side), to measure compositional generalisation.
HELD_OUT_PAIRS = frozenset((a, (a + k) % 10) for a in range(10) for k in (3, 7))
PAIR_PROMPTS = [pair_prompt(a, b) for a in range(10) for b in range(10)]


class DigitPairs(torch.utils.data.Dataset):
    """Two of scikit-learn's digits side by side, each `resolution` px square (images resolution x 2 resolution),
    captioned 'a 3 on the left and a 7 on the right'. Sample i draws its two digits from a generator seeded by
    (seed, i), skipping the HELD_OUT_PAIRS unless `held_out` (real pairs of every kind, for references): millions of
    combinations, read as a virtual data set of `size` samples, the same on every read."""

    provides = {"prompt", "image"}

    def __init__(self, resolution: int, size: int = 100_000, seed: int = 0, held_out: bool = False):
        self.digits, self.size, self.seed, self.held_out = Digits(resolution), size, seed, held_out

    def __len__(self):
        return self.size

    def pick(self, i: int) -> tuple[int, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        while True:
            a, b = torch.randint(len(self.digits), (2,), generator=g).tolist()
            if self.held_out or (int(self.digits.labels[a]), int(self.digits.labels[b])) not in HELD_OUT_PAIRS:
                return a, b

    axis, caption = 2, staticmethod(pair_prompt)  # side by side: joined along the width

    def __getitem__(self, i):
        a, b = self.pick(i)
        first, second = self.digits[a], self.digits[b]
        return {"prompt": self.caption(int(self.digits.labels[a]), int(self.digits.labels[b])),
                "image": torch.cat([first["image"], second["image"]], dim=self.axis)}


def stack_prompt(top: int, bottom: int) -> str:
    return f"a {top} above a {bottom}"


STACK = re.compile(r"\ba (\d) above a (\d)\b")
STACK_PROMPTS = [stack_prompt(a, b) for a in range(10) for b in range(10)]


class DigitStacks(DigitPairs):
    """DigitPairs with one digit above the other (images 2 resolution high, resolution wide), captioned 'a 3 above a
    7'; the same draws and held-out pairs."""

    axis, caption = 1, staticmethod(stack_prompt)  # joined along the height


class DigitShapes(torch.utils.data.Dataset):
    """The shaped digits world, one bucket per shape: single digits (resolution square), pairs side by side (twice as
    wide) and stacked pairs (twice as high), sample i of shape i % 3 in the order of `sizes` (the run's
    data.buckets). Each is conditioned on its own size, uncropped."""

    provides = {"prompt", "image"}

    def __init__(self, resolution: int, sizes: list[tuple[int, int]], size: int = 99_999, seed: int = 0):
        r = resolution
        worlds = {(r, r): Digits(r), (r, 2 * r): DigitPairs(r, size, seed), (2 * r, r): DigitStacks(r, size, seed)}
        if sorted(map(tuple, sizes)) != sorted(worlds):
            raise DistillError(f"data.kind=digit_shapes trains its three shapes: set data.buckets to "
                               f"{[list(k) for k in worlds]} (it is {[list(s) for s in sizes]})")
        self.parts, self.sizes, self.size = [worlds[tuple(s)] for s in sizes], [tuple(s) for s in sizes], size
        self.bucket_of = [i % 3 for i in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        part = self.parts[i % 3]
        item = part[(i // 3) % len(part)]
        return {**item, "original_size": torch.tensor(item["image"].shape[-2:]),
                "crop": torch.zeros(2, dtype=torch.long)}
