"""The registry of distillation methods: config name -> class. One file per method."""
from distill.methods.base import LossOut, Method
from distill.methods.consistency import Consistency

METHODS: dict[str, type[Method]] = {"consistency": Consistency}

__all__ = ["METHODS", "LossOut", "Method"]
