"""Reading a sample from a webdataset-style shard: distill's TarShards (each member's place noted once, a read is one
seek) against opening the shard with tarfile and extracting the member by name at every read (what a reader
without an index does: tarfile lists the shard's headers up to the member, so a read costs more the further in it
sits). Both read the same random members of shards of 256x256 JPEGs with a caption each, side by side in one run.

    python experiments/tar_read_speed.py > experiments/results/tar_read_speed.md
"""
from __future__ import annotations

import io
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.data import TarShards  # noqa: E402

READS = 200


def shard(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
            for name, payload in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def by_name(path: Path, i: int):
    with tarfile.open(path) as tar:
        img = Image.open(io.BytesIO(tar.extractfile(f"{i:06d}.jpg").read()))
        img.load()
        return img, tar.extractfile(f"{i:06d}.txt").read().decode()


def timed(read, picks) -> float:
    start = time.perf_counter()
    for i in picks:
        read(i)
    return (time.perf_counter() - start) / len(picks) * 1e3


def main() -> None:
    print("| members (images) | shard MB | tarfile by name, ms/read | TarShards, ms/read | ratio |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1_000, 10_000):
            path = shard(Path(tmp) / f"{n}.tar", n)
            picks = random.Random(0).choices(range(n), k=READS)
            ds = TarShards(path, 256)
            assert [ds.read(i)[1] for i in picks[:5]] == [by_name(path, i)[1] for i in picks[:5]]
            old, new = timed(lambda i: by_name(path, i), picks), timed(lambda i: ds.read(i)[0].load(), picks)
            print(f"| {n:,} | {path.stat().st_size / 2**20:.0f} | {old:.2f} | {new:.2f} | {old / new:.0f}x |")


if __name__ == "__main__":
    main()
