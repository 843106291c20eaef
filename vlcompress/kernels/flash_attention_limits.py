"""What the Triton attention kernel supports (importable without Triton)."""

HEAD_DIMS = (16, 32, 64, 128)
BLOCK_SIZES = (16, 32, 64, 128)
