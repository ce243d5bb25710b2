"""FSDP2 for full students (`train.fsdp: true`): distill shards the modules a method trains with torch's
`fully_shard`, under the process group Accelerate has set up, and gathers full tensors whenever it writes. So a
sharded run's checkpoints and `student/` folder are the very files a one-process run writes: full weights and
full optimiser state, resumable on any number of processes, loadable by plain diffusers.

Parameters, gradients and optimiser state of the sharded modules are split over the processes (each rank holds
1/N); the frozen teacher stays whole on every rank. Gradients are reduce-scattered in every backward, so
accumulated micro-batches need no special handling.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from distill.errors import DistillError


def shard(method, blocks: tuple[type, ...]) -> None:
    """Shard each of `method.sharded_modules()`: every submodule of a `blocks` type is its own unit (gathered
    only while it runs), the rest of the module one more. Parameters are replaced, so call it before building
    optimisers."""
    for module in method.sharded_modules():
        for sub in list(module.modules()):
            if sub is not module and isinstance(sub, blocks):
                fully_shard(sub)
        fully_shard(module)
    for turn in method.turns:
        if any(not isinstance(p, DTensor) for p in method.parameters_for(turn)):
            raise DistillError(f"train.fsdp: the {turn} turn of method {type(method).__name__} trains parameters "
                               "outside the modules it shards; train it without train.fsdp")


def reshard(method) -> None:
    """Free the gathered parameters of every sharded module. Call it whenever a new turn starts: FSDP2 leaves a
    root module's parameters gathered after a forward that has no backward (a turn's no-grad pass), and a
    gathered parameter keeps the requires_grad it was gathered with, so the next turn would not train it. Call it
    also before anything reads parameters outside a forward (an EMA update), which must find shards."""
    for module in method.sharded_modules():
        module.reshard()


def full(tree, keep: bool):
    """A state dict (nested dicts allowed) with every DTensor gathered whole and every tensor on the CPU; None
    in place of tensors where not `keep`. Collective: every rank calls it on the same tree."""
    if isinstance(tree, dict):
        return {k: full(v, keep) for k, v in tree.items()}
    if not torch.is_tensor(tree):
        return tree
    whole = tree.full_tensor() if isinstance(tree, DTensor) else tree
    return whole.detach().cpu() if keep else None


def local(tree: dict) -> dict:
    """A flat state dict with each DTensor replaced by this rank's shard (for checks every rank runs)."""
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in tree.items()}


def whole_copy(module: nn.Module, keep: bool) -> nn.Module | None:
    """An unsharded copy of a sharded diffusers model (built from its config) on the ranks that `keep`, None
    elsewhere. Collective, like `full`."""
    state = full(module.state_dict(), keep)
    if not keep:
        return None
    # fully_shard made the module's class an FSDP subclass: build (and name, when saved) the model's own class
    cls = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    copy = cls.from_config(module.config)
    copy.load_state_dict(state)
    return copy


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimiser state dict (as `full` and checkpoints keep it): a tensor shaped like its DTensor
    parameter is cut to this rank's shard first, with no communication (every rank read the same file)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, per_param in state["state"].items():
        p = params[int(pid)]
        if isinstance(p, DTensor):
            for k, v in per_param.items():
                if torch.is_tensor(v) and v.shape == p.shape:
                    per_param[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    optimizer.load_state_dict(state)
