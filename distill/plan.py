"""`distill plan`: the memory and compute of one training step of a config, at real size, without the weights.

The teacher is built on the meta device from its architecture (teachers.load_meta): every tensor has a shape and a
dtype but no data. The config's student and method are built on it and run the trainer's step (every turn: loss,
backward, clipping, AdamW) twice:
- the Tracker (a dispatch mode) counts the bytes of every storage a meta op creates until the storage dies, so its
  high-water mark during the second step is what an allocator would peak at (the first step creates the optimiser
  state). It counts FLOPs with the formulas of torch's flop counter (whose own mode's module hooks would keep a
  checkpointed block's tensors alive), answers the few reads of values a step makes (a log's .item(), a
  finiteness check) and moves the small CPU tensors a step mixes in (schedules, times) to the meta device;
- fused_attention runs scaled_dot_product_attention as the fused kernel a GPU uses (on meta it would otherwise be
  the math path, which keeps the L x L attention matrix).
Autocast does not act on meta tensors: layers compute in their weights' dtypes (teacher.dtype; LoRA and full
students in float32).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

import teachers
from distill import data
from distill.runs import build_method
from students import compressed

GB = 1e9
SCALAR_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


class Tracker(TorchDispatchMode):
    """Live bytes of the meta storages ops create and their high-water mark, and (while count_flops) the FLOPs of
    the ops torch's flop counter knows (matrix products, convolutions, attention)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        # gradients of watched parameters (what train.fsdp shards): their live bytes, and those at the peak
        self.grads, self.grads_now, self.grads_at_peak = set(), 0, 0
        self.count_flops, self.flops = False, 0

    def _freed(self, key: int) -> None:
        size = self.live.pop(key, 0)
        self.now -= size
        if key in self.grads:
            self.grads.discard(key)
            self.grads_now -= size

    def watch(self, p: torch.Tensor) -> None:
        """Count p's gradient among the watched ones while it lives."""
        def accumulated(p):
            key = p.grad.untyped_storage()._cdata
            if key in self.live and key not in self.grads:
                self.grads.add(key)
                self.grads_now += self.live[key]
        was = p.requires_grad  # a turn that does not train p has it off: the hook stays for the turns that do
        p.requires_grad_(True).register_post_accumulate_grad_hook(accumulated)
        p.requires_grad_(was)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) and a.is_meta for a in tree_leaves((args, kwargs))):
            if func in SCALAR_READS:  # a value the step reads: finite, true, zero
                return True if func is torch.ops.aten.is_nonzero.default or args[0].dtype == torch.bool else 0
            to = kwargs.get("device")
            if func is torch.ops.aten._to_copy.default and to is not None and torch.device(to).type != "meta":
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=to)  # .tolist()
            args, kwargs = tree_map(_to_meta, (args, kwargs))
        out = func(*args, **kwargs)
        if self.count_flops and func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_meta:
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    if self.now > self.peak:
                        self.peak, self.grads_at_peak = self.now, self.grads_now
                    weakref.finalize(storage, self._freed, key)
        return out


def _to_meta(a):
    return a.to("meta") if isinstance(a, torch.Tensor) and not a.is_meta and a.dim() > 0 else a


@contextlib.contextmanager
def fused_attention():
    """scaled_dot_product_attention on meta tensors as the fused (flash) kernel a GPU runs: it keeps q, k, v, the
    output and one log-sum-exp per query, where the meta device's math path would keep the L x L attention matrix.
    Not where a caller asked for the math kernel (ADD's R1 differentiates twice) or passed a mask. Swapped in for
    the call's duration, as the function itself: a gradient-checkpointed block recomputes in backward, where no
    function mode is active, and must save what its forward saved."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        fusable = torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
        if query.is_meta and fusable and attn_mask is None and not enable_gqa:
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                     scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors`."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def plan(cfg, architecture: str | None = None, teacher=None) -> dict:
    """The memory (bytes) and FLOPs of one training step of cfg, from a teacher on the meta device."""
    from distill.speed import train_stepper

    teacher = teachers.load_meta(cfg.teacher, architecture) if teacher is None else teacher
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision="no", compile=False))
    tracker = Tracker()
    with fused_attention(), tracker:
        method = build_method(cfg, torch.device("meta"), teacher=teacher).to("meta")
        # the largest bucket's step is the one that peaks (without buckets: the teacher's one size)
        b, size = cfg.data.batch_size, max(data.trained_sizes(cfg.data, teacher), key=lambda s: s[0] * s[1])
        raw = {"prompt": ["a photo"] * b}
        if cfg.data.kind == "latents":  # a cache: no VAE encode in the step
            raw["latents"] = torch.zeros(b, *teacher.latent_shape(*size), device="meta")
        else:
            raw["image"] = torch.zeros(b, 3, *size, device="meta")
        step = train_stepper(method, cfg, raw)
        sharded = {id(p): p for m in method.sharded_modules() for p in m.parameters()}  # what train.fsdp shards
        for p in sharded.values():
            tracker.watch(p)
        step()  # the optimiser state appears in the first step
        tracker.peak, tracker.grads_at_peak, tracker.count_flops = tracker.now, tracker.grads_now, True
        step()
        step_flops, peak = tracker.flops, tracker.peak
        with torch.no_grad():  # one sampling step of the student: a forward at batch 1, no CFG
            method.eval()
            x = torch.zeros(1, *teacher.latent_shape(*size), device="meta")
            teacher.predict(x, torch.full((1,), 500.0), teacher.encode_prompts(["a photo"]),
                            backbone=method.student.backbone)
        step_macs = (tracker.flops - step_flops) / 2
        tracker.flops, tracker.peak = step_flops, peak
    weights = [*teacher.parameters(), *teacher.buffers(), *method.parameters(), *method.buffers()]
    params = _bytes(weights)
    before = _bytes([w for w in weights if w.untyped_storage()._cdata not in tracker.live])  # the teacher's
    optimizer = _bytes([v for opt in step.optimizers.values() for state in opt.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0])
    turns = {turn: method.parameters_for(turn) for turn in method.turns}
    gradients = max(_bytes(p) for p in turns.values())
    peak = before + tracker.peak
    # What train.fsdp shards, alive at the peak: the modules' weights and optimiser state (there all the step) and
    # their gradients then. And what FSDP2 gathers whole: a module's parameters outside its blocks stay gathered from
    # its forward to the end of its backward; each block is gathered while it runs and the next one prefetched, and
    # its gradient is whole until copied into the reduce-scatter buffer.
    blocks = {m: [s for s in m.modules() if isinstance(s, teacher.shard_blocks)] for m in method.sharded_modules()}
    block = max([_bytes(list(b.parameters())) for bs in blocks.values() for b in bs], default=0)
    rest = max(_bytes(list(m.parameters())) - sum(_bytes(list(b.parameters())) for b in bs) for m, bs in blocks.items())
    shards = {"sharded": _bytes(sharded.values()) + tracker.grads_at_peak + _bytes(
                  [v for opt in step.optimizers.values() for p, state in opt.state.items() if id(p) in sharded
                   for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]),
              "gathered": rest + 4 * block}
    return {"parameters": params, "gradients": gradients, "optimizer": optimizer,
            "activations": max(peak - params - optimizer - gradients, 0), "peak": peak,
            "flops": tracker.flops, "trainable": _bytes([p for ps in turns.values() for p in ps]),
            # the networks that sample, a LoRA merged: the student's and the teacher's backbones
            "student_params": compressed.parameters(method.student.backbone),
            "teacher_params": compressed.parameters(teacher.backbone),
            "student_macs": step_macs, **shards}


def per_process_peak(r: dict, processes: int) -> float:
    """The peak of one of `processes` processes under train.fsdp, at the one-process peak's moment: what is
    sharded there divided among them, plus what FSDP2 holds whole (the largest module's parameters outside its
    blocks, and about four of the largest block: the running and the prefetched one's weights, one block's
    gradient and its reduce-scatter buffer)."""
    return r["peak"] - r["sharded"] * (1 - 1 / processes) + r["gathered"] * (processes > 1)


def report(cfg, architecture: str | None = None, processes: int | None = None) -> str:
    """plan() without and with gradient checkpointing, as a Markdown table with what fits on 24, 40 and 80 GB;
    with `processes`, the peak per process when train.fsdp shards the student over that many."""
    rows = []
    for checkpointing in (False, True):  # a fresh meta teacher each time: a LoRA student lives on its backbone
        student = dataclasses.replace(cfg.student, gradient_checkpointing=checkpointing)
        rows.append((checkpointing, plan(dataclasses.replace(cfg, student=student), architecture)))
    s, t = cfg.student, cfg.teacher
    kind = {"lora": f"LoRA rank {s.lora_rank}", "compressed": f"compressed ({s.compression or 'half'})"}.get(s.kind,
                                                                                                      s.kind)
    lines = [f"{cfg.method.name}, {kind} student of {architecture or t.source} ({t.dtype}), "
             f"batch {cfg.data.batch_size} per process at {t.pixels} px; "
             "one step runs every turn once; "
             "memory in GB (1e9 bytes)", "",
             "| gradient checkpointing | parameters | gradients | optimizer | activations | peak | fits | TFLOP/step |"
             + (f" peak per process, train.fsdp on {processes} | fits per process |" if processes else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if processes else "")]

    def fits(peak):
        return ", ".join(f"{gb} GB" for gb in (24, 40, 80) if peak <= gb * GB) or "none of 24/40/80 GB"

    for checkpointing, r in rows:
        parts = " | ".join(f"{r[k] / GB:.3g}" for k in ("parameters", "gradients", "optimizer", "activations", "peak"))
        line = f"| {'on' if checkpointing else 'off'} | {parts} | {fits(r['peak'])} | {r['flops'] / 1e12:.3g} |"
        if processes:
            line += f" {per_process_peak(r, processes) / GB:.3g} | {fits(per_process_peak(r, processes))} |"
        lines.append(line)
    r = rows[0][1]
    lines += ["", f"Student: {r['student_params'] / 1e9:.3g}B parameters (the teacher's backbone "
              f"{r['teacher_params'] / 1e9:.3g}B), {r['student_macs'] / 1e9:.4g} GMACs per sampling step at batch 1 "
              f"({t.pixels} px, no CFG).",
              f"Trainable: {r['trainable'] / GB:.3f} GB of parameters. Autocast does not act on the meta device, so "
              "layers compute in their weights' dtypes (on a GPU under bf16 autocast the peak ran 3-41% higher: "
              "experiments/results/gpu_check.md); train.fsdp on N processes divides a full student's "
              "parameters, gradients and optimiser state by N (the frozen teacher stays whole)" +
              (f"; per process: of the peaks' bytes {r['sharded'] / GB:.3g} / {rows[1][1]['sharded'] / GB:.3g} GB "
               f"(checkpointing off / on) are sharded, plus about "
               f"{r['gathered'] / GB:.3g} GB FSDP2 gathers whole (the module's parameters outside its blocks, the "
               "running and the prefetched block, a block's gradient and its reduce-scatter buffer)."
               if processes else ".")]
    return "\n".join(lines)
