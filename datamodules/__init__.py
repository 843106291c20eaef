"""LightningDataModules, one per benchmark (installed as ``vlcompress.datamodules``)."""

from vlcompress.datamodules.easy_vqa import EasyVQADataModule

DATAMODULES = {"easy_vqa": EasyVQADataModule}

__all__ = ["DATAMODULES", "EasyVQADataModule"]
