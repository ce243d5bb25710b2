"""Metric code on known inputs: the shipped digits classifier, FID/KID through torch-fidelity, adherence."""
import pytest
import torch

from distill.metrics import adherence, digits_split, fid_kid, load_classifier


def test_shipped_classifier_reads_held_out_digits():
    _, (images, labels) = digits_split()
    acc = adherence(images, labels)
    print(f"held-out accuracy {acc:.4f}")
    assert acc >= 0.95


def test_fid_kid_of_a_set_against_itself_and_against_others():
    (train, train_labels), (test, _) = digits_split()
    a, b = train[:600], train[600:1200]
    same = fid_kid(a, a)
    halves = fid_kid(a, b)
    noise = torch.rand(600, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    far = fid_kid(noise, b)
    ones = train[train_labels == 1][:150]
    one_digit = fid_kid(ones.repeat(4, 1, 1, 1), b)
    print(f"FID self {same['fid']:.4f}, halves {halves['fid']:.3f}, one digit {one_digit['fid']:.3f}, "
          f"noise {far['fid']:.3f}; KID self {same['kid']:.5f}, noise {far['kid']:.4f}")
    assert abs(same["fid"]) < 1e-3
    assert far["fid"] > 20 * halves["fid"] and one_digit["fid"] > 5 * halves["fid"]
    # KID is unbiased, so a set against itself scores near 0 (slightly negative), far below other sets.
    assert abs(same["kid"]) < 0.01 * far["kid"] and far["kid"] > 20 * abs(halves["kid"])


def test_unknown_feature_extractor_is_a_clear_error():
    (train, _), _ = digits_split()
    with pytest.raises(Exception, match="not registered|failed"):
        fid_kid(train[:20], train[20:40], extractor="no-such-extractor")


def test_adherence_counts_the_prompted_digit():
    _, (images, labels) = digits_split()
    classifier = load_classifier()
    assert adherence(images, labels, classifier) > 0.95 > adherence(images, (labels + 1) % 10, classifier)


@pytest.mark.parametrize("name,pipeline,guidance", [("digits-sdxl", "StableDiffusionXLPipeline", 5.0),
                                                    ("digits-sd3", "StableDiffusion3Pipeline", 3.0)])
def test_shipped_digits_teacher_draws_the_prompted_digits(name, pipeline, guidance):
    """Each built-in digits teacher loads with plain diffusers and its 50-step CFG samples adhere."""
    import diffusers

    import teachers
    from distill.config import TeacherConfig
    from distill.sampling import ddim_sample

    pipe = getattr(diffusers, pipeline).from_pretrained(teachers.ZOO[name])
    assert pipe.vae is not None and type(pipe).__name__ == pipeline
    teacher = teachers.load(TeacherConfig(source=f"builtin:{name}", resolution=16))
    labels = torch.arange(10).repeat_interleave(10)
    cond = teacher.encode_prompts([f"a handwritten digit {k}" for k in labels.tolist()])
    with torch.no_grad():
        latents = ddim_sample(teacher, cond, 50, torch.Generator().manual_seed(0), teacher.latent_shape(16, 16), guidance)
        images = teacher.decode(latents).clamp(-1, 1)
    acc = adherence(images, labels)
    print(f"{name} 50-step CFG adherence {acc:.3f}")
    assert acc >= 0.9
