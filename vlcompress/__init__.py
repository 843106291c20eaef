"""vlcompress: compress and debias vision-language models for VQA, with Lightning callbacks."""

__version__ = "0.1.0"
