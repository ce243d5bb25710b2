"""The registry of distillation methods: config name -> class. One file per method."""
import difflib
from pathlib import Path

from distill.errors import ConfigError
from distill.methods.add import ADD
from distill.methods.base import LossOut, Method
from distill.methods.consistency import Consistency
from distill.methods.denoise import Denoise
from distill.methods.dmd2 import DMD2
from distill.methods.guidance import Guidance
from distill.methods.ladd import LADD
from distill.methods.progressive import Progressive
from distill.methods.rcm import RCM
from distill.methods.scm import SCM

METHODS: dict[str, type[Method]] = {"denoise": Denoise, "consistency": Consistency, "guidance": Guidance,
                                    "progressive": Progressive, "add": ADD, "ladd": LADD,
                                    "dmd2": DMD2, "scm": SCM, "rcm": RCM}

__all__ = ["METHODS", "LossOut", "Method", "check_config"]


def check_config(cfg) -> None:
    """The method part of a config: a registered name, its params, what the method needs of the rest of the
    config, and turn settings only for turns it has; a one-line ConfigError otherwise."""
    if cfg.method.name not in METHODS:
        near = difflib.get_close_matches(cfg.method.name, list(METHODS), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError("method.name", cfg.method.name, f"allowed: {', '.join(METHODS)}{hint}")
    method = METHODS[cfg.method.name]
    method.parse_params(cfg.method.params)
    method.check_config(cfg)
    if cfg.student.init_from and not Path(cfg.student.init_from).expanduser().is_dir():
        raise ConfigError("student.init_from", cfg.student.init_from, "no such run or checkpoint folder")
    for turn in {*cfg.train.turn_learning_rates, *cfg.train.turn_every} - set(method.turns):
        raise ConfigError("train.turn_learning_rates/turn_every", turn, f"method {cfg.method.name} has turns "
                          + ", ".join(method.turns))


def check_training(cfg) -> None:
    """What only a config about to train must pass; fills in the method's default turn ratios
    (Method.default_turn_every) when train.turn_every is unset, so a run folder's saved config keeps what ran."""
    method = METHODS[cfg.method.name]
    method.check_training(cfg)
    if not cfg.train.turn_every:
        cfg.train.turn_every = dict(method.default_turn_every)
