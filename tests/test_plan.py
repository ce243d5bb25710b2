"""`distill plan` (issue #14, section 3): a step traced on the meta device predicts the memory of the same step run
for real. The real step's peak is measured independently: glibc's heap in use (mallinfo2), read after every op of
steady-state steps (the third and fourth; the first creates the optimiser state), on top of the exact bytes of the
weights and optimiser state that are already there."""
import ctypes
import gc
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from distill import plan, runs
from distill.speed import train_stepper


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # small blocks in use + large (mmapped) ones


class HeapPeak(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def measured_peak(cfg) -> int:
    method = runs.build_method(cfg, torch.device("cpu"))
    b, size = cfg.data.batch_size, cfg.teacher.resolution
    step = train_stepper(method, cfg, {"prompt": ["a photo"] * b, "image": torch.zeros(b, 3, size, size)})
    step()
    step()
    weights = [*method.teacher.parameters(), *method.teacher.buffers(), *method.parameters(), *method.buffers()]
    state = [v for opt in step.optimizers.values() for s in opt.state.values() for v in s.values() if v.dim() > 0]
    return plan._bytes(weights) + plan._bytes(state) + max(_step_peak(step) for _ in range(2))


def _step_peak(step) -> int:
    """Heap growth over one step. Memory that is not the step's, freed during it (garbage of earlier tests, other
    threads), can only lower the figure: collect first, and the caller keeps the higher of two steps."""
    gc.collect()
    with HeapPeak() as heap:
        heap.peak = start = _heap_in_use()
        step()
    return heap.peak - start


def config(source, method, kind="lora", checkpointing=False, resolution=32, **params):
    return runs.parse_config({"teacher": {"source": source, "resolution": resolution},
                              "student": {"kind": kind, "gradient_checkpointing": checkpointing},
                              "method": {"name": method, "params": params}, "data": {"kind": "digits", "batch_size": 2},
                              "train": {"output_dir": "unused"}}, for_training=False)


def _glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's mallinfo2 measures the real step")
@pytest.mark.parametrize("source,method,kind,checkpointing", [
    ("builtin:tiny-sdxl", "consistency", "lora", False),
    ("builtin:tiny-sdxl", "consistency", "lora", True),
    # two turns, a second adapter, the GAN head: a minute of measuring, so slow
    pytest.param("builtin:tiny-sdxl", "dmd2", "lora", True, marks=pytest.mark.slow),
    ("builtin:tiny-sdxl", "progressive", "full", True),  # a full student and its round teacher
    ("builtin:tiny-sd3", "ladd", "lora", True),  # flow, MMDiT, heads on the teacher's features
])
def test_the_plan_is_within_15_percent_of_a_measured_step(source, method, kind, checkpointing):
    params = {"start_steps": 4} if method == "progressive" else {}
    cfg = config(source, method, kind, checkpointing, **params)
    estimate = plan.plan(cfg)
    parts = ("parameters", "gradients", "optimizer", "activations")
    assert sum(estimate[k] for k in parts) == estimate["peak"] and min(estimate[k] for k in parts) > 0
    assert estimate["flops"] > 0
    measured = measured_peak(cfg)
    assert abs(estimate["peak"] / measured - 1) <= 0.15, (estimate, measured)


def test_plan_reads_no_weights_and_checkpointing_trades_memory_for_flops(tmp_path, tiny_sdxl_dir, cli):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_sdxl_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))  # configs only
    cfg = tmp_path / "lcm.yaml"
    cfg.write_text(f"teacher: {{source: {folder}, resolution: 64}}\nstudent: {{kind: lora}}\n"
                   "method: {name: consistency}\ndata: {kind: digits, batch_size: 4}\n")
    out = tmp_path / "plan.md"
    proc = cli("plan", cfg, "--out", out)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith(("| off", "| on"))}
    mark, written = out.read_text().split("\n", 1)
    assert set(rows) == {"off", "on"} and written.strip() == proc.stdout.strip() and mark.startswith("<!-- written by")
    activations, flops = {k: float(v[3]) for k, v in rows.items()}, {k: float(v[-1]) for k, v in rows.items()}
    peak = {k: float(v[4]) for k, v in rows.items()}
    assert peak["on"] < peak["off"] and activations["on"] < activations["off"]
    assert flops["on"] >= flops["off"]  # the recompute


def test_plan_names_what_to_pass_for_an_unknown_architecture(tmp_path, cli):
    cfg = tmp_path / "hub.yaml"
    cfg.write_text("teacher: {source: stabilityai/stable-diffusion-xl-base-1.0, resolution: 1024}\n"
                   "method: {name: consistency}\n")
    proc = cli("plan", cfg, check=False)
    assert proc.returncode == 2 and ("--architecture (sdxl-base-arch, sd3-medium-arch, sd35-medium-arch, "
                                     "sd35-large-arch, flux-dev-arch)") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("plan", cfg, "--architecture", "sdxl-huge", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = cli("plan", cfg, "--architecture", "sdxl-base-arch", "--out", tmp_path, check=False)  # a folder
    assert proc.returncode == 2 and f"--out {tmp_path} is a folder" in proc.stderr
    proc = cli("plan", cfg, "--architecture", "sdxl-base-arch", "--processes", "8", check=False)  # no train.fsdp
    assert proc.returncode == 2 and "set train.fsdp=true" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_the_per_process_plan_divides_what_fsdp_shards(tiny_sdxl_dir):
    """A full consistency student under train.fsdp: at the peak the sharded bytes are the student's weights, its EMA
    and AdamW's two moments (4 x the student in float32), and the gradients alive then: none at the end of the
    forward (the peak without checkpointing), some of them in a checkpointed backward. One process holds the whole
    peak; eight hold an eighth of the sharded bytes plus what FSDP2 gathers whole."""
    sharded = {}
    for checkpointing in (False, True):
        cfg = config(str(tiny_sdxl_dir), "consistency", kind="full", checkpointing=checkpointing)
        cfg.train.fsdp = True
        r = plan.plan(cfg)
        sharded[checkpointing] = r["sharded"]
        assert plan.per_process_peak(r, 1) == r["peak"]
        assert plan.per_process_peak(r, 8) == r["peak"] - r["sharded"] * 7 / 8 + r["gathered"] < r["peak"]
    student = sum(p.numel() * 4 for p in runs.build_method(cfg, torch.device("meta")).student.backbone.parameters())
    assert sharded[False] == 4 * student < sharded[True] <= 5 * student and 0 < r["gathered"] < student


@pytest.mark.slow
def test_plan_at_real_sdxl_size():
    """SDXL base's architecture on meta: the rank-64 LoRA is the 197M parameters of the published LCM-LoRA
    (394 MB in fp16), and a gradient-checkpointed step of batch 1 at 1024 px fits in 24 GB."""
    cfg = runs.parse_config({"teacher": {"source": "stabilityai/stable-diffusion-xl-base-1.0", "resolution": 1024,
                                         "dtype": "float16"},
                             "student": {"kind": "lora", "lora_rank": 64, "gradient_checkpointing": True},
                             "method": {"name": "consistency"}, "data": {"kind": "digits", "batch_size": 1},
                             "train": {"output_dir": "unused"}}, for_training=False)
    r = plan.plan(cfg, "sdxl-base-arch")
    assert r["trainable"] / 4 == pytest.approx(197e6, rel=0.02)
    assert r["peak"] < 24e9
