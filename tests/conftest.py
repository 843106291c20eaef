"""Shared fixtures: the real easy-VQA data, loaded once per session."""

from __future__ import annotations

import pytest
import torch
from quick_run import TINY_RUN

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def easy_vqa_dm():
    """The standard easy-VQA split (real data from the `easy-vqa` package)."""
    from vlcompress.datamodules import EasyVQADataModule

    dm = EasyVQADataModule(split="standard", batch_size=16, eval_batch_size=32)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def easy_vqa_batch(easy_vqa_dm):
    """One training batch of 16 real easy-VQA examples."""
    return next(iter(easy_vqa_dm.train_dataloader()))


@pytest.fixture
def tiny_run() -> list[str]:
    """:data:`TINY_RUN`: overrides for a run of a few batches on the real data."""
    return list(TINY_RUN)
