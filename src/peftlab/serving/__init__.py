"""Serving many adapters on one base model: mixed-adapter batches (library) and an HTTP server."""

from .batch import NotBatchableError, batch_adapters
from .mixers import register_kind

__all__ = ["NotBatchableError", "batch_adapters", "register_kind"]
