"""distill: turn SDXL / SD3 teachers into few-step students."""

__version__ = "0.1.0"
