"""opdistill: on-policy distillation of language models."""

from opdistill.errors import OpdistillError

__version__ = "0.1.0"
__all__ = ["OpdistillError", "__version__"]
