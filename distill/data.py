"""Training data: prompts, captioned image folders, webdataset-style tar shards, latent caches, digits.

Every dataset is map-style and yields dicts with "prompt" and one of "image" ([-1, 1], CHW),
"latents", or (from a cache) "cond.*" text embeddings. The order of samples is a pure function of
(seed, step), so a resumed run reads exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from distill.config import DataConfig
from distill.errors import DistillError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop, scale to [-1, 1]."""
    img = img.convert("RGB")
    scale = resolution / min(img.size)
    img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def read_prompts(path: Path) -> list[str]:
    text = Path(path).read_text()
    if Path(path).suffix == ".jsonl":
        prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DistillError(f"prompts file {path} holds no prompts")
    return prompts


class Prompts(torch.utils.data.Dataset):
    def __init__(self, path: Path):
        self.prompts = read_prompts(path)

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt": self.prompts[i]}


class ImageFolder(torch.utils.data.Dataset):
    """A folder with images and a metadata.jsonl of {"file_name": ..., "text": ...} lines."""

    def __init__(self, folder: Path, resolution: int):
        meta = Path(folder) / "metadata.jsonl"
        if not meta.is_file():
            raise DistillError(f"image folder {folder} has no metadata.jsonl (lines of "
                               '{"file_name": "a.png", "text": "a caption"})')
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        self.items = [(Path(folder) / r["file_name"], r.get("text", r.get("prompt", ""))) for r in rows]
        self.resolution = resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, caption = self.items[i]
        return {"prompt": caption, "image": image_to_tensor(Image.open(path), self.resolution)}


class TarShards(torch.utils.data.Dataset):
    """Webdataset-style shards: members `key.png|jpg` with `key.txt` or `key.json` ({"caption": ...})."""

    def __init__(self, folder: Path, resolution: int):
        shards = sorted(Path(folder).glob("*.tar")) if Path(folder).is_dir() else [Path(folder)]
        self.items, self.resolution = [], resolution
        for shard in shards:
            with tarfile.open(shard) as tar:
                names = {m.name for m in tar.getmembers() if m.isfile()}
            for name in sorted(names):
                stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                if "." + suffix.lower() in IMAGE_SUFFIXES:
                    caption = next((f"{stem}.{c}" for c in ("txt", "json") if f"{stem}.{c}" in names), None)
                    self.items.append((shard, name, caption))
        if not self.items:
            raise DistillError(f"no image members found in tar shards at {folder}")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        shard, name, caption_name = self.items[i]
        with tarfile.open(shard) as tar:
            img = Image.open(io.BytesIO(tar.extractfile(name).read()))
            caption = tar.extractfile(caption_name).read().decode() if caption_name else ""
        if caption_name and caption_name.endswith(".json"):
            caption = json.loads(caption).get("caption", "")
        return {"prompt": caption.strip(), "image": image_to_tensor(img, self.resolution)}


class LatentCache(torch.utils.data.Dataset):
    """Precomputed latents and text embeddings in one safetensors file (written by `write_cache`)."""

    def __init__(self, path: Path):
        self.tensors = load_file(str(path))
        if "latents" not in self.tensors:
            raise DistillError(f"latent cache {path} has no 'latents' tensor")

    def __len__(self):
        return len(self.tensors["latents"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


class Digits(torch.utils.data.Dataset):
    """scikit-learn's 1,797 bundled 8x8 handwritten digits, captioned 'a handwritten digit k'."""

    def __init__(self, resolution: int):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images, self.labels, self.resolution = d.images / 16.0, d.target, resolution

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.from_numpy(self.images[i]).float()[None, None] * 2 - 1
        img = torch.nn.functional.interpolate(img, size=self.resolution, mode="bilinear", align_corners=False)[0]
        return {"prompt": f"a handwritten digit {int(self.labels[i])}", "image": img.expand(3, -1, -1).clone()}


def build(cfg: DataConfig, resolution: int, teacher=None, seed: int = 0):
    path = Path(cfg.path).expanduser() if cfg.path else None
    if cfg.kind == "prompts":
        return Prompts(path)
    if cfg.kind == "images":
        return ImageFolder(path, resolution)
    if cfg.kind == "shards":
        return TarShards(path, resolution)
    if cfg.kind == "latents":
        return LatentCache(path)
    if cfg.kind == "digits":
        return Digits(resolution)
    return teacher.dataset(cfg.size, seed)


def collate(items: list[dict]) -> dict:
    out = {"prompt": [it.get("prompt", "") for it in items]}
    for key in items[0]:
        if key != "prompt":
            out[key] = torch.stack([it[key] for it in items])
    return out


class StepBatches(torch.utils.data.Sampler):
    """Index batches for global steps start, start+1, ...: epoch e is a permutation seeded by (seed, e),
    cut into global batches; this process takes its rank's slice. Stateless, so resuming is exact."""

    def __init__(self, size: int, batch: int, world: int, rank: int, seed: int, start: int = 0):
        self.size, self.batch, self.world, self.rank, self.seed, self.start = size, batch, world, rank, seed, start
        self.per_epoch = size // (batch * world)
        if self.per_epoch == 0:
            raise DistillError(f"dataset has {size} samples, fewer than one global batch ({batch} x {world} "
                               "processes); lower data.batch_size")

    def __iter__(self):
        step = self.start
        while True:
            epoch, k = divmod(step, self.per_epoch)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            lo = (k * self.world + self.rank) * self.batch
            yield perm[lo:lo + self.batch].tolist()
            step += 1


@torch.no_grad()
def write_cache(teacher, dataset, out: Path, batch_size: int = 16, seed: int = 0) -> Path:
    """Encode a dataset's images and prompts once with the frozen teacher, into one safetensors file."""
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
        cond = teacher.encode_prompts(batch["prompt"])
        latents = batch["latents"] if "latents" in batch else teacher.encode(batch["image"].to(teacher.device), g)
        for k, v in {"latents": latents, **{f"cond.{k}": v for k, v in cond.flat().items()}}.items():
            parts.setdefault(k, []).append(v.float().cpu())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, str(tmp))
    tmp.replace(out)
    return out
