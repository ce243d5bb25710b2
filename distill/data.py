"""Training data: prompts, captioned image folders, webdataset-style tar shards, latent caches, digits.

Every dataset is map-style and yields dicts with "prompt" and one of "image" ([-1, 1], CHW),
"latents", or (from a cache) "cond.*" text embeddings; `provides` says which. A sample that cannot
be read (a corrupt or non-image file) is replaced by the next readable one and counted. The order of samples is a pure function of
(seed, step), so a resumed run reads exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import sys
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from distill import buckets, checkpoint, paths
from distill.config import Config, DataConfig
from distill.digits import DigitPairs, Digits, DigitShapes, DigitStacks
from distill.errors import ConfigError, DistillError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what a reference folder's images may be
MAX_BAD_IN_A_ROW = 16


class BadSample(Exception):
    """One unreadable sample: skipped, counted and reported, never fatal on its own."""


def open_image(data, name: str) -> Image.Image:
    try:
        img = Image.open(data)
        img.load()
        return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(f"{name} is not a readable image ({type(e).__name__})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode. Pillow's own convert clips 16-bit and float pixels to 255 (near-white images),
    so those are rescaled by their mode's full range first; transparent pixels are laid on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        full = 1.0 if img.mode == "F" else 65535.0
        pixels = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and pixels.max(initial=0) <= 255:  # 8-bit values stored in a 32-bit mode
            full = 255.0
        img = Image.fromarray(np.clip(pixels / full * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def image_to_tensor(img: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize to cover `size` (height, width; an int is square), centre-crop, scale to [-1, 1]."""
    return fit(img, (size, size) if isinstance(size, int) else size)[0]


def fit(img: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """`image_to_tensor` at (height, width) `size`, and the crop's (top, left) in the resized image."""
    img = to_rgb(img)
    (rh, rw), (top, left) = buckets.cover(img.height, img.width, size)
    img = img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + size[1], top + size[0]))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1), (top, left)


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one a line) or a .jsonl file ({"prompt": ...} a line), UTF-8."""
    return read_captions(path)[0]


def read_captions(path: Path) -> tuple[list[str], list[Path | None]]:
    """Prompts and, for each, the image a .jsonl line pairs with it (COCO captions style: {"prompt": ..., "image":
    "a.jpg"}, a relative path read from the file's folder), or None."""
    path = Path(path)
    if paths.kind(path) == "a folder":
        raise DistillError(f"prompts file {path} is a folder; give a .txt or .jsonl file")
    paths.regular_file(path, "prompts file")
    lines = _lines(path, "prompts file")
    if path.suffix != ".jsonl":
        records = [(p, None) for _, p in lines]
    else:
        records = [(_jsonl_field(path, n, line, "prompt"), _jsonl_image(path, n, line)) for n, line in lines]
    if not records:
        raise DistillError(f"prompts file {path} holds no prompts")
    return [p for p, _ in records], [i for _, i in records]


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of a UTF-8 file's non-blank lines."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DistillError(f"{what} {path} is not UTF-8 text (byte {e.start})") from e
    # One line is one entry: split at line feeds only (str.splitlines also splits at U+2028, form feeds and other
    # separators that a prompt, or a JSON string, may hold).
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _jsonl_field(path: Path, n: int, line: str, key: str, what: str = "prompts file") -> str:
    try:
        value = json.loads(line)[key]
    except (ValueError, KeyError, TypeError) as e:
        raise DistillError(f"{what} {path} line {n} is not a JSON object with a \"{key}\"") from e
    if not isinstance(value, str):
        raise DistillError(f"{what} {path} line {n}: \"{key}\" must be a string")
    return value


def _jsonl_image(path: Path, n: int, line: str) -> Path | None:
    if "image" not in json.loads(line):  # a JSON object: its "prompt" was read first
        return None
    return path.parent / _jsonl_field(path, n, line, "image")


def reference_files(spec: str | Path) -> tuple[list[Path], Path]:
    """The image files of a real reference and the folder their names are relative to: a folder's images (png, jpg,
    jpeg, webp; sorted by name), or a .txt (a path a line) or .jsonl ({"image": ...} a line) list of them, relative
    paths read from the list's folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in REFERENCE_SUFFIXES and f.is_file())
        if not files:
            raise DistillError(f"--reference {path} holds no images ({', '.join(REFERENCE_SUFFIXES)})")
        return files, path
    if path.suffix not in (".txt", ".jsonl") or not path.is_file():
        raise DistillError(f"--reference {spec} is not digits, digit_pairs, prompts, a folder of images or a "
                           ".txt/.jsonl list of images")
    lines = _lines(path, "--reference")
    files = [path.parent / (_jsonl_field(path, n, line, "image", "--reference") if path.suffix == ".jsonl" else line)
             for n, line in lines]
    if not files:
        raise DistillError(f"--reference {path} lists no images")
    return files, path.parent


def reference_digest(files: list[Path], root: Path) -> str:
    """sha256 of the sorted (name relative to `root`, sha256 of the file's bytes) pairs: the reference's identity,
    the same wherever its folder lies. Every file is opened as an image here, so an unreadable one is named before
    any sampling."""
    pairs = []
    for f in files:
        try:
            blob = f.read_bytes()
        except OSError as e:
            raise DistillError(f"reference image {f} cannot be read ({e.strerror or type(e).__name__})") from e
        try:
            Image.open(io.BytesIO(blob)).verify()
        except Exception as e:  # noqa: BLE001 (Pillow raises many types for a broken file)
            raise DistillError(f"reference image {f} is not a readable image ({type(e).__name__})") from e
        name = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
        pairs.append((name, hashlib.sha256(blob).hexdigest()))
    return hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()


def preprocess(img: Image.Image, size: tuple[int, int], center_crop: bool = False) -> torch.Tensor:
    """The fixed evaluation preprocessing of every image a metric reads, real or generated: 8-bit RGB, optionally
    the central square (the short side kept), then a PIL bicubic resize of the 8-bit image to (height, width) `size`.
    PIL's antialiased bicubic is the resize clean-fid recommends (Parmar et al. 2022, "On Aliased Resizing and
    Surprising Subtleties in GAN Evaluation"); clean-fid resizes each channel in float, but torch-fidelity's
    extractors read 8-bit images, so this is not clean-fid's number to the last digit. uint8 [3, H, W]."""
    img = to_rgb(img)
    if center_crop:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


class EvalImages(torch.utils.data.Dataset):
    """Image files, or images in [-1, 1] [N, C, H, W], each read and preprocessed (`preprocess`) when asked for, so
    a large reference never sits in memory whole. `digest` names the set (for remembering its features)."""

    def __init__(self, items, size: tuple[int, int], center_crop: bool = False, digest: str | None = None):
        self.items, self.size, self.center_crop, self.digest = items, tuple(size), center_crop, digest

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if isinstance(item, Path):
            try:
                img = open_image(item, str(item))
            except BadSample as e:
                raise DistillError(f"reference image {e}") from e
        else:
            from distill.metrics import to_uint8

            img = Image.fromarray(to_uint8(item[None])[0].permute(1, 2, 0).numpy())
        return preprocess(img, self.size, self.center_crop)


def subset(n: int, count: int | None, seed: int) -> list[int]:
    """The first `count` of a seeded permutation of range(n) (all of range(n), in order, when count is None)."""
    if count is None:
        return list(range(n))
    if count > n:
        raise DistillError(f"--num-prompts {count} is more than the {n} prompts given")
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())


class Prompts(torch.utils.data.Dataset):
    provides = {"prompt"}

    def __init__(self, path: Path):
        self.prompts = read_prompts(path)

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"prompt": self.prompts[i]}


class ImageFolder(torch.utils.data.Dataset):
    """A folder with images and a metadata.jsonl of {"file_name": ..., "text": ...} lines."""

    provides = {"prompt", "image"}

    def __init__(self, folder: Path, size: int | tuple[int, int]):
        meta = Path(folder) / "metadata.jsonl"
        if not meta.is_file():
            raise DistillError(f"image folder {folder} has no metadata.jsonl (lines of "
                               '{"file_name": "a.png", "text": "a caption"})')
        self.items = []
        try:
            text = meta.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DistillError(f"{meta} is not UTF-8 text (byte {e.start})") from e
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.items.append((Path(folder) / row["file_name"], row.get("text", row.get("prompt", ""))))
            except (ValueError, KeyError, TypeError) as e:
                raise DistillError(f"{meta} line {n} is not a JSON object with a file_name; fix or remove it") from e
        if not self.items:
            raise DistillError(f"image folder {folder} lists no images in metadata.jsonl")
        self.size = size

    def __len__(self):
        return len(self.items)

    def read(self, i) -> tuple[Image.Image, str]:
        path, caption = self.items[i]
        if not path.is_file():
            raise BadSample(f"{path} is missing")
        return open_image(path, str(path)), caption

    def names(self) -> list[str]:
        return [str(path) for path, _ in self.items]

    def stamp(self) -> str:
        """What its images' sizes depend on: their names, and each file's size and modification time."""
        return files_stamp(path for path, _ in self.items)

    def headers(self):
        """(name, (height, width) or None where unreadable) of every image, read from its header alone."""
        for path, _ in self.items:
            try:
                with Image.open(path) as img:
                    yield str(path), (img.height, img.width)
            except (OSError, ValueError, Image.DecompressionBombError):
                yield str(path), None

    def __getitem__(self, i):
        img, caption = self.read(i)
        return {"prompt": caption, "image": image_to_tensor(img, self.size)}


class TarShards(torch.utils.data.Dataset):
    """Webdataset-style shards: members `key.png|jpg` with `key.txt` or `key.json` ({"caption": ...}). Each member's
    place in an uncompressed shard is noted once, so a read is one seek; a compressed shard is read through tarfile."""

    provides = {"prompt", "image"}

    def __init__(self, folder: Path, size: int | tuple[int, int]):
        shards = sorted(Path(folder).glob("*.tar")) if Path(folder).is_dir() else [Path(folder)]
        self.items, self.size = [], size
        for shard in shards:
            try:
                with tarfile.open(shard) as tar:
                    plain = isinstance(tar.fileobj, io.BufferedReader)  # not gzip, bz2 or xz
                    if not plain:
                        print(f"warning: tar shard {shard} is compressed: every read decompresses it from its start; "
                              "uncompressed .tar shards are read by one seek", file=sys.stderr)
                    spans = {m.name: (m.offset_data, m.size) if plain else None for m in tar.getmembers()
                             if m.isfile()}
            except (tarfile.TarError, OSError) as e:
                raise DistillError(f"tar shard {shard} is corrupt or truncated ({type(e).__name__}); re-create or "
                                  "remove it") from e
            for name in sorted(spans):
                stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                if "." + suffix.lower() in IMAGE_SUFFIXES:
                    caption = next((f"{stem}.{c}" for c in ("txt", "json") if f"{stem}.{c}" in spans), None)
                    self.items.append((shard, (name, spans[name]), caption and (caption, spans[caption])))
        if not self.items:
            raise DistillError(f"no image members found in tar shards at {folder}")

    def __len__(self):
        return len(self.items)

    @staticmethod
    def member(shard: Path, member: tuple[str, tuple[int, int] | None], tar: tarfile.TarFile | None = None) -> bytes:
        """A member's bytes: one seek where its place is known, else through tarfile (`tar`: the shard, open)."""
        name, span = member
        if span is None:
            with contextlib.nullcontext(tar) if tar is not None else tarfile.open(shard) as tar:
                return tar.extractfile(name).read()
        with open(shard, "rb") as f:
            f.seek(span[0])
            data = f.read(span[1])
        if len(data) != span[1]:
            raise OSError(f"{shard} ends inside {name}")
        return data

    def read(self, i) -> tuple[Image.Image, str]:
        shard, image, caption = self.items[i]
        try:
            img = open_image(io.BytesIO(self.member(shard, image)), f"{shard}:{image[0]}")
            text = self.member(shard, caption).decode() if caption else ""
            if caption and caption[0].endswith(".json"):
                text = json.loads(text).get("caption", "")
        except (tarfile.TarError, OSError, ValueError, AttributeError) as e:
            raise BadSample(f"{shard}:{image[0]} cannot be read ({type(e).__name__})") from e
        return img, text.strip()

    def names(self) -> list[str]:
        return [f"{shard}:{image[0]}" for shard, image, _ in self.items]

    def stamp(self) -> str:
        """What its images' sizes depend on: each shard's path, size and modification time."""
        return files_stamp(sorted({shard for shard, _, _ in self.items}))

    def headers(self):
        """(name, (height, width) or None where unreadable) of every image, read from its header alone. A compressed
        shard is opened once for all its images (each open lists it anew, decompressing it whole)."""
        for shard, items in itertools.groupby(zip(self.names(), self.items), key=lambda item: item[1][0]):
            with contextlib.ExitStack() as stack:
                tar = None
                for name, (_, image, _) in items:
                    try:
                        if image[1] is None and tar is None:
                            tar = stack.enter_context(tarfile.open(shard))
                        with Image.open(io.BytesIO(self.member(shard, image, tar))) as img:
                            yield name, (img.height, img.width)
                    except (tarfile.TarError, OSError, ValueError, AttributeError, Image.DecompressionBombError):
                        yield name, None

    def __getitem__(self, i):
        img, caption = self.read(i)
        return {"prompt": caption, "image": image_to_tensor(img, self.size)}


def files_stamp(files) -> str:
    """A digest of the files' paths, sizes and modification times (a missing file counts as such): it changes when
    any of them is replaced, without reading their bytes."""
    h = hashlib.sha256()
    for path in files:
        try:
            st = path.stat()
            h.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\t-\n".encode())
    return h.hexdigest()


def image_sizes(dataset) -> list[tuple[int, int] | None]:
    """Each image's (height, width) from its header, None where unreadable. They are kept in distill's cache under
    the digest of the files (dataset.stamp: their names, sizes and modification times), so a resumed run, every
    process after the first and every other run on the same files read no header again."""
    stamp = dataset.stamp()
    index = paths.cache_dir() / "image_sizes" / f"{stamp}.json"
    try:
        sizes = json.loads(index.read_text())
        if len(sizes) == len(dataset):
            return [tuple(hw) if hw else None for hw in sizes]
    except (OSError, ValueError, TypeError):
        pass  # not there, or unreadable: read the headers and write it anew
    sizes = [hw for _, hw in dataset.headers()]
    try:
        paths.write_atomic(index, json.dumps(sizes))
    except (DistillError, OSError):
        pass  # a read-only cache: the next start reads the headers again
    return sizes


class Bucketed(torch.utils.data.Dataset):
    """Images (an ImageFolder or TarShards) each cut to the bucket nearest its aspect ratio (distill.buckets), with
    the size conditioning SDXL reads: the image's original (height, width) and the crop's (top, left). Every
    image's size is known before training starts (image_sizes), so an image that fits no bucket is named at once;
    one that cannot be read is in no bucket (-1), never drawn."""

    provides = {"prompt", "image"}

    def __init__(self, dataset, sizes: list[tuple[int, int]], upscale: bool = True):
        self.dataset, self.sizes, self.bucket_of = dataset, sizes, []
        for name, hw in zip(dataset.names(), image_sizes(dataset)):
            if hw is None:
                print(f"warning: skipped a bad sample: {name} is not a readable image", file=sys.stderr)
                self.bucket_of.append(-1)
                continue
            (h, w), b = hw, buckets.nearest(sizes, *hw, upscale)
            if b is None:
                raise DistillError(f"image {name} ({h} x {w} px) covers no bucket (both sides at least the "
                                   "bucket's) and data.upscale is false; remove it, add a bucket it covers, or set "
                                   "data.upscale true")
            self.bucket_of.append(b)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, caption = self.dataset.read(i)
        original = (img.height, img.width)
        image, crop = fit(img, self.sizes[self.bucket_of[i]])
        return {"prompt": caption, "image": image, "original_size": torch.tensor(original),
                "crop": torch.tensor(crop)}


class LatentCache(torch.utils.data.Dataset):
    """Precomputed latents and text embeddings in one safetensors file (written by `write_cache`). A cache of
    bucketed images holds each bucket's tensors under `bucket<k>.` and the sizes as `buckets` ([K, 2]: height,
    width); its samples are bucket 0's, then bucket 1's, ..."""

    provides = {"latents", "cond"}

    def __init__(self, path: Path):
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for truncated or foreign files
            raise DistillError(f"latent cache {path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                               "rebuild it with distill cache") from e
        self.sizes = [tuple(s) for s in tensors.pop("buckets").tolist()] if "buckets" in tensors else None
        names = [f"bucket{k}." for k in range(len(self.sizes))] if self.sizes else [""]
        self.parts = [checkpoint.section(tensors, name) if name else tensors for name in names]
        counts = [len(part.get("latents", ())) for part in self.parts]  # a bucket no image went to holds none
        if not sum(counts):
            raise DistillError(f"latent cache {path} holds no latents; rebuild it with distill cache")
        self.bucket_of = None if self.sizes is None else [k for k, n in enumerate(counts) for _ in range(n)]
        self.start = np.cumsum([0] + counts)

    def __len__(self):
        return int(self.start[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.start, i, side="right") - 1)
        return {name: v[i - self.start[k]] for name, v in self.parts[k].items()}

    @torch.no_grad()
    def check_fits(self, teacher, path: Path, sizes: list[tuple[int, int]] | None = None) -> None:
        """A cache made by another teacher (or at other sizes) has other latent shapes or text-embedding shapes;
        training on it would fail deep in the backbone, or worse, run. `sizes`: the run's data.buckets."""
        if sizes != self.sizes:  # the run's config records the sizes it trains at, as every bucketed run's does
            have = "no buckets" if self.sizes is None else f"the buckets {[list(s) for s in self.sizes]}"
            want = "none" if sizes is None else [list(s) for s in sizes]
            raise DistillError(f"latent cache {path} holds {have}, data.buckets names {want}; set data.buckets to "
                               "the cache's, or rebuild it with distill cache")
        _, cond = teacher.probe()
        for part, size in zip(self.parts, self.sizes or [teacher.size]):
            if not part:
                continue
            want = {"latents": tuple(teacher.latent_shape(*size)),
                    **{f"cond.{k}": tuple(v.shape[1:]) for k, v in cond.flat().items()}}
            have = {k: tuple(v.shape[1:]) for k, v in part.items()}
            has_cond = any(k.startswith("cond.") for k in have)  # without, prompts are encoded while training
            for key in sorted(want):
                if (has_cond or key == "latents") and want[key] != have.get(key):
                    raise DistillError(f"latent cache {path} was made by another teacher or at another size: its "
                                       f"{key} has shape {have.get(key)}, this teacher's {want.get(key)} at "
                                       f"{size[0]} x {size[1]}; rebuild it with distill cache")


class Samples(torch.utils.data.Dataset):
    """Samples held in memory (the exact teacher's draws)."""

    provides = {"prompt", "latents"}

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class SkipBad(torch.utils.data.Dataset):
    """Replaces an unreadable sample by the next readable one, deterministically, and counts it in
    the sample's "skipped" field, so batches keep their size and every rank stays in step."""

    def __init__(self, dataset):
        self.dataset, self.provides = dataset, dataset.provides
        self.bucket_of, self.sizes = getattr(dataset, "bucket_of", None), getattr(dataset, "sizes", None)
        if self.bucket_of is not None:  # a bad sample's stand-in comes from its own bucket: one shape a batch
            self.members = buckets.members(self.bucket_of)
            self.place = {i: n for m in self.members.values() for n, i in enumerate(m)}

    def __len__(self):
        return len(self.dataset)

    def next(self, i: int, k: int) -> int:
        """The k-th sample after i (in its bucket, if bucketed), cyclically."""
        if self.bucket_of is None or self.bucket_of[i] < 0:  # in no bucket: never drawn by the sampler
            return (i + k) % len(self)
        m = self.members[self.bucket_of[i]]
        return m[(self.place[i] + k) % len(m)]

    def __getitem__(self, i):
        for k in range(MAX_BAD_IN_A_ROW):
            try:
                return {**self.dataset[self.next(i, k)], "skipped": k}
            except BadSample as e:
                print(f"warning: skipped a bad sample: {e}", file=sys.stderr)
        raise DistillError(f"{MAX_BAD_IN_A_ROW} unreadable samples in a row from index {i}; check the data set")


def build(cfg: DataConfig, size: int | tuple[int, int], teacher=None, seed: int = 0):
    """The data set of cfg for images of `size` (height, width; an int is square)."""
    path = Path(cfg.path).expanduser() if cfg.path else None
    height, width = (size, size) if isinstance(size, int) else size
    if cfg.kind == "prompts":
        ds = Prompts(path)
    elif cfg.kind == "images":
        ds = ImageFolder(path, (height, width))
    elif cfg.kind == "shards":
        ds = TarShards(path, (height, width))
    elif cfg.kind == "latents":
        ds = LatentCache(path)
        if teacher is not None:
            ds.check_fits(teacher, path, None if cfg.buckets is None else bucket_sizes(cfg, (height, width), teacher))
    elif cfg.kind == "digits":
        if width != height:
            raise DistillError(f"data.kind=digits makes square images; leave teacher.width unset (it is {width})")
        ds = Digits(height)
    elif cfg.kind == "digit_pairs":
        if width != 2 * height:
            raise DistillError(f"data.kind=digit_pairs makes images {height} x {2 * height} px; set teacher.width="
                               f"{2 * height} (it is {width})")
        ds = DigitPairs(height)
    elif cfg.kind == "digit_stacks":
        if height != 2 * width:
            raise DistillError(f"data.kind=digit_stacks makes images {2 * width} x {width} px; set teacher.resolution="
                               f"{2 * width} (it is {height})")
        ds = DigitStacks(width)
    elif cfg.kind == "digit_shapes":
        if cfg.buckets is None or width != height:
            raise DistillError(f"data.kind=digit_shapes trains three shapes around the teacher's square size: leave "
                               f"teacher.width unset and set data.buckets to [[{height}, {height}], [{height}, "
                               f"{2 * height}], [{2 * height}, {height}]]")
        return SkipBad(DigitShapes(height, bucket_sizes(cfg, (height, width), teacher), seed=seed))
    else:
        ds = Samples(teacher.dataset(cfg.size, seed))
    if cfg.buckets is not None and cfg.kind != "latents":
        ds = Bucketed(ds, bucket_sizes(cfg, (height, width), teacher), cfg.upscale)
    return SkipBad(ds)


def trained_sizes(cfg: DataConfig, teacher) -> list[tuple[int, int]]:
    """The (height, width) sizes a run trains at: its buckets, or the teacher's one size."""
    return [tuple(teacher.size)] if cfg.buckets is None else bucket_sizes(cfg, teacher.size, teacher)


def sample_size(cfg: Config, teacher, measured: bool = False) -> tuple[int, int]:
    """The (height, width) a run samples at unless told a size: sample.height x sample.width, each defaulting to the
    teacher's. A student trained on buckets samples at one of them: by default the teacher's size where it is one,
    else the bucket nearest its aspect ratio (buckets.nearest); a sample size it was not trained at is refused.
    `measured`: the size evaluation measures at, where a one-size run keeps its teacher's size whatever sample.*
    says, so that its rows stay in that size's protocol."""
    size = (cfg.sample.height or teacher.size[0], cfg.sample.width or teacher.size[1])
    if cfg.data.buckets is None:
        return tuple(teacher.size) if measured else size
    sizes = trained_sizes(cfg.data, teacher)
    if size in sizes:
        return size
    if cfg.sample.height is None and cfg.sample.width is None:
        return sizes[buckets.nearest(sizes, *size)]
    field = "sample.height" if cfg.sample.width is None else "sample.width" if cfg.sample.height is None else "sample"
    raise ConfigError(field, list(size), "a student trained on buckets samples at one of them: "
                      + ", ".join(f"{h} x {w}" for h, w in sizes))


def bucket_sizes(cfg: DataConfig, size: tuple[int, int], teacher=None) -> list[tuple[int, int]]:
    """data.buckets as (height, width) pairs: the list given, or `auto`'s for data.bucket_pixels (default: the
    teacher's own height x width) on buckets.auto_grid; the teacher refuses any it cannot make."""
    if cfg.buckets == "auto":
        pixels = cfg.bucket_pixels or size[0] * size[1]
        multiple = teacher.size_multiple if teacher is not None else 8
        sizes = buckets.auto_buckets(pixels, buckets.auto_grid(pixels, multiple))
    else:
        sizes = [(int(h), int(w)) for h, w in cfg.buckets]
    if teacher is not None:
        teacher.check_sizes(sizes, "data.buckets")
    return sizes


def collate(items: list[dict]) -> dict:
    out = {"prompt": [it.get("prompt", "") for it in items],
           "skipped": sum(it.get("skipped", 0) for it in items)}
    for key in items[0]:
        if key not in out:
            out[key] = torch.stack([it[key] for it in items])
    return out


def batch_sampler(dataset, batch: int, world: int, rank: int, seed: int, start: int = 0,
                  accumulation: int = 1) -> torch.utils.data.Sampler:
    """Micro-step `start`'s batch and on, rank `rank`'s slice; where the data set is bucketed, one bucket for each
    optimiser step's `accumulation` micro-steps."""
    if getattr(dataset, "bucket_of", None) is None:
        return StepBatches(len(dataset), batch, world, rank, seed, start)
    sampler = buckets.BucketBatches(dataset.bucket_of, batch, world, rank, seed, start, accumulation)
    if rank != 0:
        return sampler
    for b, n in sampler.starved.items():
        h, w = dataset.sizes[b]
        print(f"warning: bucket {h} x {w} holds {n} samples, fewer than one global batch ({sampler.size}: "
              f"data.batch_size x processes x accumulation), so it is never trained on", file=sys.stderr)
    empty = sorted(set(range(len(dataset.sizes))) - set(dataset.bucket_of))
    if empty:
        names = ", ".join("%d x %d" % dataset.sizes[b] for b in empty)
        print(f"warning: no sample went to bucket{'s' * (len(empty) > 1)} {names}, so "
              f"{'they are' if len(empty) > 1 else 'it is'} never trained on", file=sys.stderr)
    return sampler


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
    """Encode a dataset's images and prompts once with the frozen teacher, into one safetensors file; a bucketed
    one's each bucket apart, with its samples' size conditioning (LatentCache)."""
    g = torch.Generator().manual_seed(seed)
    bucket_of = getattr(dataset, "bucket_of", None)
    groups = {"": list(range(len(dataset)))} if bucket_of is None else {
        f"bucket{k}.": m for k, m in buckets.members(bucket_of).items()}
    parts: dict[str, list[torch.Tensor]] = {}
    for name, members in groups.items():
        for lo in range(0, len(members), batch_size):
            batch = collate([dataset[i] for i in members[lo:lo + batch_size]])
            cond = teacher.encode_prompts(batch["prompt"])
            if "original_size" in batch:
                cond = teacher.with_sizes(cond, batch["original_size"], batch["crop"], tuple(batch["image"].shape[-2:]))
            latents = batch["latents"] if "latents" in batch else teacher.encode(batch["image"].to(teacher.device), g)
            for k, v in {"latents": latents, **{f"cond.{k}": v for k, v in cond.flat().items()}}.items():
                parts.setdefault(name + k, []).append(v.float().cpu())
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    if bucket_of is not None:
        tensors["buckets"] = torch.tensor(dataset.sizes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with paths.new_file(out, "cache") as tmp:
        save_file(tensors, str(tmp))
    return out
