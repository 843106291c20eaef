"""The model contract: what the task, the callbacks and the export may use of a base VQA model.

Every registered model meets :class:`VQAModel` (``tests/test_registry.py`` checks it for every
registered name, built tiny); one that can be slimmed also meets :class:`SlimmableVQAModel`.
Code outside the model reads the model through these names only, never through attributes
it finds by trying.

The task (:class:`~vlcompress.tasks.vqa.VQATask`) also accepts any other ``nn.Module`` that maps
a :class:`~vlcompress.data.batch.VLBatch` to logits (a test double, a user's own model). What
such a module does not declare takes the default documented on the functions below
(:func:`returns_extras`, :func:`pooled_dim`, :func:`question_dim`, :func:`options_of`,
:func:`overall_rate_weights`), the one place those defaults live.

Example::

    model = build_model("mcan_tiny", vocab_size=50, num_answers=13)
    assert isinstance(model, VQAModel)
    logits, extras = forward_extras(model, batch)   # extras["pooled"]: (B, model.pooled_dim)
    anatomy = model.anatomy()                       # layers, heads, FFNs, read-outs, task head
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.models.anatomy import Anatomy
from vlcompress.options import ModelOptions

__all__ = [
    "EXTRAS",
    "READOUTS",
    "SlimmableVQAModel",
    "VQAModel",
    "forward_extras",
    "options_of",
    "overall_rate_weights",
    "pooled_dim",
    "pair_problem",
    "question_dim",
    "reads_pairs",
    "returns_extras",
]

EXTRAS = ("pooled", "question")
"""The keys of ``extras`` in ``model(batch, return_extras=True) -> (logits, extras)``:
``pooled`` ``(B, pooled_dim)``, the fused features the task head reads (LMH's gate), and
``question`` ``(B, question_dim)``, the question's representation before any fusion (RUBi's
question-only branch)."""

READOUTS = ("language_input", "vision_input", "fused")
"""The read-outs every model's anatomy names (``model.anatomy().readouts``): the question and
image features entering the model and the fused features the task head reads; callbacks
capture them through :meth:`~vlcompress.models.anatomy.Anatomy.capture`."""


@runtime_checkable
class VQAModel(Protocol):
    """What every registered base VQA model offers (``isinstance(model, VQAModel)`` checks
    that each member is present; the registry tests also check shapes and types).

    It is an ``nn.Module``, called as ``model(batch)`` (through ``nn.Module.__call__``, so hooks
    fire and a compiled model stays compiled); its weights are its ``state_dict``, nothing
    else (the options are not stored in it: they are rebuilt from ``options``).

    Attributes:
        options: the frozen options dataclass it was built from (a
            :class:`~vlcompress.options.ModelOptions`); ``registry.build("model", name,
            dataclasses.asdict(options), vocab_size=..., num_answers=...)`` rebuilds the same
            architecture (an export's ``config.yaml`` records exactly that).
        vocab_size: size of the question vocabulary (every id in ``batch.text_ids`` is below it;
            0 is padding).
        num_answers: outputs of the task head: logit ``i`` scores the task's ``answers[i]``.
        returns_extras: ``True`` when ``forward(batch, return_extras=True)`` returns
            ``(logits, extras)`` with the :data:`EXTRAS` (every registered model does).
        pooled_dim: size of ``extras["pooled"]``.
        question_dim: size of ``extras["question"]``.

    Example::

        def describe(model: VQAModel) -> str:
            return f"{type(model).__name__}: {model.num_answers} answers, {model.options}"
    """

    options: ModelOptions
    vocab_size: int
    num_answers: int
    returns_extras: bool
    pooled_dim: int
    question_dim: int

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)``
        where ``extras`` holds the :data:`EXTRAS` (``pooled`` ``(B, pooled_dim)``,
        ``question`` ``(B, question_dim)``).

        Raises:
            ValueError: for a batch of the wrong kind (pixels for a region model, ...), naming
                the option or data setting to change.
        """
        ...

    def anatomy(self) -> Anatomy:
        """The model's structure, which every compression callback works through: layers,
        attention heads, FFNs and their modalities, the :data:`READOUTS`, the task head's
        modules (``head_modules``), the weights outside the layers (``extra_weights``) and,
        where it can be slimmed, the :class:`~vlcompress.models.anatomy.SlimSpec`. Head counts
        and FFN sizes are read from the modules, so the anatomy stays right after units are
        removed."""
        ...


@runtime_checkable
class SlimmableVQAModel(VQAModel, Protocol):
    """A :class:`VQAModel` whose submodels (fewer units per layer, fewer layers) can be
    exported as models of their own (``compress/slimmable.py``'s ``Slimmable.export``).

    Example::

        overrides = model.slimmed_options(width=0.5, layers=2)   # {"hidden_size": 16, ...}
        small = dataclasses.replace(model.options, **overrides)
    """

    def slimmed_options(self, width: float, layers: int) -> dict[str, Any]:
        """Option overrides that build this model's submodel at ``width`` (fraction of the
        units kept) with ``layers`` layers per stack.

        Raises:
            ValueError: when the width does not keep whole attention heads.
        """
        ...


def returns_extras(model: nn.Module) -> bool:
    """Whether ``model(batch, return_extras=True)`` returns ``(logits, extras)`` (its
    ``returns_extras``; default ``False``: the module maps a batch to logits only)."""
    return bool(getattr(model, "returns_extras", False))


def forward_extras(model: nn.Module, batch: VLBatch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Answer logits and the model's extras (``{}`` for a model without
    :func:`returns_extras`), through ``nn.Module.__call__``.

    Example::

        logits, extras = forward_extras(model, batch)
    """
    if returns_extras(model):
        return model(batch, return_extras=True)
    return model(batch), {}


def pooled_dim(model: nn.Module) -> int | None:
    """Size of ``extras["pooled"]`` (its ``pooled_dim``; default ``None``: no pooled
    features, a loss that needs them says so when it is set up)."""
    return getattr(model, "pooled_dim", None)


def question_dim(model: nn.Module) -> int | None:
    """Size of ``extras["question"]`` (its ``question_dim``; default ``None``: no question
    features, a loss that needs them says so when it is set up)."""
    return getattr(model, "question_dim", None)


def options_of(model: nn.Module) -> Any | None:
    """The options dataclass that rebuilds ``model`` through the registry (its ``options``;
    default ``None``: a module of another library, such as a Hugging Face model, whose
    ``config`` is not ours)."""
    options = getattr(model, "options", None)
    return options if dataclasses.is_dataclass(options) and not isinstance(options, type) else None


def reads_pairs(model: nn.Module) -> bool:
    """Whether the model reads two images per example (``batch.visual`` ``(B, 2, 3, H, W)``,
    NLVR2-style pair data; its ``reads_pairs``; default ``False``: one image per example)."""
    return bool(getattr(model, "reads_pairs", False))


def pair_problem(model: nn.Module, model_name: str, visual_input: str) -> str | None:
    """What is wrong with giving data of ``visual_input`` to ``model`` as to pairs (``None``:
    both read pairs, or neither)."""
    pairs = visual_input == "pixel_pairs"
    if pairs == reads_pairs(model):
        return None
    if pairs:
        return (
            f"the data serves image pairs (two images per example) but model {model_name!r} "
            "reads one image per example; use a model with a pair head (vilt_*: "
            "model.options.head: pair)."
        )
    return (
        f"model {model_name!r} reads image pairs (head: pair) but the data serves "
        f"{visual_input} with one image per example; use a pair data module (easy_pairs, "
        "nlvr2) or model.options.head: vqa."
    )


def overall_rate_weights(model: nn.Module) -> tuple[str, ...]:
    """Prunable weights that pruning treats at the overall rate rather than their modality's
    (its ``overall_rate_weights``, e.g. LXMERT's pooler; default ``()``)."""
    return tuple(getattr(model, "overall_rate_weights", ()))
