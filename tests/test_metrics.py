"""Metric code on known inputs: the shipped digits classifier, FID/KID through torch-fidelity, adherence, and the
intervals (FID bootstrap, Wilson) on tiny feature arrays with known answers."""
import pytest
import torch

from distill.metrics import (adherence, digits_split, fid_bootstrap, fid_interval, fid_kid, frechet_distance,
                             load_classifier, wilson)

Z = 1.959964


def _fid(f1, f2):
    return float(frechet_distance(f1.mean(0), torch.cov(f1.T), f2.mean(0), torch.cov(f2.T)))


def test_frechet_distance_matches_torch_fidelity_and_closed_forms():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = b * 1.5 + 0.3
    b[:, 2] = 0  # a dead feature: a singular covariance must still work
    ours = _fid(a, b)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    # Equal covariances: FID is the squared distance of the means, exactly.
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 3.0], dtype=torch.float64)
    assert _fid(a, a + shift) == pytest.approx(float(shift @ shift), abs=1e-8)
    # Isotropic Gaussians N(0, s1^2 I), N(0, s2^2 I): d (s1 - s2)^2.
    eye = torch.eye(4, dtype=torch.float64)
    assert float(frechet_distance(torch.zeros(4), 4 * eye, torch.zeros(4), eye)) == pytest.approx(4.0)


def test_bootstrap_of_identical_sets():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(100, 4, generator=g, dtype=torch.float64)
    reps = fid_bootstrap(f, f, resamples=64, seed=0)
    assert reps.shape == (64,) and (reps > 0).all()  # each resample draws different rows from each side
    lo, hi = fid_interval(0.0, f, f, resamples=64)
    assert lo == 0.0 and 0 < hi == pytest.approx(Z * float(reps.std()))  # the interval holds their FID of 0
    # Every row the same point: every resample is that point, so the interval has no width.
    same = torch.ones(30, 3, dtype=torch.float64)
    assert fid_interval(0.0, same, same, resamples=16) == (0.0, 0.0)
    # A constant set against another constant set: FID is the squared distance, with no width either.
    lo, hi = fid_interval(2.0, same, same + torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), resamples=16)
    assert (lo, hi) == pytest.approx((2.0, 2.0))


def test_bootstrap_interval_covers_a_shift_and_shrinks_with_more_samples():
    g = torch.Generator().manual_seed(2)
    shift = torch.tensor([0.5, 0, 0], dtype=torch.float64)
    widths = []
    for n in (50, 800):
        a, b = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
        fid = _fid(a, b + shift)
        lo, hi = fid_interval(fid, a, b + shift, resamples=100)
        assert lo <= fid <= hi and lo < 0.25 + 0.15 and hi > 0.25 - 0.15  # true FID 0.25
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(n)


def test_wilson_interval_known_cases():
    n = 1000
    assert wilson(0, n) == pytest.approx((0.0, Z * Z / (n + Z * Z)))  # at 0: not the empty [0, 0]
    assert wilson(n, n) == pytest.approx((n / (n + Z * Z), 1.0))  # at n: not the empty [1, 1]
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # the textbook value
    lo, hi = wilson(985, 1000)
    assert lo < 0.985 < hi and hi - lo < 0.02
    with pytest.raises(Exception, match="at least one trial"):
        wilson(0, 0)


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
    assert same["fid_lo"] == 0.0 < same["fid_hi"] < halves["fid_hi"]
    assert halves["fid_lo"] <= halves["fid"] <= halves["fid_hi"] and far["fid_lo"] > halves["fid_hi"]
    assert far["kid_std"] > 0 and halves["kid_std"] > 0
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
                                                    ("digits-sd3", "StableDiffusion3Pipeline", 3.0),
                                                    ("digits-flux", "FluxPipeline", 2.0),
                                                    ("digits-flux-dev", "FluxPipeline", 2.0)])
def test_shipped_digits_teacher_draws_the_prompted_digits(name, pipeline, guidance):
    """Each built-in digits teacher loads with plain diffusers and its 50-step guided samples adhere (CFG; the
    dev-like FLUX teacher's guidance is its input, one pass)."""
    import diffusers

    import teachers
    from distill.config import TeacherConfig
    from distill.sampling import ddim_sample

    pipe = getattr(diffusers, pipeline).from_pretrained(teachers.ZOO[name])
    assert pipe.vae is not None and type(pipe).__name__ == pipeline
    teacher = teachers.load(TeacherConfig(source=f"builtin:{name}", resolution=16))
    assert teacher.guidance_embedded == name.endswith("-dev")
    labels = torch.arange(10).repeat_interleave(5)
    cond = teacher.encode_prompts([f"a handwritten digit {k}" for k in labels.tolist()])
    with torch.no_grad():
        latents = ddim_sample(teacher, cond, 50, torch.Generator().manual_seed(0), teacher.latent_shape(16, 16), guidance)
        images = teacher.decode(latents).clamp(-1, 1)
    acc = adherence(images, labels)
    print(f"{name} 50-step CFG adherence {acc:.3f}")
    assert acc >= 0.9
