"""The model contract's defaults and the options base class (the registered models themselves
are checked against the contract in tests/test_registry.py)."""

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.models import contract
from vlcompress.options import ModelOptions, check_fields, literal_choices, positive, probability


class PlainModel(nn.Module):
    """A module that maps a batch to logits and declares nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, batch: VLBatch) -> torch.Tensor:
        return self.linear(batch.visual.mean(1))


def _batch() -> VLBatch:
    ids = torch.tensor([[1, 2, 0], [3, 0, 0]])
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(2, 5, 4))


def test_a_plain_module_gets_the_documented_defaults():
    model = PlainModel()
    assert not isinstance(model, contract.VQAModel)
    assert contract.returns_extras(model) is False
    assert contract.pooled_dim(model) is None and contract.question_dim(model) is None
    assert contract.options_of(model) is None
    assert contract.overall_rate_weights(model) == ()
    logits, extras = contract.forward_extras(model, _batch())
    assert logits.shape == (2, 3) and extras == {}


def test_the_task_reads_the_model_through_the_contract():
    from vlcompress.tasks.vqa import VQATask

    task = VQATask(PlainModel(), ["a", "b", "c"], loss="bce")
    logits, extras = task.forward_extras(_batch())
    assert logits.shape == (2, 3) and extras == {}
    with pytest.raises(ValueError, match="pooled"):  # LMH needs pooled features
        VQATask(PlainModel(), ["a", "b", "c"], loss="lmh")


def test_options_of_ignores_a_config_that_is_not_ours():
    class HFLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = {"hidden_size": 8}  # Hugging Face's name for its own configuration

    assert contract.options_of(HFLike()) is None


@dataclass(frozen=True)
class _Options(ModelOptions):
    size: int = positive(8)
    heads: int = positive(2)
    rate: float = probability(0.1)
    mode: Literal["padded", "stack"] = "padded"
    norm: Literal["layer", "rms"] | None = None
    limit: int | None = positive(None)

    def check(self) -> None:
        if self.size % self.heads:
            raise ValueError("_Options size must be divisible by heads.")


def test_model_options_check_every_field_then_the_cross_field_checks():
    assert _Options().mode == "padded"
    with pytest.raises(ValueError) as err:
        _Options(size=0, rate=1.0, mode="stak", norm="batch")
    text = str(err.value)
    assert text.startswith("_Options: ")
    assert "size: must be >= 1, got 0" in text
    assert "rate: must be < 1.0, got 1.0" in text
    assert "mode: 'stak' is not one of ['padded', 'stack']; did you mean 'stack'?" in text
    assert "norm: 'batch' is not one of ['layer', 'rms', None]" in text
    assert "divisible" not in text  # cross-field checks run on valid fields only
    with pytest.raises(ValueError, match="must be divisible by heads"):
        _Options(size=9, heads=2)
    assert _Options(norm="rms", limit=3).limit == 3


def test_literal_choices_reads_closed_sets_only():
    assert literal_choices(Literal["a", "b"]) == ("a", "b")
    assert literal_choices(Literal["a"] | None) == ("a", None)
    assert literal_choices(Literal["a"] | int) is None
    assert literal_choices(int) is None and literal_choices(None) is None


def test_check_fields_still_reads_choices_metadata():
    from dataclasses import field

    from vlcompress.options import choices

    @dataclass(frozen=True)
    class Old:
        split: str = field(default="standard", metadata=choices("standard", "cp"))

    with pytest.raises(ValueError, match=r"split: 'cpp' is not one of .*did you mean 'cp'"):
        check_fields(Old(split="cpp"))
