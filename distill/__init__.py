"""distill: turn SDXL / SD3 teachers into few-step students.

    import distill
    run = distill.train("experiments/lcm_digits_sdxl.yaml", {"train.max_steps": 200})
    pipe = distill.load(run)

See distill.api for train, load, evaluate and export.
"""

__version__ = "0.1.0"

from distill.api import Evaluation, evaluate, export, load, train  # noqa: E402

__all__ = ["Evaluation", "evaluate", "export", "load", "train", "__version__"]
