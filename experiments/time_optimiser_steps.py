"""Run a training script and time its steps from outside: the wall time between consecutive AdamW.step calls, after
WARMUP steps, for TIMED steps, and the peak resident set over the timed steps (VmHWM, reset after the warm-up, as
`distill bench-speed --train` measures its own; read here, not imported from distill, as the script may run in a
virtual environment without distill). Prints one JSON line and exits once done.

    python experiments/time_optimiser_steps.py WARMUP TIMED SCRIPT [SCRIPT ARGS...]
"""
import json
import os
import re
import runpy
import sys
import time
from pathlib import Path

import torch

warmup, timed = int(sys.argv[1]), int(sys.argv[2])
stamps = []
adamw_step = torch.optim.AdamW.step


def timed_step(self, *args, **kwargs):
    out = adamw_step(self, *args, **kwargs)
    stamps.append(time.perf_counter())
    print(f"[time_optimiser_steps] step {len(stamps)} of {warmup + timed}", file=sys.stderr, flush=True)
    if len(stamps) == warmup:
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    if len(stamps) == warmup + timed:
        steps = stamps[warmup - 1:]
        peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])
        result = {"step_ms": [(b - a) * 1000 for a, b in zip(steps, steps[1:])], "peak_mb": peak_kb / 1024}
        print("[time_optimiser_steps] " + json.dumps(result), flush=True)
        os._exit(0)  # the script's own end (saving, validation) is not timed
    return out


if warmup < 1 or timed < 1:
    sys.exit("WARMUP and TIMED must be at least 1")
torch.optim.AdamW.step = timed_step
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
