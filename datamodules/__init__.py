"""LightningDataModules, one per benchmark (installed as ``vlcompress.datamodules``).

Each module registers itself (``@register("datamodule", name, options=...)``) and fulfils the
data contract of :mod:`vlcompress.data.contract`.
"""

if __name__ != "vlcompress.datamodules":  # the folder imported as a top-level package
    raise ImportError(
        f"the datamodules/ folder is installed as the package vlcompress.datamodules; import it under that "
        f"name (from vlcompress.datamodules import EasyVQADataModule), not as {__name__!r}: imported twice, every component in it "
        "would register twice"
    )


from vlcompress.datamodules.easy_vqa import EasyVQADataModule, EasyVQAOptions

__all__ = ["EasyVQADataModule", "EasyVQAOptions"]
