"""Step one of the built-in digits teachers: a small VAE trained on scikit-learn's digits.

It starts from a tiny pipeline (teachers/tiny.py), trains that pipeline's VAE to reconstruct the
digits at `--resolution` pixels, sets the latent scaling factor to 1 / std of the latents, and saves
the whole pipeline (still with an untrained backbone) for step two, the denoising pre-training with
`distill train experiments/digits_teacher_<family>.yaml`.

    python experiments/train_digits_vae.py sdxl runs/digits-sdxl-init --steps 800
    python experiments/train_digits_vae.py sd3 runs/digits-sd3-init --steps 800
    python experiments/train_digits_vae.py flux runs/digits-flux-init --steps 800
"""
import argparse
import time
from pathlib import Path

import torch

from distill.digits import Digits
from teachers import tiny


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("family", choices=["sdxl", "sd3", "flux"])
    ap.add_argument("out")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # The SD3 and FLUX transformers need more width and depth than the test-sized ones to learn the digits; the
    # FLUX one has no guidance input (a CFG teacher; the dev-like one is distilled from it).
    pipe = {"sdxl": lambda: tiny.tiny_sdxl(seed=args.seed),
            "sd3": lambda: tiny.tiny_sd3(args.seed, layers=4, head_dim=16),
            "flux": lambda: tiny.tiny_flux(seed=args.seed, layers=2, single_layers=2, head_dim=16, heads=4)}[args.family]()
    vae = pipe.vae.train().requires_grad_(True)
    ds = Digits(args.resolution)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    start = time.time()
    for step in range(args.steps):
        x = images[torch.randint(0, len(images), (64,), generator=g)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(g)).sample
        loss = (recon - x).pow(2).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step} reconstruction mse {(recon - x).pow(2).mean().item():.5f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        flow = args.family != "sdxl"  # SD3's and FLUX's VAEs shift their latents, SDXL's does not
        shift = float(latents.mean()) if flow else 0.0
        scale = 1.0 / float((latents - shift).std())
        vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if flow else {}))
        err = (vae.decode(latents).sample - images).pow(2).mean().item()
    pipe.save_pretrained(Path(args.out), safe_serialization=True)
    print(f"VAE: reconstruction mse {err:.5f}, scaling_factor {scale:.4f}, {time.time() - start:.0f} s; "
          f"saved the pipeline to {args.out}")


if __name__ == "__main__":
    main()
