"""LightningDataModules, one per benchmark (installed as ``vlcompress.datamodules``).

Each module registers itself (``@register("datamodule", name, options=...)``) and fulfils the
data contract of :mod:`vlcompress.data.contract`.
"""

from vlcompress.datamodules.easy_vqa import EasyVQADataModule, EasyVQAOptions

__all__ = ["EasyVQADataModule", "EasyVQAOptions"]
