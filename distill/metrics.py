"""Quality metrics: FID / KID, precision and recall on torch-fidelity's features, within-prompt diversity, CLIP score
from a local CLIP folder, and prompt adherence for the digits world. Every figure comes with a 95% interval.

torch-fidelity extracts the features; this module gives it a feature extractor that needs no
download: a small digits classifier shipped with distill (`distill/assets/digits_classifier.safetensors`,
retrained by `experiments/train_digits_classifier.py`). Real users can name torch-fidelity's
`inception-v3-compat` or `vgg16` with a local weights file. torch-fidelity would unpickle that file
(torch.load with weights_only=False), so distill never hands it the user's path: it reads the tensors
itself (safetensors, or torch.load with weights_only=True) and gives torch-fidelity a copy it wrote.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from distill import paths
from distill.errors import DistillError

CLASSIFIER = Path(__file__).parent / "assets" / "digits_classifier.safetensors"
DIGITS_EXTRACTOR = "distill-digits"
PAIRS_EXTRACTOR = "distill-digit-pairs"  # the classifier's features of each half of an image, concatenated
STACKS_EXTRACTOR = "distill-digit-stacks"  # the same, of its top and bottom halves
# our extractors: into how many digits an image is cut, along which axis (-1: side by side, -2: stacked)
HALVES = {DIGITS_EXTRACTOR: (1, -1), PAIRS_EXTRACTOR: (2, -1), STACKS_EXTRACTOR: (2, -2)}


class DigitsClassifier(nn.Module):
    """A small CNN on 16x16 grey digits: a 64-d feature (for FID/KID) and 10 logits (for adherence)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)
        # Features are divided by their RMS over the training digits, so KID's cubic kernel sees O(1) values.
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3|1, H, W] or float [-1, 1] images -> float grey [B, 1, 16, 16] in [0, 1]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else (images.float() + 1) / 2
        x = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
        return nn.functional.interpolate(x, size=16, mode="bilinear", antialias=True, align_corners=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(self.prepare(images))
        return feats / self.feature_scale, self.head(feats)


def digits_split(seed: int = 0, held_out: int = 297):
    """scikit-learn's digits as [-1, 1] images [N, 1, 8, 8] with labels, split into (train, held-out) by a
    seeded permutation: the split the shipped classifier was trained and measured on."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = torch.from_numpy(d.images).float()[:, None] / 16.0 * 2 - 1, torch.from_numpy(d.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, test = order[held_out:], order[:held_out]
    return (images[train], labels[train]), (images[test], labels[test])


def load_classifier(path: Path = CLASSIFIER) -> DigitsClassifier:
    if not Path(path).is_file():
        raise DistillError(f"digits classifier weights missing at {path}; run experiments/train_digits_classifier.py")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


def halves(images: torch.Tensor, n: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    """An image of n digits side by side ([B, C, H, n W], dim -1) or stacked ([B, C, n H, W], dim -2), cut into the
    n digits."""
    if images.shape[dim] % n:
        raise DistillError(f"images {images.shape[dim]} px {'wide' if dim == -1 else 'high'} cannot be cut into {n} "
                           "equal digits")
    return images.chunk(n, dim=dim)


def _extractor_class(n: int, dim: int):
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    width = str(64 * n)
    dummy = (16 * n, 16) if dim == -2 else (16, 16 * n)

    class DigitsFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.model = load_classifier()

        @staticmethod
        def get_provided_features_list():
            return (width, "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return width

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, *dummy, dtype=torch.uint8)

        def forward(self, x):
            parts = [self.model(part) for part in halves(x, n, dim)]
            out = {width: torch.cat([f for f, _ in parts], 1), "logits": torch.cat([lg for _, lg in parts], 1)}
            return tuple(out[name] for name in self.features_list)

    return DigitsFeatures


def register_digits_extractor(name: str = DIGITS_EXTRACTOR) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _extractor_class(*HALVES[name]))
    return name


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 RGB [B, 3, H, W], as torch-fidelity reads them."""
    if images.dtype == torch.uint8:
        return images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x if x.shape[1] == 3 else x.expand(-1, 3, -1, -1).contiguous()


def fid_layer(extractor: str) -> str:
    """The layer of a registered torch-fidelity extractor that FID reads; refuses an unknown name, so callers
    check it before sampling anything."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if extractor in HALVES:
        register_digits_extractor(extractor)
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise DistillError(f"feature extractor '{extractor}' failed: it is not registered with torch-fidelity")
    return FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")


# torch-fidelity's extractors that read a state dict from a weights file. The others take no file (CLIP's is a
# TorchScript archive, DINOv2 has no local loading) and would download their weights, which distill never does.
READS_WEIGHTS = ("inception-v3-compat", "vgg16")


def read_weights(path: str | Path, what: str = "--extractor-weights") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without running any of its code: safetensors, or a torch.save file
    through torch.load(weights_only=True), which refuses any pickle that builds more than tensors and containers."""
    path = paths.regular_file(Path(path), what)
    try:
        return load_file(str(path))
    except Exception:  # noqa: BLE001 (safetensors raises its own types): not safetensors, maybe a torch.save file
        pass
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):  # torch.save's zip, or its older bare pickle
        raise DistillError(f"{what} {path} is neither a safetensors nor a torch.save weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load reads a .safetensors name with safetensors, whose errors differ)
        if "weights only load failed" in str(e).lower():
            raise DistillError(f"{what} {path} holds a pickle that asks to run code or build objects other than "
                               "tensors; distill never runs it: save the weights as safetensors") from e
        raise DistillError(f"{what} {path} is neither a safetensors nor a torch.save weights file") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise DistillError(f"{what} {path} does not hold a state dict (names to tensors)")
    return state


def check_extractor(extractor: str, weights: str | None) -> None:
    """Refuse, before any sampling, an extractor that is unknown, would download its weights, ignores the weights
    given, or cannot be built from them."""
    fid_layer(extractor)
    if weights and extractor not in READS_WEIGHTS:
        why = "its own weights ship with distill" if extractor in HALVES else "distill cannot read its weights safely"
        raise DistillError(f"--extractor-weights has no effect with the extractor '{extractor}' ({why}); it is read "
                           f"for {', '.join(READS_WEIGHTS)}")
    if not weights and (extractor in READS_WEIGHTS or extractor.startswith(("clip-", "dinov2-"))):
        raise DistillError(f"the extractor '{extractor}' needs local weights (distill downloads nothing): give "
                           "--extractor-weights FILE" if extractor in READS_WEIGHTS else
                           f"the extractor '{extractor}' would download its weights, which distill never does; use "
                           f"{', '.join(READS_WEIGHTS)} with --extractor-weights")
    if weights:
        build_extractor(extractor, fid_layer(extractor), weights, cuda=False)


def build_extractor(extractor: str, layer: str, weights: str | None, cuda: bool):
    """torch-fidelity's extractor, given the tensors distill read from `weights` in a file distill wrote."""
    from torch_fidelity.utils import create_feature_extractor

    if not weights:
        if extractor not in HALVES:  # any other would fetch its weights (torch-fidelity downloads on first use)
            raise DistillError(f"the extractor '{extractor}' needs local weights (distill downloads nothing): give "
                               f"--extractor-weights FILE for {', '.join(READS_WEIGHTS)}")
        return create_feature_extractor(extractor, [layer], cuda=cuda, verbose=False)
    state = read_weights(weights)
    with tempfile.TemporaryDirectory(prefix="distill-extractor-") as tmp:
        own = Path(tmp) / "weights.pt"
        torch.save(state, own)  # tensors only: torch-fidelity unpickles it without weights_only, and runs nothing
        try:
            return create_feature_extractor(extractor, [layer], cuda=cuda, verbose=False,
                                            feature_extractor_weights_path=str(own))
        except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
            raise DistillError(f"--extractor-weights {weights} does not fit the extractor '{extractor}': "
                               f"{' '.join(str(e).split())[:200]}") from e


def features(images, extractor: str = DIGITS_EXTRACTOR, weights: str | None = None) -> torch.Tensor:
    """[N, D] float64 features at the layer torch-fidelity uses for FID, of an image set: [-1, 1] floats or uint8
    [N, C, H, W], or a Dataset of uint8 [3, H, W] images (read one batch at a time)."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    layer = fid_layer(extractor)
    cuda = torch.cuda.is_available()
    dataset = _Images(to_uint8(images)) if torch.is_tensor(images) else images
    try:
        net = build_extractor(extractor, layer, weights, cuda)
        out = get_featuresdict_from_dataset(dataset, net, 64, cuda, True, False)
    except ValueError as e:
        raise DistillError(f"feature extractor '{extractor}' failed: {str(e).splitlines()[0]}") from e
    return out[layer].double()


_RECENT: dict = {}  # (extractor, weights, digest of the images) -> features: a pure memo, results are unchanged


def features_of_reference(images, extractor: str = DIGITS_EXTRACTOR, weights: str | None = None) -> torch.Tensor:
    """`features`, remembered for the last few image sets: every row of a benchmark is scored against the same
    real images (and the same teacher samples), whose features would otherwise be extracted again each time. A
    Dataset is remembered by its `digest` (with its size and crop), or not at all without one."""
    if torch.is_tensor(images):
        digest = hashlib.sha1(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (extractor, weights, tuple(images.shape), str(images.dtype), digest)
    elif getattr(images, "digest", None):
        key = (extractor, weights, images.digest, len(images), images.size, images.center_crop)
    else:
        return features(images, extractor, weights)
    if key not in _RECENT:
        while len(_RECENT) >= 4:
            _RECENT.pop(next(iter(_RECENT)))
        _RECENT[key] = features(images, extractor, weights)
    return _RECENT[key]


def _moments(x: torch.Tensor, outer: torch.Tensor | None, counts: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [B, D] and unbiased covariances [B, D, D] of B resamples of x [N, D], each given by how many times it
    draws every row (counts [B, N]; None: x itself, once), without materialising the resampled sets. `outer`
    [N, D*D] holds each row's x_i x_i^T, so every resample's second moment is one row of a single matrix product;
    without it (None), each resample's is x^T diag(c) x, which needs only D*D memory (2,048 features)."""
    n, d = x.shape
    counts = torch.ones(1, n, dtype=x.dtype) if counts is None else counts
    mu = counts @ x / n
    if outer is not None:
        second = (counts @ outer).view(-1, d, d)
    else:
        second = torch.stack([x.T @ (c[:, None] * x) for c in counts])
    return mu, (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), batched over leading dimensions (Dowson & Landau 1982;
    FID: Heusel et al. 2017). With S1 = L L^T, S1 S2 is similar to L^T S2 L, which is symmetric PSD, so the trace
    of the root is the sum of the roots of its eigvalsh, all real. (Eigenvectors are not needed and cost 20x.)
    A jitter of 1e-10 of the mean variance lets Cholesky take a singular S1 (dead ReLU features)."""
    eye = torch.eye(cov1.shape[-1], dtype=cov1.dtype)
    scale = torch.diagonal(cov1, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[..., None, None]
    chol = torch.linalg.cholesky(cov1 + 1e-10 * scale * eye)
    inner = torch.linalg.eigvalsh(chol.transpose(-1, -2) @ cov2 @ chol).clamp(min=0).sqrt().sum(-1)
    diff = mu1 - mu2
    trace = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    return (diff * diff).sum(-1) + trace - 2 * inner


def frechet_of_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The Frechet distance of two feature sets' Gaussians, from symmetric eigenvalue problems only (torch-fidelity's
    general eigvals of S1 S2 agrees with it, tests/test_eval_real.py, at ten times the cost for 2,048 features).
    When a set has fewer samples n than features, its covariance is A^T A / (n - 1) with A its centred features, and
    tr (S1 S2)^(1/2) is read from the n x n matrix A S_other A^T / (n - 1), which has the same nonzero eigenvalues."""
    f1, f2 = f1.double().cpu(), f2.double().cpu()
    small, other = (f1, f2) if len(f1) <= len(f2) else (f2, f1)
    if len(small) >= small.shape[1]:
        (m1, c1), (m2, c2) = _moments(f1, None, None), _moments(f2, None, None)
        return float(frechet_distance(m1, c1, m2, c2))
    a, b = small - small.mean(0), other - other.mean(0)
    cov_other = b.T @ b / (len(b) - 1)
    inner = torch.linalg.eigvalsh(a @ cov_other @ a.T / (len(a) - 1)).clamp(min=0).sqrt().sum()
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a * a).sum() / (len(a) - 1) + cov_other.trace() - 2 * inner)


def _counts(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """[resamples, n]: how often each of n rows is drawn in each resample of n draws with replacement."""
    draws = torch.randint(n, (resamples, n), generator=generator)
    ones = torch.ones_like(draws, dtype=torch.float64)
    return torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, draws, ones)


def fid_bootstrap(f1: torch.Tensor, f2: torch.Tensor, resamples: int = 200, seed: int = 0,
                  chunk: int = 50) -> torch.Tensor:
    """FID of `resamples` bootstrap resamples (Efron 1979): both feature sets are resampled with replacement, each
    independently, since both are finite samples. Memory: N x D^2 for the outer products, chunk x N for counts."""
    generator, out = torch.Generator().manual_seed(seed), []
    f1, f2 = f1.double().cpu(), f2.double().cpu()
    # Outer products cost N x D^2 memory: kept under 2**27 numbers (1 GiB), else each resample is formed directly.
    o1, o2 = ((f[:, :, None] * f[:, None, :]).flatten(1) if f.shape[0] * f.shape[1] ** 2 <= 2**27 else None
              for f in (f1, f2))
    for lo in range(0, resamples, chunk):
        b = min(chunk, resamples - lo)
        m1, c1 = _moments(f1, o1, _counts(len(f1), b, generator))
        m2, c2 = _moments(f2, o2, _counts(len(f2), b, generator))
        out.append(frechet_distance(m1, c1, m2, c2))
    return torch.cat(out)


def fid_interval(fid: float, f1: torch.Tensor, f2: torch.Tensor, resamples: int = 200, seed: int = 0,
                 z: float = 1.959964) -> tuple[float, float]:
    """95% interval of an FID: the standard bootstrap interval fid +- z * se, se the standard deviation of the
    bootstrap replicates (Efron & Tibshirani 1993, ch. 6 and 12). Not the percentile interval: resampling adds
    duplicate rows, which biases a resampled FID upwards, so the percentiles for two identical sets would exclude
    their FID of 0. The lower end is clipped at 0, below which no FID lies."""
    se = float(fid_bootstrap(f1, f2, resamples, seed).std()) if resamples > 1 else 0.0
    return max(0.0, fid - z * se), fid + z * se


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (Wilson 1927, JASA 22:209): unlike p +- z se it stays
    inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        raise DistillError("a proportion needs at least one trial")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def fid_kid(generated, reference, extractor: str = DIGITS_EXTRACTOR, weights: str | None = None,
            resamples: int = 200, seed: int = 0, kid_subsets: int = 10) -> dict[str, float]:
    """FID with its 95% bootstrap interval (fid_lo, fid_hi) and KID with its std over subsets (kid_std), of two image
    sets (as `features` takes them) under a torch-fidelity feature extractor."""
    if min(len(generated), len(reference)) < 2:
        raise DistillError(f"FID/KID need at least 2 images in each set (got {len(generated)} and {len(reference)})")
    f1, f2 = features(generated, extractor, weights), features_of_reference(reference, extractor, weights)
    return fid_kid_of_features(f1, f2, resamples, seed, kid_subsets)


def fid_kid_of_features(f1: torch.Tensor, f2: torch.Tensor, resamples: int = 200, seed: int = 0,
                        kid_subsets: int = 10, kid_subset_size: int | None = None) -> dict[str, float]:
    """FID (`frechet_distance`) and KID (torch-fidelity's own function, with its std over `kid_subsets` subsets) of
    generated features f1 against reference features f2; the FID interval from `fid_interval` (`resamples`
    bootstrap replicates; 0 gives a zero-width interval)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if min(len(f1), len(f2)) < 2:
        raise DistillError(f"FID/KID need at least 2 images in each set (got {len(f1)} and {len(f2)})")
    fid = max(0.0, frechet_of_features(f1, f2))  # a negative FID is round-off, never real
    # Subsets of half the smaller set (at most torch-fidelity's 1,000): subsets as large as the set would all be the
    # whole set again, and their std would say nothing.
    size = kid_subset_size or max(2, min(1000, min(len(f1), len(f2)) // 2))
    kid = kid_features_to_metric(f1.float(), f2.float(), kid_subsets=kid_subsets, kid_subset_size=size, verbose=False)
    lo, hi = fid_interval(fid, f1, f2, resamples, seed)
    return {"fid": fid, "fid_lo": lo, "fid_hi": hi, "kid": float(kid[KEY_METRIC_KID_MEAN]),
            "kid_std": float(kid[KEY_METRIC_KID_STD])}


PRC_NEIGHBOURS = 3  # k of Kynkaanniemi et al. 2019 (and torch-fidelity's prc_neighborhood)


def precision_recall(f_gen: torch.Tensor, f_ref: torch.Tensor, k: int = PRC_NEIGHBOURS) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models", eq. 1-3): each set's manifold is the union of balls reaching every feature's k-th nearest
    neighbour in its own set; precision is the share of generated samples inside the reference manifold, recall the
    share of reference samples inside the generated one. Computed by torch-fidelity's own function (`prc`), here on
    the features distill already extracted for FID (torch-fidelity's `prc` defaults to vgg16's instead). Each share
    has a 95% Wilson interval over its samples: it covers the sampling of the tested set, not the estimate of the
    other set's manifold, nor the correlation of samples of one prompt, so it is narrower than a full bootstrap."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    if min(len(f_gen), len(f_ref)) <= k:
        raise DistillError(f"precision/recall with k={k} neighbours need more than {k} images in each set (got "
                           f"{len(f_gen)} generated and {len(f_ref)} reference)")
    precision, recall = calculate_precision_recall_part(f_gen.float(), f_ref.float(), k)  # in blocks of 10,000
    return {**proportion("precision", round(precision * len(f_gen)), len(f_gen)),
            **proportion("recall", round(recall * len(f_ref)), len(f_ref))}


def proportion(name: str, successes: int, n: int) -> dict[str, float]:
    """{name: successes / n, name_lo, name_hi: its 95% Wilson interval}."""
    lo, hi = wilson(successes, n)
    return {name: successes / n, f"{name}_lo": lo, f"{name}_hi": hi}


def diversity(feats: torch.Tensor, groups: list, resamples: int = 200, seed: int = 0) -> dict[str, float]:
    """Within-prompt diversity: for each prompt (`groups`, one label per sample) with two samples or more, the mean
    cosine distance 1 - cos(f_i, f_j) over its pairs of samples; the set's figure is the mean over those prompts,
    with a 95% percentile bootstrap interval over prompts (Efron 1979). {} when no prompt has two samples."""
    f = torch.nn.functional.normalize(feats.double(), dim=1)
    index: dict = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    means = []
    for rows in index.values():
        if len(rows) >= 2:
            n, sim = len(rows), f[rows] @ f[rows].T
            means.append((n * (n - 1) - (sim.sum() - sim.diagonal().sum())) / (n * (n - 1)))
    if not means:
        return {}
    means = torch.stack(means)
    draws = torch.randint(len(means), (max(1, resamples), len(means)), generator=torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(means[draws].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    mean = float(means.mean())
    return {"diversity": mean, "diversity_lo": min(lo, mean), "diversity_hi": max(hi, mean)}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clip_files(folder: str | Path) -> list[Path]:
    """The safetensors weights of a CLIP folder, sorted: all that distill reads of its weights."""
    return sorted(Path(folder).glob("*.safetensors"))


def weights_identity(path: str | Path) -> dict[str, str]:
    """{"name", "sha256"} of a weights file, or of a model folder (every file's digest, hashed in name order: the
    weights, and the config, tokenizer and preprocessor that change what the model computes)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file())
        joined = "\n".join(f"{f.name} {file_sha256(f)}" for f in files)
        return {"name": path.name, "sha256": hashlib.sha256(joined.encode()).hexdigest()}
    return {"name": path.name, "sha256": file_sha256(path)}


def load_clip(folder: str | Path):
    """transformers' CLIPModel and CLIPProcessor from a local folder: safetensors weights only, nothing fetched.
    Anything else (not a folder, not a CLIP model, pickled weights, no tokenizer) is one line naming the folder."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DistillError(f"--clip {folder} is not a folder; give a local CLIP model folder (config.json, "
                           "model.safetensors, tokenizer and preprocessor files)")
    if not clip_files(folder):
        raise DistillError(f"--clip {folder} holds no .safetensors weights; distill reads CLIP weights only as "
                           "safetensors (save_pretrained(safe_serialization=True))")
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers raises OSError, ValueError, KeyError... for a foreign folder)
        raise DistillError(f"--clip {folder} is not a CLIP model folder ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:160]})") from e
    return model.eval().requires_grad_(False), processor


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], folder: str | Path,
               batch_size: int = 32) -> tuple[dict[str, float], torch.Tensor]:
    """CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1, with w = 100 as torchmetrics has it): per image
    100 * max(cos(E_image, E_text), 0), averaged, with a 95% interval mean +- 1.96 standard errors of the per-prompt
    means; and the images' CLIP embeddings [N, D]. The processor resizes and crops the images as the model was trained."""
    model, processor = load_clip(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    positions = model.config.text_config.max_position_embeddings  # captions longer than this are cut, not refused
    scores, embeds = [], []
    for lo in range(0, len(images), batch_size):
        pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in to_uint8(images[lo:lo + batch_size])]
        inputs = processor(text=prompts[lo:lo + batch_size], images=pil, return_tensors="pt", padding=True,
                           truncation=True, max_length=positions).to(device)
        out = model(**inputs)
        img = out.image_embeds
        cos = torch.nn.functional.cosine_similarity(img, out.text_embeds, dim=-1)
        scores.append(100 * cos.clamp(min=0).double().cpu())
        embeds.append(img.double().cpu())
    s = torch.cat(scores)
    # the standard error over prompts: samples of one prompt are not independent draws of the score
    groups: dict = {}
    for score, prompt in zip(s.tolist(), prompts):
        groups.setdefault(prompt, []).append(score)
    means = torch.tensor([sum(v) / len(v) for v in groups.values()], dtype=torch.float64)
    half = 1.959964 * float(means.std()) / math.sqrt(len(means)) if len(means) > 1 else 0.0
    mean = float(s.mean())
    return {"clip_score": mean, "clip_score_lo": max(0.0, mean - half), "clip_score_hi": mean + half}, \
        torch.cat(embeds)


@torch.no_grad()
def read_digits(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> torch.Tensor:
    """The digit the classifier reads in each image."""
    classifier = classifier or load_classifier()
    return torch.cat([classifier(to_uint8(chunk))[1].argmax(1).cpu() for chunk in images.split(256)])


def adherence(images: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """The share of images the digits classifier reads as their prompted digit."""
    return (read_digits(images, classifier) == labels.cpu()).float().mean().item()


def share_interval(name: str, correct: torch.Tensor) -> dict[str, float]:
    """{name: share of True, name_lo, name_hi: its 95% Wilson interval} over the len(correct) trials."""
    return proportion(name, int(correct.sum()), len(correct))


def adherence_interval(images: torch.Tensor, labels: torch.Tensor,
                       classifier: DigitsClassifier | None = None) -> dict[str, float]:
    """Adherence with its 95% Wilson interval (adherence_lo, adherence_hi) over the len(images) trials."""
    return share_interval("adherence", read_digits(images, classifier) == labels.cpu())


def pair_adherence(images: torch.Tensor, left: torch.Tensor, right: torch.Tensor, held_out: torch.Tensor,
                   classifier: DigitsClassifier | None = None, stacked: bool = False) -> dict[str, float]:
    """Adherence of images of two digits side by side (`stacked`: one above the other) to prompts naming both, each
    share with its Wilson interval: left (top) digit right (adherence_left, adherence_top), right (bottom) digit
    right (adherence_right, adherence_bottom), both right (adherence, the headline), and both right on the prompts
    a teacher never trained on (`held_out` True: adherence_held_out) and on the others (adherence_seen). A part with
    no prompts is left out."""
    classifier = classifier or load_classifier()
    first, second = halves(images, 2, -2 if stacked else -1)
    left_ok = read_digits(first, classifier) == left.cpu()
    right_ok = read_digits(second, classifier) == right.cpu()
    both, held_out = left_ok & right_ok, held_out.cpu().bool()
    names = ("adherence_top", "adherence_bottom") if stacked else ("adherence_left", "adherence_right")
    parts = {"adherence": both, names[0]: left_ok, names[1]: right_ok,
             "adherence_held_out": both[held_out], "adherence_seen": both[~held_out]}
    return {k: v for name, part in parts.items() if len(part) for k, v in share_interval(name, part).items()}
