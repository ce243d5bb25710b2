"""Aspect-ratio buckets: image sizes a run trains at, which bucket an image goes to, how it is cut to it, and the
seeded order of one-bucket batches. Pure functions and a stateless sampler (a leaf: imports no command)."""
from __future__ import annotations

import math

import torch

from distill.errors import DistillError

MAX_RATIO = 4.0  # the widest auto bucket: 4:1 either way (SDXL's own list, Podell et al. 2023 app. I, ends near it)


def auto_grid(pixels: int, multiple: int) -> int:
    """The side step of `auto` buckets: a sixteenth of the square's side, on the family's `multiple` (SDXL's 64 px at
    1024 x 1024), so a budget gives a few dozen buckets whatever the family's factor."""
    return max(multiple, math.isqrt(pixels) // 16 // multiple * multiple)


def auto_buckets(pixels: int, multiple: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """(height, width) pairs of about `pixels` pixels each, both sides multiples of `multiple`, from 1:max_ratio to
    max_ratio:1, portrait and landscape alike: for every short side on the grid up to the square's, the long side
    whose area is nearest the budget without passing it. SDXL's ~1 MP list comes out at pixels=1024*1024,
    multiple=64 (1024x1024, 896x1152, 832x1216, 768x1344, 640x1600, ... and each turned on its side)."""
    out = set()
    for short in range(multiple, math.isqrt(pixels) + 1, multiple):
        long = pixels // short // multiple * multiple
        if long >= short and long / short <= max_ratio:
            out |= {(short, long), (long, short)}
    if not out:
        raise DistillError(f"no bucket of {pixels} pixels has both sides multiples of {multiple} within "
                           f"{max_ratio:g}:1; raise data.bucket_pixels")
    return sorted(out)


def members(bucket_of: list[int]) -> dict[int, list[int]]:
    """The samples of each bucket, in order (a sample in no bucket, -1, in none)."""
    out: dict[int, list[int]] = {}
    for i, b in enumerate(bucket_of):
        if b >= 0:
            out.setdefault(b, []).append(i)
    return dict(sorted(out.items()))


def nearest(buckets: list[tuple[int, int]], height: int, width: int, upscale: bool = True) -> int | None:
    """The index of the bucket whose aspect ratio is nearest the image's (in log ratio). Of buckets with the same
    ratio (one shape at several scales), the largest the image covers, else the smallest: an image is upscaled only
    where no bucket of its shape fits inside it. Without `upscale`, only buckets the image covers are candidates;
    None if it covers none."""
    ratio = math.log(height / width)
    best = None
    for i, (h, w) in enumerate(buckets):
        covered = h <= height and w <= width
        if not upscale and not covered:
            continue
        key = (abs(math.log(h / w) - ratio), not covered, -h * w if covered else h * w)
        if best is None or key < best[0]:
            best = (key, i)
    return None if best is None else best[1]


def cover(height: int, width: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """How an image of height x width is cut to `bucket`: resized (aspect kept) to cover it, then centre-cropped.
    Returns the resized (height, width) and the crop's (top, left) in that resized image: SDXL's crop
    micro-conditioning (Podell et al. 2023, sec. 2.2)."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return (rh, rw), ((rh - bh) // 2, (rw - bw) // 2)


class BucketBatches(torch.utils.data.Sampler):
    """Index batches for micro-steps start, start+1, ... where every global batch (batch x world processes x
    `accumulation` micro-steps: one optimiser step) comes from one bucket. Epoch e shuffles each bucket's samples
    (seeded by seed, e and the bucket), cuts them into global batches (a bucket's remainder waits for a later epoch's
    shuffle) and shuffles the batches' order (seeded by seed and e). Micro-step m of a global batch on rank r reads
    its slice m * world + r, as the trainer counts. A pure function of (seed, step), so resuming is exact, and N
    processes read what one process accumulating N micro-batches reads."""

    def __init__(self, bucket_of: list[int], batch: int, world: int, rank: int, seed: int, start: int = 0,
                 accumulation: int = 1):
        self.batch, self.world, self.rank, self.seed, self.start = batch, world, rank, seed, start
        self.accumulation, self.size = accumulation, batch * world * accumulation
        groups = members(bucket_of)
        self.members = [torch.tensor(m) for m in groups.values()]
        self.starved = {b: len(m) for b, m in groups.items() if len(m) < self.size}  # never drawn
        self.per_epoch = sum(len(m) // self.size for m in self.members)
        if self.per_epoch == 0:
            sizes = ", ".join(str(len(m)) for m in self.members)
            raise DistillError(f"no bucket holds one global batch ({batch} x {world} processes x {accumulation} "
                               f"accumulated; the buckets hold {sizes} samples); lower data.batch_size or use fewer "
                               "buckets")

    def epoch(self, e: int) -> list[list[int]]:
        """Epoch e's global batches, in order."""
        out = []
        for b, m in enumerate(self.members):
            perm = m[torch.randperm(len(m), generator=torch.Generator().manual_seed(
                (self.seed * 100003 + e) * 1009 + b))]
            out += [perm[lo:lo + self.size].tolist() for lo in range(0, len(m) - self.size + 1, self.size)]
        order = torch.randperm(len(out), generator=torch.Generator().manual_seed(self.seed * 100003 + e))
        return [out[k] for k in order.tolist()]

    def __iter__(self):
        step, cached = self.start, (None, None)
        while True:
            global_step, micro = divmod(step, self.accumulation)
            e, k = divmod(global_step, self.per_epoch)
            if cached[0] != e:
                cached = (e, self.epoch(e))
            lo = (micro * self.world + self.rank) * self.batch
            yield cached[1][k][lo:lo + self.batch]
            step += 1
