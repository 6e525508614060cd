"""unisd: reliability-aware self-distillation for LLMs."""

__version__ = "0.1.0"
