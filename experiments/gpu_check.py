"""The GPU check: the CUDA paths at SDXL's real size, in one process, and the report in Markdown.

    python experiments/gpu_check.py --plans-only --plans plans.json     # any CPU, ~4 min: distill plan per method
    python experiments/gpu_check.py --plans plans.json --out experiments/results/gpu_check.md   # one H100/H200
    python experiments/gpu_check.py --smoke --out /tmp/gpu_check.md     # CPU, tiny SDXL: the test suite runs this

What it runs, on SDXL base's architecture with random weights (teachers/real_size.py, built on the GPU in bf16):
1. the environment, and which scaled-dot-product-attention kernel the teacher's forward runs;
2. each method's training step on its SDXL recipe (experiments/*_sdxl.yaml) at batch 1 with gradient checkpointing
   and bf16 autocast: one warm-up step then `--steps` timed ones, the peak of CUDA's allocator against `distill plan`'s
   prediction for the same config; then the same with torch.compile for `--compile` methods (the first call,
   compilation included, is reported on its own);
3. sampling, ms/image: the teacher at 50 steps with CFG, the LoRA consistency student at 4 steps, and a compressed
   student (students/compressed.py) at 4 steps;
4. one denoising step (a backbone forward) of the teacher's UNet against the compressed ones', and a training step
   of a full student against a compressed one.
Every part is guarded: one that fails is reported with its error and the rest still run; the report is rewritten
after each part, so a run cut short still leaves what it measured. `--budget-s` skips parts once it is spent.
`distill plan` runs on the meta device (no GPU) and takes tens of seconds per config, so its predictions are made
beforehand on any machine (`--plans-only`) and read with `--plans`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import students  # noqa: E402
import teachers  # noqa: E402
from distill import config as config_mod, plan as plan_mod, speed  # noqa: E402
from distill.runs import build_method  # noqa: E402
from students import compressed  # noqa: E402

RECIPES = {"denoise": "lcm_sdxl_lora", "consistency": "lcm_sdxl_lora", "progressive": "progressive_sdxl",
           "guidance": "guidance_sdxl", "add": "add_sdxl", "ladd": "ladd_sdxl", "dmd2": "dmd2_sdxl"}
ARCH = "sdxl-base-arch"
COMPRESSED = ("koala-1b", "koala-700m")
CHECKED = [*RECIPES, "denoise:full", "denoise:compressed"]


def method_config(name: str, smoke: bool):
    """The method's SDXL recipe at the check's size: batch 1, checkpointing, bf16 autocast (smoke: tiny, fp32).
    `denoise:full` and `denoise:compressed` are a fine-tune of a full and of a compressed student."""
    name, _, kind = name.partition(":")
    cfg = config_mod.load(ROOT / "experiments" / f"{RECIPES[name]}.yaml", for_training=False)
    params = dict(cfg.method.params) if name != "denoise" else {}
    if name == "add":  # the recipe's DINOv2 file is the user's; random weights of the same architecture here
        params.pop("feature_weights", None)
        if smoke:
            params.update(feature_net="vit_tiny_patch16_224", feature_size=32)
    teacher = dataclasses.replace(cfg.teacher, source="builtin:tiny-sdxl" if smoke else ARCH,
                                  dtype="float32" if smoke else "bfloat16", resolution=32 if smoke else 1024)
    return dataclasses.replace(
        cfg, teacher=teacher, method=config_mod.MethodConfig(name, params),
        student=dataclasses.replace(cfg.student, gradient_checkpointing=True, kind=kind or cfg.student.kind,
                                    compression=("half" if smoke else "koala-700m") if kind == "compressed" else None),
        data=dataclasses.replace(cfg.data, kind="digits", path=None, batch_size=1, num_workers=0),
        train=dataclasses.replace(cfg.train, mixed_precision="no" if smoke else "bf16", compile=False))


def predicted_peaks(methods: list[str], smoke: bool) -> dict[str, float]:
    """distill plan's peak (bytes) for each method's check config."""
    out = {}
    for name in methods:
        cfg = method_config(name, smoke)
        out[name] = plan_mod.plan(cfg, None if smoke else ARCH)["peak"]
    return out


def batch(teacher, size: int = 1) -> dict:
    h, w = teacher.size
    return {"prompt": ["a photo of a cat"] * size, "image": torch.rand(size, 3, h, w) * 2 - 1}


def release(teacher) -> None:
    students.fuse_lora(teacher.backbone, merge=False)  # the bare teacher for the next method
    teacher.backbone._compiled_call_impl = None  # nn.Module.compile's, undone: the next part runs eager
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_rows(teacher, methods, plans, steps, mode, smoke, budget) -> list[dict]:
    rows = []
    for name in methods:
        if budget.spent():
            rows.append({"method": name, "mode": mode, "error": "skipped: --budget-s spent"})
            continue
        row = {"method": name, "mode": mode}
        try:
            cfg = method_config(name, smoke)
            method = build_method(cfg, teacher.device, teacher)
            step = speed.train_stepper(method, cfg, batch(teacher), compile=mode == "compiled")
            with speed.peak_memory(teacher.device) as peak:
                start = time.perf_counter()
                speed.once_ms(step)
                row["first_step_s"] = time.perf_counter() - start
                times = speed.interleaved({name: step}, steps, warmup=0)[name]
            row["ms"], row["ms_iqr"] = speed.median_iqr(times)
            row["peak_gb"] = peak["mb"] * 2**20 / 1e9
            if name in plans:
                row["plan_gb"] = plans[name] / 1e9
                row["measured_over_plan"] = row["peak_gb"] / row["plan_gb"]
            row["student"] = cfg.student.kind + (f" ({cfg.student.compression})" if cfg.student.compression else "")
            del method, step
        except Exception as e:  # the check goes on; the error is part of the report
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["trace"] = traceback.format_exc(limit=-3)
        release(teacher)
        rows.append(row)
        budget.save()
    return rows


def sampling_rows(teacher, smoke, steps_timed) -> list[dict]:
    """Teacher 50 steps with CFG, the LoRA consistency student and a compressed student at 4, ms/image."""
    amp = None if smoke else "bf16"
    lora = build_method(method_config("consistency", smoke), teacher.device, teacher)
    cfg = method_config("denoise", smoke)
    small = build_method(dataclasses.replace(cfg, student=dataclasses.replace(
        cfg.student, kind="compressed", compression="half" if smoke else "koala-700m")), teacher.device, teacher)
    if not smoke:
        small.student.backbone.to(torch.bfloat16)  # as its merged export runs
    prompts = ["a photo of a cat"]
    jobs = {"teacher, 50 steps, CFG 7.5": speed.sampler(lora, prompts, 50, 7.5, True, amp=amp),
            "LoRA consistency student, 4 steps": speed.sampler(lora, prompts, 4, 1.0, False, amp=amp),
            f"compressed student ({'half' if smoke else 'koala-700m'}), 4 steps":
                speed.sampler(small, prompts, 4, 1.0, False, amp=amp)}
    times = speed.interleaved(jobs, steps_timed, warmup=1)
    summary = speed.sampling_summary(times, next(iter(jobs)), 1)
    rows = [{"sampler": k, **v} for k, v in summary.items()]
    # The LoRA merged into the weights, as an exported merged pipeline runs (peft's merge, undone after). Timed in
    # rounds of its own: the teacher's pass would unmerge it. Its speed-up is against the teacher's median above.
    from teachers.base import adapter_layers

    layers = adapter_layers(teacher.backbone)
    for m in layers:
        m.merge()
    merged = speed.median_iqr(speed.interleaved({"m": speed.sampler(lora, prompts, 4, 1.0, False, amp=amp)},
                                                steps_timed, warmup=1)["m"])
    for m in layers:
        m.unmerge()
    rows.append({"sampler": "LoRA consistency student merged, 4 steps (own rounds)", "ms_per_image": merged[0],
                 "ms_iqr": merged[1], "speedup": rows[0]["ms_per_image"] / merged[0]})
    del lora, small
    release(teacher)
    return rows


def compressed_rows(teacher, smoke, steps_timed) -> list[dict]:
    """Parameters and one denoising step (a backbone forward, batch 1) of the teacher's UNet and compressed ones."""
    x, cond = teacher.probe()
    t = torch.full((1,), 0.5, device=teacher.device)
    plans = ("half",) if smoke else COMPRESSED
    nets = {"teacher": teacher.backbone}
    for p in plans:
        nets[p] = compressed.compress(teacher.backbone, p, dtype=teacher.backbone.dtype)

    def forward(net):
        def call():
            with torch.no_grad():
                teacher.predict(x, t, cond, backbone=net)
        return call
    times = speed.interleaved({k: forward(v) for k, v in nets.items()}, steps_timed, warmup=1)
    rows = []
    for k, net in nets.items():
        ms, iqr = speed.median_iqr(times[k])
        rows.append({"backbone": k, "params_b": compressed.parameters(net) / 1e9, "forward_ms": ms, "ms_iqr": iqr,
                     "vs_teacher": speed.ratio(times[k], times["teacher"])[0]})
    del nets
    release(teacher)
    return rows


class Budget:
    def __init__(self, seconds: float, save):
        self.start, self.seconds, self.save = time.perf_counter(), seconds, save

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def environment(teacher) -> dict:
    import diffusers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "device": speed.device_name(teacher.device), "cuda": torch.version.cuda,
           "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled()}
    x, cond = teacher.probe()
    t = torch.full((1,), 0.5, device=teacher.device)
    with torch.no_grad():
        env["sdpa_kernels"] = ", ".join(speed.sdpa_ops(lambda: teacher.predict(x, t, cond))) or "none"
    return env


def markdown(results: dict, args) -> str:
    lines = ["# GPU check: SDXL's real architecture (random weights)" if not args.smoke else "# GPU check (smoke)", "",
             "    " + " ".join(["python experiments/gpu_check.py", *sys.argv[1:]]), ""]
    lines += [f"- {k}: {v}" for k, v in results.get("env", {}).items()] + [""]
    train_cols = ["method", "mode", "student", "first_step_s", "ms", "ms_iqr", "peak_gb", "plan_gb",
                  "measured_over_plan", "error"]
    for title, key, cols in (
            ("Training steps (batch 1, gradient checkpointing, bf16 autocast; `ms`: median of the timed steps, "
             "`first_step_s`: the first step, compilation included; `peak_gb`: CUDA allocator peak, teacher included; "
             "`plan_gb`: `distill plan`'s prediction)", "train", train_cols),
            ("Sampling, one image (ms/image, median and IQR; speedup over the teacher's 50 CFG steps)", "sampling",
             ["sampler", "ms_per_image", "ms_iqr", "speedup", "speedup_iqr"]),
            ("Compressed students: parameters and one backbone forward (batch 1)", "compressed",
             ["backbone", "params_b", "forward_ms", "ms_iqr", "vs_teacher"])):
        if key in results:
            rows = results[key] + (results.get("train_compiled", []) if key == "train" else [])
            lines += [f"## {title}", "", speed.markdown(rows, cols)]
    for part, error in results.get("errors", {}).items():
        lines += [f"## {part} failed", "", "```", error, "```", ""]
    lines += [f"Wall time: {results.get('wall_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny SDXL on CPU: checks the script, measures nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/gpu_check.md")
    ap.add_argument("--plans", type=Path, help="JSON of distill plan's predictions (made with --plans-only)")
    ap.add_argument("--plans-only", action="store_true", help="write the plans to --plans and stop")
    ap.add_argument("--methods", nargs="+", default=CHECKED)
    ap.add_argument("--compile", nargs="*", default=None,
                    help="methods also timed compiled (default: consistency; none with --smoke)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420)
    args = ap.parse_args(argv)
    if args.out.suffix != ".md":  # the results' JSON goes beside it, as <name>.json
        ap.error(f"--out {args.out}: give a .md file")
    if args.compile is None:
        args.compile = [] if args.smoke else ["consistency"]  # compiling takes minutes on a CPU
    if args.plans_only:
        args.plans.write_text(json.dumps(predicted_peaks(args.methods, args.smoke), indent=1) + "\n")
        return 0
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    results, errors = {}, {}
    results["errors"] = errors
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["wall_s"] = time.perf_counter() - budget.start
        args.out.write_text(markdown(results, args))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    budget = Budget(args.budget_s, save)
    torch.manual_seed(0)
    if args.smoke:
        teacher = teachers.load(method_config("denoise", True).teacher, device)
    else:
        from teachers import real_size

        with torch.device(device):
            pipe = real_size.pipeline(ARCH, torch.bfloat16)
        teacher = teachers.wrap(pipe, method_config("denoise", False).teacher).to(device)
    plans = json.loads(args.plans.read_text()) if args.plans else predicted_peaks(args.methods, args.smoke)
    parts = {"env": lambda: environment(teacher),
             "train": lambda: train_rows(teacher, args.methods, plans, args.steps, "eager", args.smoke, budget),
             "sampling": lambda: sampling_rows(teacher, args.smoke, args.steps),
             "compressed": lambda: compressed_rows(teacher, args.smoke, args.steps),
             # last: compiling a real-size backbone takes minutes, and --budget-s is only checked between methods
             "train_compiled": lambda: train_rows(teacher, args.compile, plans, args.steps, "compiled", args.smoke,
                                                  budget)}
    for part, run in parts.items():
        if budget.spent() and part != "env":
            errors[part] = "skipped: --budget-s spent"
            continue
        try:
            results[part] = run()
        except Exception:
            errors[part] = traceback.format_exc(limit=-4)
            release(teacher)
        save()
    print(args.out.read_text())
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
