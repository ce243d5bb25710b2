"""The README's five-minute tour, from Python: train a 4-step LCM-LoRA student of the built-in digits teacher,
sample it through its diffusers pipeline, evaluate it into a leaderboard, export it and write the leaderboard page.

    python examples/quickstart.py                                   # the tour (a few minutes on 2 CPU cores)
    python examples/quickstart.py --max-steps 2 --num-per-prompt 2  # a smoke run

Everything goes under --out (default runs/quickstart). Run it again and training resumes where it stopped.
"""
import argparse
from pathlib import Path

import torch

import distill
from distill import leaderboard

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "lcm_digits_sdxl.yaml"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart", help="folder for the run, samples, export and leaderboard")
    p.add_argument("--max-steps", type=int, default=300, help="training steps")
    p.add_argument("--num-per-prompt", type=int, default=20, help="evaluation samples per digit prompt")
    args = p.parse_args(argv)
    out = Path(args.out)

    # 1. Train. Overrides are dotted keys, as on the command line; the run folder comes back.
    folder = out / "run"
    run = distill.train(CONFIG, {"train.max_steps": args.max_steps, "train.output_dir": str(folder),
                                 "train.checkpoint_every": args.max_steps},
                        resume="latest" if (folder / "checkpoints" / "latest").exists() else None)

    # 2. Sample: a diffusers pipeline with the student, its scheduler and its call in place.
    pipe = distill.load(run, steps=4)
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    images = pipe(prompts, generator=torch.Generator().manual_seed(0)).images
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for prompt, image in zip(prompts, images):
        image.save(out / "samples" / f"{prompt.replace(' ', '-')}.png")
    print(f"wrote {len(images)} samples to {out / 'samples'}")

    # 3. Evaluate: FID/KID with 95% intervals, prompt adherence and cost, added to a leaderboard.
    db = out / "leaderboard.sqlite"
    result = distill.evaluate(run, steps=4, num_per_prompt=args.num_per_prompt, db=db)
    row = result.row
    print(f"FID {row['fid']:.2f} [{row['fid_lo']:.2f}, {row['fid_hi']:.2f}], adherence {row['adherence']:.2f}, "
          f"{row['nfe']} network evaluations per image; row {result.row_id} in {db}")

    # 4. Export: a diffusers LoRA and a kohya LoRA (for ComfyUI and A1111) with a model card.
    exported = distill.export(run, out / "export", overwrite=True, db=db)
    print(f"exported to {exported}: {', '.join(sorted(f.name for f in exported.iterdir()))}")

    # 5. The leaderboard page.
    rows = leaderboard.Leaderboard(db, readonly=True).rows("fid")
    md, page = leaderboard.write_reports(rows, out / "leaderboard", grid_roots=[db.parent])
    print(f"open {page.resolve()} in a browser")


if __name__ == "__main__":
    main()
