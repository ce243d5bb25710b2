"""A KOALA-700M-like compressed SDXL UNet against the full one at real size on the CPU, 256 px (64x64 would be
1024 px; here 32x32 latents), batch 1, float32, random weights of SDXL base's architecture
(teachers/architectures/sdxl-base.json): parameters, one forward (a sampling step) and one training step
(forward and backward with every weight gradient computed; gradient checkpointing on, as the recipes train).

    python experiments/compressed_cpu_real_size.py --out experiments/results/compressed_cpu_real_size.md --repeats 6

The two are timed interleaved in one process (speed.interleaved), so each ratio compares rounds run under the
same load. Each weight gradient is dropped as soon as it is accumulated (a post-accumulate hook): the backward
computes all of them, as training does, while the full UNet's 10 GB of float32 gradients never sit in memory beside
its weights (its AdamW state would take 21 GB more, beyond this 24 GB machine); the optimiser step itself, a few
elementwise passes over the parameters, is therefore not in the step time.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusers import UNet2DConditionModel  # noqa: E402

from distill import speed  # noqa: E402
from students import compressed  # noqa: E402
from teachers.real_size import architecture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="koala-700m")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    full = UNet2DConditionModel(**architecture("sdxl-base-arch")["unet"]).eval()
    small = compressed.compress(full, compressed.resolve(args.preset, full)).eval()
    built_s = time.perf_counter() - start
    nets = {"full": full, args.preset: small}
    r = args.resolution
    side = r // 8
    x = torch.randn(1, 4, side, side)
    kw = {"timestep": torch.tensor([500]), "encoder_hidden_states": torch.randn(1, 77, 2048),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280),
                                "time_ids": torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32)}}

    def forward(net):
        def call():
            with torch.no_grad():
                net(x, **kw)
        return call

    def train_step(net):
        def call():
            out = net(x, **kw).sample
            out.float().square().mean().backward()
        return call

    for net in nets.values():
        for p in net.parameters():
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    fwd = speed.interleaved({k: forward(n) for k, n in nets.items()}, args.repeats, warmup=1)
    for net in nets.values():
        net.train()
        net.enable_gradient_checkpointing()
    step = speed.interleaved({k: train_step(n) for k, n in nets.items()}, args.repeats, warmup=1)

    rows = []
    for k, net in nets.items():
        f_ms, f_iqr = speed.median_iqr(fwd[k])
        s_ms, s_iqr = speed.median_iqr(step[k])
        f_ratio, f_lo, f_hi = speed.ratio_interval(fwd[k], fwd["full"])
        s_ratio, s_lo, s_hi = speed.ratio_interval(step[k], step["full"])
        rows.append({"unet": k, "params_b": compressed.parameters(net) / 1e9, "forward_ms": f_ms, "forward_iqr": f_iqr,
                     "forward_vs_full": f"{f_ratio:.3f} [{f_lo:.3f}, {f_hi:.3f}]", "train_step_ms": s_ms,
                     "train_step_iqr": s_iqr, "train_step_vs_full": f"{s_ratio:.3f} [{s_lo:.3f}, {s_hi:.3f}]"})
    facts = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
             "torch": torch.__version__, "resolution": args.resolution, "repeats": args.repeats,
             "plan": compressed.resolve(args.preset, full), "built_s": round(built_s, 1),
             "date": time.strftime("%Y-%m-%d"), "times_ms": {"forward": fwd, "train_step": step}}
    columns = ["unet", "params_b", "forward_ms", "forward_iqr", "forward_vs_full", "train_step_ms", "train_step_iqr",
               "train_step_vs_full"]
    text = "\n".join([
        f"# A {args.preset}-like compressed SDXL UNet against the full one, CPU, {args.resolution} px", "",
        f"    python experiments/compressed_cpu_real_size.py --out {args.out} --repeats {args.repeats}", "",
        f"{facts['machine']}, torch {facts['torch']}, {facts['date']}; batch 1, float32, random weights of SDXL base's "
        f"architecture; removal plan {facts['plan']}. Median and IQR of {args.repeats} interleaved rounds after one "
        "warm-up; the ratios are ratios of medians with 95% bootstrap intervals. Forward: one UNet call without "
        "gradients (a sampling step without CFG). Training step: forward and backward with every weight gradient "
        "computed, gradient checkpointing on; no optimiser step (each gradient is dropped once accumulated, so the "
        "full UNet fits in 24 GB).", "", speed.markdown(rows, columns),
        f"Raw timings: `{Path(args.out).with_suffix('.json').name}`."])
    Path(args.out).write_text(text + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, **facts}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
