"""Quality metrics: FID / KID through torch-fidelity, and prompt adherence for the digits world.

torch-fidelity computes the statistics; this module gives it a feature extractor that needs no
download: a small digits classifier shipped with distill (`distill/assets/digits_classifier.safetensors`,
retrained by `experiments/train_digits_classifier.py`). Real users can name any extractor
torch-fidelity knows (e.g. `inception-v3-compat`) with a local weights file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from distill.errors import DistillError

CLASSIFIER = Path(__file__).parent / "assets" / "digits_classifier.safetensors"
DIGITS_EXTRACTOR = "distill-digits"


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


def _extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DigitsFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.model = load_classifier()

        @staticmethod
        def get_provided_features_list():
            return ("64", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            feats, logits = self.model(x)
            out = {"64": feats, "logits": logits}
            return tuple(out[name] for name in self.features_list)

    return DigitsFeatures


def register_digits_extractor() -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, _extractor_class())
    return DIGITS_EXTRACTOR


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


def fid_kid(generated: torch.Tensor, reference: torch.Tensor, extractor: str = DIGITS_EXTRACTOR,
            weights: str | None = None) -> dict[str, float]:
    """FID and KID of two image sets ([-1, 1] floats or uint8) under a torch-fidelity feature extractor."""
    import torch_fidelity

    if extractor == DIGITS_EXTRACTOR:
        register_digits_extractor()
    n = min(len(generated), len(reference))
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    try:
        out = torch_fidelity.calculate_metrics(
            input1=_Images(to_uint8(generated)), input2=_Images(to_uint8(reference)), fid=True, kid=True,
            feature_extractor=extractor, kid_subset_size=min(1000, n), kid_subsets=10, cuda=torch.cuda.is_available(),
            verbose=False, save_cpu_ram=True, **kwargs)
    except ValueError as e:
        raise DistillError(f"feature extractor '{extractor}' failed: {str(e).splitlines()[0]}") from e
    return {"fid": float(out["frechet_inception_distance"]), "kid": float(out["kernel_inception_distance_mean"])}


@torch.no_grad()
def adherence(images: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """The share of images the digits classifier reads as their prompted digit."""
    classifier = classifier or load_classifier()
    logits = torch.cat([classifier(to_uint8(chunk))[1] for chunk in images.split(256)])
    return (logits.argmax(1) == labels.to(logits.device)).float().mean().item()
