"""The RNG states a checkpoint keeps: a resumed run draws what the uninterrupted one drew, on
the CPU and (where CUDA is in use) from the GPU's generator, which feeds dropout there and the
attention kernel's in-kernel dropout seeds."""

import io
import random

import numpy as np
import torch

from vlcompress.tasks import vqa


def test_cpu_states_round_trip_and_no_cuda_state_without_cuda():
    state = vqa.rng_state()
    want = (torch.rand(3), np.random.rand(), random.random())
    vqa._set_rng(state)
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    if not torch.cuda.is_available():
        assert "cuda" not in state


def test_the_cuda_generator_state_is_saved_and_restored(monkeypatch):
    """Emulated CUDA (this machine has none): the current device's generator state goes into
    the checkpoint and comes back on resume."""
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s))
    state = vqa.rng_state()
    assert torch.equal(state["cuda"], cuda_state)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a checkpoint loads it with weights_only=True
    buffer.seek(0)
    vqa._set_rng(torch.load(buffer, weights_only=True))
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
