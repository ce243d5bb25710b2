"""`distill eval` on real prompts and a real reference, with metrics from local weights: distill's FID, KID,
precision and recall equal torch-fidelity's on the same folders and weights, its CLIP score equals a direct
transformers computation, one changed byte of a weights file makes another table, a COCO-style .jsonl evaluates end
to end, and every bad input is refused in one line before any sampling."""
import json
import math
import shutil
import sqlite3
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from distill import evaluation, metrics, runs
from distill.leaderboard import protocol_id
from distill.trainer import train
from test_bad_input import refusal_problem
from test_bad_input_round3 import MARKER, Payload

ROOT = Path(__file__).resolve().parents[1]
INCEPTION = "inception-v3-compat"


def _picture(g: torch.Generator, shift: float, size: int = 32) -> Image.Image:
    """A smooth ramp with a random tint and noise: images whose features differ, shifted set against set."""
    ramp = torch.linspace(0, 1, size)[:, None] * torch.linspace(0, 1, size)[None, :]
    x = ramp * 255 * (0.5 + 0.5 * torch.rand(3, 1, 1, generator=g)) + shift + 40 * torch.rand(3, size, size,
                                                                                               generator=g)
    return Image.fromarray(x.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-real")


@pytest.fixture(scope="module")
def inception(w):
    """torch-fidelity's own Inception-v3 with random weights (its constructor would download the real ones, so
    the download and the load are stubbed), its batch norms calibrated on random images so features stay O(1),
    saved as safetensors for distill and as a tensors-only .pt for torch-fidelity."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        net = fe.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, w / "inception.safetensors")
    torch.save(state, w / "inception.pt")
    return w / "inception.safetensors"


@pytest.fixture(scope="module")
def folders(w):
    """Two folders of 32 px PNGs (10 and 12), and the same images resized to 299 px with PIL bicubic."""
    g, out = torch.Generator().manual_seed(0), {}
    for name, n, shift in (("gen", 10, 0.0), ("real", 12, 30.0)):
        (w / name).mkdir()
        (w / f"{name}-299").mkdir()
        for i in range(n):
            img = _picture(g, shift)
            img.save(w / name / f"{i:03d}.png")
            img.resize((299, 299), Image.BICUBIC).save(w / f"{name}-299" / f"{i:03d}.png")
        out[name] = w / name
    return out


@pytest.fixture(scope="module")
def clip_dir(w):
    """A tiny random CLIPModel saved as safetensors, with an offline byte-level tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from teachers.tiny import clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 515, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(w / "clip", safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(w / "clip")
    return w / "clip"


@pytest.fixture(scope="module")
def run(w, tiny_sdxl_dir):
    cfg = runs.parse_config({"teacher": {"source": str(tiny_sdxl_dir), "resolution": 32},
                             "student": {"kind": "lora", "lora_rank": 4}, "data": {"kind": "digits", "batch_size": 2},
                             "train": {"output_dir": str(w / "run"), "max_steps": 1}})
    train(cfg)
    return w / "run"


@pytest.fixture(scope="module")
def captions(w):
    """COCO-style captions: a .jsonl of {"prompt", "image"} with image paths relative to its folder."""
    g = torch.Generator().manual_seed(1)
    (w / "coco/val").mkdir(parents=True)
    lines = []
    for i in range(6):
        _picture(g, 10.0 * i, size=40).save(w / f"coco/val/{i:03d}.jpg")
        lines.append(json.dumps({"prompt": f"a handwritten digit {i}", "image": f"val/{i:03d}.jpg"}))
    (w / "coco/captions.jsonl").write_text("\n".join(lines) + "\n")
    return w / "coco/captions.jsonl"


def test_fid_kid_precision_recall_equal_torch_fidelity(inception, folders, w):
    import torch_fidelity

    from distill import data

    # torch-fidelity reads a folder's PNGs as they are and resizes inside the network (bilinear, as TF 1.x did),
    # while distill resizes every image to 299 px with PIL bicubic first. Handing torch-fidelity the 32 px images
    # already resized that way makes its inner resize the identity, so both read the same pixels.
    ours = {name: metrics.features(data.EvalImages(data.reference_files(folder)[0], (299, 299)), INCEPTION,
                                   str(inception)) for name, folder in folders.items()}
    got = {**metrics.fid_kid_of_features(ours["gen"], ours["real"], resamples=0, kid_subsets=10, kid_subset_size=5),
           **metrics.precision_recall(ours["gen"], ours["real"], k=3)}
    want = torch_fidelity.calculate_metrics(
        input1=str(w / "gen-299"), input2=str(w / "real-299"), fid=True, kid=True, prc=True, cuda=False,
        feature_extractor=INCEPTION, feature_extractor_weights_path=str(w / "inception.pt"), kid_subsets=10,
        kid_subset_size=5, prc_neighborhood=3, save_cpu_ram=True, cache=False, verbose=False)
    assert got["fid"] > 0 and got["fid"] == pytest.approx(want["frechet_inception_distance"], rel=1e-4)
    assert got["kid"] == pytest.approx(want["kernel_inception_distance_mean"], rel=1e-4)
    assert got["kid_std"] == pytest.approx(want["kernel_inception_distance_std"], rel=1e-4)
    assert (got["precision"], got["recall"]) == (pytest.approx(want["precision"]), pytest.approx(want["recall"]))
    assert got["precision_lo"] <= got["precision"] <= got["precision_hi"]  # Wilson over the 10 generated images
    assert got["recall_lo"] <= got["recall"] <= got["recall_hi"]
    # A set against itself: every sample inside the other's manifold.
    same = metrics.precision_recall(ours["real"], ours["real"])
    assert same["precision"] == same["recall"] == 1.0 and same["precision_lo"] < 1.0


def test_clip_score_equals_a_direct_transformers_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    prompts = ["a red square", "a handwritten digit 7", "noise"]
    got, embeds = metrics.clip_score(images, prompts, clip_dir)
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True, use_safetensors=True)
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in metrics.to_uint8(images)]
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():  # each tower's pooled output through its projection (Radford et al. 2021, fig. 3)
        image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]).pooler_output)
    cos = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    per_image = 100 * cos.clamp(min=0)
    assert got["clip_score"] == pytest.approx(per_image.mean().item(), rel=1e-5)
    half = 1.959964 * per_image.std().item() / 3 ** 0.5
    assert (got["clip_score_lo"], got["clip_score_hi"]) == (pytest.approx(max(0.0, per_image.mean().item() - half),
                                                            abs=1e-4), pytest.approx(per_image.mean().item() + half))
    assert embeds.shape == (3, 16)
    # a COCO caption longer than CLIP's positions is cut, whatever the tokenizer's own limit says; two samples of one
    # prompt are one observation of the interval (its standard error is over prompts)
    long, _ = metrics.clip_score(images, ["a caption " * 80, "a caption " * 80, "noise"], clip_dir)
    assert math.isfinite(long["clip_score"])
    paired, _ = metrics.clip_score(images[[0, 0, 2]], ["a red square", "a red square", "noise"], clip_dir)
    means = torch.tensor([per_image[0].item(), per_image[2].item()], dtype=torch.float64)
    assert paired["clip_score_hi"] - paired["clip_score"] == pytest.approx(1.959964 * means.std().item() / 2 ** 0.5,
                                                                          rel=1e-4)


def test_one_changed_byte_of_the_weights_makes_another_table(run, inception, folders, w, cli):
    from distill import api

    db = w / "weights.sqlite"
    first = api.evaluate(run, 1, prompts=["a handwritten digit 1", "a handwritten digit 2"], num_per_prompt=1,
                         reference=str(folders["real"]), reference_size=4, extractor=INCEPTION,
                         extractor_weights=str(inception), bootstrap=1, db=db, out=w / "grids")
    protocol = first.row["protocol"]
    assert protocol["extractor_weights"] == {"name": inception.name, "sha256": metrics.file_sha256(inception)}
    assert protocol["preprocessing"] == {"resize": "PIL bicubic", "size": [299, 299], "center_crop": False}
    assert protocol["reference"] == "images" and protocol["reference_size"] == 4 and len(protocol["reference_digest"])
    changed = w / "inception-changed.safetensors"
    blob = bytearray(inception.read_bytes())
    blob[-3] ^= 0x01  # one byte of the last tensor's data: still a valid file of the same layout
    changed.write_bytes(bytes(blob))
    moved = {**protocol, "extractor_weights": metrics.weights_identity(changed)}  # what protocol() records
    assert moved["extractor_weights"]["sha256"] != protocol["extractor_weights"]["sha256"]
    assert protocol_id(moved) != protocol_id(protocol)
    (w / "two.txt").write_text("a handwritten digit 1\na handwritten digit 2\n")
    refused = cli("eval", run, "--steps", "1", "--prompts", w / "two.txt", "--num-per-prompt", "1", "--reference",
                  folders["real"], "--reference-size", "4", "--extractor", INCEPTION, "--extractor-weights", changed,
                  "--bootstrap", "1", "--db", db, check=False)
    lines = [ln for ln in refused.stderr.strip().splitlines() if ln.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "extractor_weights" in lines[0] and "--new-table" in lines[0]
    assert metrics.file_sha256(changed)[:12] in lines[0] and "Traceback" not in refused.stderr
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 1


def test_coco_style_captions_evaluate_end_to_end(run, captions, clip_dir, w, cli):
    db = w / "coco.sqlite"
    cli("eval", run, "--steps", "1", "--prompts", captions, "--reference", "prompts", "--num-prompts", "4",
        "--prompt-seed", "3", "--num-per-prompt", "2", "--clip", clip_dir, "--extractor", "distill-digits",
        "--center-crop", "--bootstrap", "20", "--db", db)
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    row = dict(con.execute("SELECT * FROM rows").fetchone())
    for name in ("precision", "recall", "diversity", "clip_score"):
        assert row[name] is not None and row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], name
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["diversity"] <= 2
    protocol = json.loads(row["protocol"])
    chosen = sorted(torch.randperm(6, generator=torch.Generator().manual_seed(3))[:4].tolist())
    assert protocol["prompt_subset"] == {"num_prompts": 4, "prompt_seed": 3} and protocol["samples"] == 8
    assert protocol["prompt_examples"] == [f"a handwritten digit {i}" for i in chosen]
    assert protocol["reference"] == "prompts" and protocol["reference_size"] == 4
    assert protocol["preprocessing"] == {"resize": "PIL bicubic", "size": [32, 32], "center_crop": True}
    assert protocol["clip"] == metrics.weights_identity(clip_dir) and protocol["diversity_features"] == "clip image"
    # The reference's identity: the chosen images' names (relative to the captions' folder) and bytes.
    files = [captions.parent / f"val/{i:03d}.jpg" for i in chosen]
    from distill import data

    assert protocol["reference_digest"] == data.reference_digest(files, captions.parent)


def test_every_recipe_parses(tmp_path):
    recipes = sorted((ROOT / "experiments/eval").glob("*.yaml"))
    assert {r.name for r in recipes} >= {"coco2014_10k.yaml", "coco2014_30k.yaml"}
    for recipe in recipes:
        settings = evaluation.read_recipe(recipe)
        assert settings["reference"] == "prompts" and settings["extractor"] == INCEPTION, recipe
        assert settings["num_prompts"] in (10_000, 30_000) and settings["num_per_prompt"] == 1, recipe
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"num_prompts": "many"}))
    with pytest.raises(evaluation.DistillError, match="num_prompts must be a int"):
        evaluation.read_recipe(bad)


def _bad_inputs(w: Path, run: Path, inception: Path, clip_dir: Path) -> list[tuple[list, str]]:
    (w / "empty").mkdir(exist_ok=True)
    (w / "empty/notes.txt").write_text("no images here")
    shutil.copytree(w / "real", w / "broken", dirs_exist_ok=True)
    (w / "broken/005.png").write_bytes(b"not a png at all")
    (w / "no-images.jsonl").write_text('{"prompt": "a handwritten digit 1"}\n{"prompt": "a handwritten digit 2"}\n')
    save_file({"conv.weight": torch.zeros(2, 2)}, w / "wrong-layout.safetensors")
    torch.save({"weight": Payload()}, w / "payload.pth")
    (w / "not-clip").mkdir(exist_ok=True)
    (w / "not-clip/config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    save_file({"w": torch.zeros(1)}, w / "not-clip/model.safetensors")
    (w / "pickled-clip").mkdir(exist_ok=True)
    shutil.copy(clip_dir / "config.json", w / "pickled-clip/config.json")
    shutil.copy(w / "payload.pth", w / "pickled-clip/pytorch_model.bin")
    base = ["eval", run, "--steps", "1", "--db", w / "bad.sqlite", "--num-per-prompt", "1"]
    real = [*base, "--prompts", w / "coco/captions.jsonl"]
    weights = ["--extractor", INCEPTION, "--extractor-weights"]
    return [
        ([*real, "--reference", w / "empty"], "holds no images"),
        ([*real, "--reference", w / "broken", *weights, inception], "broken/005.png is not a readable image"),
        ([*real, "--reference", "prompts", "--reference-size", "3"], "the counts must agree"),
        ([*base, "--prompts", w / "no-images.jsonl", "--reference", "prompts"], "have no \"image\""),
        ([*real, "--reference", w / "real", *weights, w / "wrong-layout.safetensors"], "does not fit the extractor"),
        ([*real, "--reference", w / "real", *weights, w / "payload.pth"], "distill never runs it"),
        ([*base, "--clip", w / "not-clip"], "is not a CLIP model folder"),
        ([*base, "--clip", w / "pickled-clip"], "holds no .safetensors weights"),
    ]


def test_bad_input_is_refused_in_one_line_before_any_sampling(run, inception, folders, captions, clip_dir, w, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(w)  # a payload that ran would leave its marker here
    monkeypatch.setattr(evaluation, "sample_images", lambda *a, **k: pytest.fail("sampled before refusing"))
    problems = [p for argv, message in _bad_inputs(w, run, inception, clip_dir)
                if (p := refusal_problem(argv, message, capsys))]
    assert not problems, "\n".join(problems)
    assert not (w / MARKER).exists()
