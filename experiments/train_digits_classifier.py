"""Train the digits classifier that distill ships as its offline FID/KID feature extractor.

Data: scikit-learn's bundled digits; 297 images (a seeded random choice) are held out. Run from the repository root:
    python experiments/train_digits_classifier.py
It rewrites distill/assets/digits_classifier.safetensors and prints the held-out accuracy.
"""
import torch
from safetensors.torch import save_file

from distill.metrics import CLASSIFIER, DigitsClassifier, digits_split

SEED, EPOCHS = 0, 40


def main():
    torch.manual_seed(SEED)
    (train_x, train_y), (test_x, test_y) = digits_split(SEED)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        for idx in torch.randperm(len(train_x), generator=g).split(64):
            x = train_x[idx] + 0.1 * torch.randn(train_x[idx].shape, generator=g)  # mild pixel noise
            loss = torch.nn.functional.cross_entropy(model(x)[1], train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        model.feature_scale.fill_(model(train_x)[0].pow(2).mean().sqrt())
        acc = (model(test_x)[1].argmax(1) == test_y).float().mean().item()
    CLASSIFIER.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER))
    print(f"held-out accuracy {acc:.4f} on {len(test_x)} digits; wrote {CLASSIFIER}")


if __name__ == "__main__":
    main()
