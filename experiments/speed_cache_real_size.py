"""A training step that reads images (text encoding and the VAE encode inside the step) against the same step
reading what `distill cache` wrote for the same samples, interleaved round by round in one process on one loaded
teacher (issue #17).

    python experiments/speed_cache_real_size.py experiments/speed_real_size_sdxl.yaml --repeats 5

Both steps are `distill bench-speed --train`'s (distill.speed.train_stepper) of the config's method, on the config's
first batch of digits; the cache is written for that batch by distill.data.write_cache, as `distill cache` does.
Prints the medians, their IQR and the cached step over the uncached one with a 95% bootstrap interval.
"""
import argparse
import dataclasses
import tempfile
from pathlib import Path

import teachers
from distill import data, runs, speed
from distill.runs import build_method, default_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    cfg = runs.load_config(args.config, for_training=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind="digits"))
    teacher = teachers.load(cfg.teacher, default_device())
    images = data.build(cfg.data, teacher.size, teacher, cfg.train.seed)
    batch = [images[i] for i in range(cfg.data.batch_size)]
    with tempfile.TemporaryDirectory() as work:
        cache = data.write_cache(teacher, batch, Path(work) / "cache.safetensors", cfg.data.batch_size, cfg.train.seed)
        cached = data.LatentCache(cache)
        cached.check_fits(teacher, cache)
        raws = {"images": data.collate(batch), "cache": data.collate([cached[i] for i in range(len(cached))])}
    method = build_method(cfg, teacher.device, teacher)
    steps = {name: speed.train_stepper(method, cfg, raw) for name, raw in raws.items()}
    times = speed.interleaved(steps, args.repeats, args.warmup)
    rows = [dict(zip(["step", "median_ms", "iqr_ms"], [name, *speed.median_iqr(t)])) for name, t in times.items()]
    ratio, lo, hi = speed.ratio_interval(times["cache"], times["images"])
    print(f"# python experiments/speed_cache_real_size.py {args.config} --repeats {args.repeats}\n\n"
          f"{cfg.method.name}, teacher {cfg.teacher.source} ({cfg.teacher.dtype}), {cfg.teacher.pixels} px, batch "
          f"{cfg.data.batch_size}; {args.repeats} interleaved rounds after {args.warmup} warm-up calls\n\n"
          f"{speed.markdown(rows, ['step', 'median_ms', 'iqr_ms'])}\n\n"
          f"cached step / uncached step: {ratio:.3f} [{lo:.3g}, {hi:.3g}]")


if __name__ == "__main__":
    main()
