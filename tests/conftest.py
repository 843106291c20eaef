"""Shared fixtures: the real easy-VQA data, loaded once per session."""

from __future__ import annotations

import pytest
import torch

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


TINY_RUN = [
    "model.name=mcan_tiny",
    "model.options={visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16}",
    "progress_bar=false",
    "data.options.batch_size=32",
    "data.options.eval_batch_size=256",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=2",
    "scheduler.name=none",
]
"""Overrides of the default experiment that make a real easy-VQA run take seconds."""


@pytest.fixture
def tiny_run() -> list[str]:
    """:data:`TINY_RUN`: overrides for a run of a few batches on the real data."""
    return list(TINY_RUN)
