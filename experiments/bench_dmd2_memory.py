"""Peak host memory of one DMD2 training step with a LoRA student, against a plain LoRA fine-tune step of the same
backbone, and against DMD2 with the fake score as a separate full copy (what the reference code does).

Builds an SDXL pipeline whose UNet has SDXL's channel widths (320, 640, 1280) with one transformer layer per block
(random weights: memory does not depend on them; tiny text encoders and VAE), then, in a fresh process per case,
runs one optimiser step of every turn as the trainer does (AdamW per turn, only the turn's parameters trainable)
and reads the peak resident memory. Run: python experiments/bench_dmd2_memory.py [--resolution 64] [--batch 2]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "lora fine-tune (denoise)": {"name": "denoise", "params": {}},
    "DMD2, fake score = 2nd LoRA adapter": {"name": "dmd2", "params": {"student_steps": 4, "fake_score": "adapter"}},
    "DMD2, fake score = full copy": {"name": "dmd2", "params": {"student_steps": 4, "fake_score": "copy"}},
}

STEP = r"""
import json, resource, sys, torch
from distill import data, runs
from distill.runs import build_method
from distill.trainer import encode_batch, select_turn, step_generator
torch.set_num_threads(2)
teacher, method, resolution, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = runs.parse_config({"teacher": {"source": teacher, "resolution": resolution},
                    "student": {"kind": "lora", "lora_rank": 64}, "method": method,
                    "data": {"kind": "digits", "batch_size": batch}, "train": {"output_dir": "unused"}})
m = build_method(cfg, "cpu")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
loaded = rss()
turn_params = {t: m.parameters_for(t) for t in m.turns}
opts = {t: torch.optim.AdamW(p, lr=1e-5) for t, p in turn_params.items()}
raw = data.collate([data.build(cfg.data, resolution)[i] for i in range(batch)])
for i, turn in enumerate(m.turns):
    select_turn(turn_params, turn)
    m.loss(encode_batch(raw, m.teacher, step_generator(0, 0, 0, i)), turn).loss.backward()
    opts[turn].step()
    opts[turn].zero_grad(set_to_none=True)
trainable = sum(p.numel() for ps in turn_params.values() for p in ps)
base = sum(p.numel() for p in m.teacher.backbone.parameters()) - sum(
    p.numel() for n, p in m.teacher.backbone.named_parameters() if "lora_" in n)
print(json.dumps({"loaded_mb": loaded, "peak_mb": rss(), "trainable": trainable, "base": base}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from teachers import tiny

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.build("tiny-sdxl", Path(tmp) / "sdxl-width", block_out_channels=(320, 640, 1280),
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 1, 1),
                            norm_num_groups=32)
        rows = {}
        for label, method in CASES.items():
            out = subprocess.run([sys.executable, "-c", STEP, str(folder), json.dumps(method), str(args.resolution),
                                  str(args.batch)], capture_output=True, text=True, check=True)
            rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    base = next(iter(rows.values()))
    print(f"UNet with SDXL's widths, {base['base'] / 1e6:.0f} M base parameters, fp32, LoRA rank 64, "
          f"{args.resolution} px, batch {args.batch}, one step of every turn\n")
    print("| case | trainable params (M) | peak RSS MB | over the loaded teacher MB | peak vs fine-tune |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['trainable'] / 1e6:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] - base['loaded_mb']:.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:.2f}x |")


if __name__ == "__main__":
    main()
