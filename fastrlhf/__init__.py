"""fastrlhf: InstructGPT-style RLHF on one GPU."""

__version__ = "0.1.0"
