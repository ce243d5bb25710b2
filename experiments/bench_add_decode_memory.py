"""Peak host memory of decoding latents to pixels with gradients, as ADD's student turn does.

Builds SDXL's VAE from its published config (random weights: memory does not depend on them) and, in a
fresh process per case, measures peak RSS of decode -> sum -> backward against a no-grad decode of the
same size. Run: python experiments/bench_add_decode_memory.py [pixels ...]
"""
import json
import subprocess
import sys

CASE = r"""
import json, resource, sys, torch
from diffusers import AutoencoderKL
torch.set_num_threads(2)
px, grad = int(sys.argv[1]), sys.argv[2] == "grad"
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    norm_num_groups=32, sample_size=1024).requires_grad_(False)
z = torch.randn(1, 4, px // 8, px // 8, requires_grad=grad)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.set_grad_enabled(grad):
    out = vae.decode(z).sample
    if grad:
        out.float().square().mean().backward()
print(json.dumps({"px": px, "grad": grad, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mb": base / 1024}))
"""


def main(sizes):
    rows = []
    for px in sizes:
        for mode in ("nograd", "grad"):
            out = subprocess.run([sys.executable, "-c", CASE, str(px), mode], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| pixels | decode | peak RSS MB | over the loaded model MB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['px']} | {'with grad' if r['grad'] else 'no grad'} | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['before_mb']:.0f} |")
    for px in sizes:
        g, n = [r for r in rows if r["px"] == px and r["grad"]][0], [r for r in rows if r["px"] == px and not r["grad"]][0]
        print(f"\n{px}px: decoding with gradients costs {(g['peak_mb'] - g['before_mb']) / max(n['peak_mb'] - n['before_mb'], 1):.1f}x "
              "the memory of a no-grad decode (fp32, batch 1)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [256, 512])
