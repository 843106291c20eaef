"""LightningModules (tasks) wrapping any base model."""

from vlcompress.tasks.vqa import VQATask

__all__ = ["VQATask"]
