"""The registry of distillation methods: config name -> class. One file per method."""
from distill.methods.add import ADD
from distill.methods.base import LossOut, Method
from distill.methods.consistency import Consistency
from distill.methods.denoise import Denoise
from distill.methods.dmd2 import DMD2
from distill.methods.guidance import Guidance
from distill.methods.ladd import LADD
from distill.methods.progressive import Progressive

METHODS: dict[str, type[Method]] = {"denoise": Denoise, "consistency": Consistency, "guidance": Guidance,
                                    "progressive": Progressive, "add": ADD, "ladd": LADD,
                                    "dmd2": DMD2}

__all__ = ["METHODS", "LossOut", "Method"]
