"""One rank of a multi-process run, observed from outside: `python ddp_worker.py CONFIG OUT [overrides]`, or under
`accelerate launch`. It trains with distill's own trainer and records, per rank, the student and heads as
built (before Accelerate prepares them), as trained, and a fingerprint of every sample the rank read. Under
train.fsdp it records instead how much of each sharded module's parameters the rank holds."""
import hashlib
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from distill import data, runs, trainer


def main():
    cfg_path, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ.get("RANK", 0))
    out.mkdir(parents=True, exist_ok=True)
    seen, collate, build = [], data.collate, trainer.build_method

    def recording_collate(items):
        seen.append([hashlib.sha1(i["image"].numpy().tobytes()).hexdigest()[:16] for i in items])
        return collate(items)

    def recording_build(cfg, device):
        method = build(cfg, device)
        if cfg.train.fsdp:
            return method
        save_file({k: v.contiguous() for k, v in method.state_to_save().items()}, str(out / f"init-{rank}.safetensors"))
        return method

    data.collate, trainer.build_method = recording_collate, recording_build
    cfg = runs.load_config(cfg_path, overrides)
    method = trainer.train(cfg)
    if cfg.train.fsdp:
        held = {name: [(p.to_local().numel(), p.numel()) for p in m.parameters() if isinstance(p, DTensor)]
                for name, m in zip(["student", "ema"][:1 + (method.student.ema is not None)] + list(method.extras),
                                   method.sharded_modules())}
        (out / f"shards-{rank}.json").write_text(json.dumps(held))
        return
    save_file({k: v.contiguous() for k, v in method.state_to_save().items()}, str(out / f"final-{rank}.safetensors"))
    (out / f"seen-{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
