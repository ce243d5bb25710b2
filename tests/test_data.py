"""Datasets: prompt files, captioned image folders, tar shards, latent caches; trackers on a real run."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from distill import data, runs
from distill.config import DataConfig
from distill.errors import DistillError
from distill.trainer import train


def _png(value: int, size=(20, 12)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8))


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"}\n')
    for name in ("p.txt", "p.jsonl"):
        ds = data.build(DataConfig(kind="prompts", path=str(tmp_path / name)), 32)
        assert [ds[i]["prompt"] for i in range(len(ds))] == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DistillError, match="holds no prompts"):
        data.build(DataConfig(kind="prompts", path=str(tmp_path / "empty.txt")), 32)


def test_image_folder_resizes_and_crops(tmp_path):
    _png(255).save(tmp_path / "white.png")
    _png(0).save(tmp_path / "black.jpg")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "white.png", "text": "white"}\n'
                                             '{"file_name": "black.jpg", "text": "black"}\n')
    ds = data.build(DataConfig(kind="images", path=str(tmp_path)), 16)
    batch = data.collate([ds[0], ds[1]])
    assert batch["prompt"] == ["white", "black"] and batch["image"].shape == (2, 3, 16, 16)
    assert torch.allclose(batch["image"][0], torch.ones(3, 16, 16)) and batch["image"][1].max() == -1
    with pytest.raises(DistillError, match="no metadata.jsonl"):
        data.build(DataConfig(kind="images", path=str(tmp_path / "..")), 16)


def test_tar_shards(tmp_path, capsys, monkeypatch):
    def add(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(3):
                buf = io.BytesIO()
                _png(40 * i).save(buf, format="PNG")
                add(tar, f"{shard}{i}.png", buf.getvalue())
                if i == 2:
                    add(tar, f"{shard}{i}.json", json.dumps({"caption": f"json {shard}{i}"}).encode())
                else:
                    add(tar, f"{shard}{i}.txt", f"caption {shard}{i}".encode())
    ds = data.build(DataConfig(kind="shards", path=str(tmp_path)), 8)
    assert len(ds) == 6
    assert [ds[i]["prompt"] for i in range(3)] == ["caption 00", "caption 01", "json 02"]
    assert ds[5]["image"].shape == (3, 8, 8)
    # a compressed shard reads the same through tarfile (no seeks into a gzip stream)
    with tarfile.open(tmp_path / "shard-0.tar") as src, tarfile.open(tmp_path / "zipped.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
    zipped = data.build(DataConfig(kind="shards", path=str(tmp_path / "zipped.tar.gz")), 8)
    assert "zipped.tar.gz is compressed: every read decompresses it" in capsys.readouterr().err
    assert [zipped[i]["prompt"] for i in range(3)] == ["caption 00", "caption 01", "json 02"]
    assert all(torch.equal(zipped[i]["image"], ds[i]["image"]) for i in range(3))
    # its images' sizes are read through one opening of it, not one per image (each lists the shard anew)
    zipped, plain = data.TarShards(tmp_path / "zipped.tar.gz", 8), data.TarShards(tmp_path / "shard-0.tar", 8)
    real, opened = tarfile.open, []
    monkeypatch.setattr(data.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert [hw for _, hw in zipped.headers()] == [hw for _, hw in plain.headers()] == [(12, 20)] * 3
    assert len(opened) == 1
    # a shard cut short after it was listed: its last image is a bad sample, named
    shards = data.TarShards(tmp_path / "shard-1.tar", 8)
    (tmp_path / "shard-1.tar").write_bytes((tmp_path / "shard-1.tar").read_bytes()[:shards.items[2][1][1][0] + 10])
    with pytest.raises(data.BadSample, match="shard-1.tar:12.png cannot be read"):
        shards.read(2)


def test_step_batches_are_a_pure_function_of_step():
    full = data.StepBatches(10, 2, 2, 0, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(5)]
    resumed = iter(data.StepBatches(10, 2, 2, 0, seed=3, start=3))
    assert [next(resumed) for _ in range(2)] == first[3:]
    other_rank = iter(data.StepBatches(10, 2, 2, 1, seed=3))
    epoch0 = sum(first[:2], []) + sum([next(other_rank) for _ in range(2)], [])
    assert len(set(epoch0)) == 8  # ranks read disjoint shards of one epoch's permutation
    with pytest.raises(DistillError, match="fewer than one global batch"):
        data.StepBatches(3, 2, 2, 0, seed=0)


def test_latent_cache_round_trip_and_training_on_it(tmp_path, tiny_sd3_dir, cli):
    cfg_file = tmp_path / "c.yaml"
    runs.parse_config({"teacher": {"source": str(tiny_sd3_dir), "resolution": 32},
                  "data": {"kind": "digits", "batch_size": 64},
                  "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2}}).dump(cfg_file)
    cache = tmp_path / "cache.safetensors"
    proc = cli("cache", cfg_file, "data.batch_size=256", "--out", cache)
    assert "cached 1797 samples" in proc.stdout
    ds = data.build(DataConfig(kind="latents", path=str(cache)), 32)
    item = ds[5]
    assert item["latents"].shape == (4, 16, 16) and item["cond.pos.embeds"].shape[-1] == 64
    cfg = runs.load_config(cfg_file, ["data.kind=latents", f"data.path={cache}", "data.batch_size=2"])
    method = train(cfg)
    assert method is not None and (tmp_path / "run/checkpoints/step-00000002").is_dir()


def test_prompts_only_data_is_refused_by_consistency(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    cfg = runs.parse_config({"teacher": {"source": "builtin:gmm-vp"},
                        "data": {"kind": "prompts", "path": str(tmp_path / "p.txt"), "batch_size": 2},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1}})
    with pytest.raises(DistillError, match="needs images or latents"):
        train(cfg)


def test_tensorboard_and_offline_wandb_trackers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = runs.parse_config({"teacher": {"source": "builtin:gmm-flow"}, "data": {"kind": "teacher", "batch_size": 16},
                        "method": {"params": {"guidance_min": 1.0, "guidance_max": 2.0}},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 6, "log_every": 2,
                                  "trackers": ["tensorboard", "wandb"]}})
    train(cfg)
    assert list((tmp_path / "run/logs").rglob("events.out.tfevents.*"))
    assert list(tmp_path.rglob("offline-run-*"))
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and all("student/grad_norm" in r for r in rows)
