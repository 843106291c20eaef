"""Overrides of the default experiment that make a real easy-VQA run take seconds (one place
for every test that trains; ``tests/`` is on ``sys.path`` through its conftest)."""

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
