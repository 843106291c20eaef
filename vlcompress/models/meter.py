"""METER (Dou et al., CVPR 2022) for VQA and for image pairs (NLVR2): a RoBERTa text tower and a
CLIP ViT image tower, fused by two streams of co-attention layers.

The module names are those of zdou0830/METER's ``METERTransformerSS``, so a METER Lightning
checkpoint (``torch.load(path)["state_dict"]``) loads by name (:func:`load_meter_checkpoint`):

* ``text_transformer``: transformers' ``RobertaModel`` (RoBERTa-base: 12 layers, 768, with its
  pooler, which METER keeps but never uses); its last hidden state is the text tower's output;
* ``vit_model.visual``: OpenAI CLIP's ViT image tower under OpenAI's names
  (:class:`~vlcompress.encoders.clip_vit.CLIPVisionTransformer`: ``conv1``,
  ``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N``,
  ``ln_post``), without CLIP's last block (METER reads the second-to-last layer) and without
  the projection; ``ln_post`` normalises every token;
* ``cross_modal_text_transform`` / ``cross_modal_image_transform``: Linear maps of each tower's
  tokens to the fusion width;
* ``token_type_embeddings``: type 0 added to the text, type 1 to the image (type 2 to a pair's
  second image: the table has 3 rows with ``head: pair``, row 2 a copy of row 1 when it starts
  from a 2-row table, as METER starts NLVR2);
* ``cross_modal_text_layers.N`` / ``cross_modal_image_layers.N`` (:class:`MeterCrossLayer`,
  METER's ``BertCrossLayer``): post-norm self-attention, cross-attention to the other stream,
  FFN; at depth ``i`` the text layer reads (text, image) and the image layer reads (image,
  text), both outputs of depth ``i - 1``;
* ``cross_modal_text_pooler`` / ``cross_modal_image_pooler``: ``tanh(Linear)`` of each stream's
  first token;
* ``head: vqa``: ``vqa_classifier`` = Linear(2H, 2H) -> LayerNorm -> GELU -> Linear(2H,
  answers) over ``[text pooled; image pooled]``;
* ``head: pair`` (NLVR2): two passes (image 1 with type 1, image 2 with type 2), their
  ``[text pooled; image pooled]`` concatenated -> ``nlvr2_classifier`` = Linear(4H, 2H) ->
  LayerNorm -> GELU -> Linear(2H, 2).

Images come as pixels in [0, 1] (``(B, 3, H, W)``; pairs ``(B, 2, 3, H, W)``), resized to
``image_size`` (bicubic) and normalised with CLIP's mean and std inside the model. METER attends
to every patch and has no pixel mask: a batch whose ``visual_mask`` marks padding (images of
different sizes padded to one, as ``nlvr2`` and ``vqa_v2`` with ``visual_features: images``
serve them) is refused with a ``ValueError``, since the resize would stretch the padding into
the picture; an all-True mask is accepted. The CLIP position table
is kept at ``image_size`` (METER's 224 px CLIP table interpolated bicubically to 288 / 384 /
576 px); a table of another size in a checkpoint is interpolated the same way when it loads.

Registered variants (:data:`METER_VARIANTS`): ``meter_clip16_roberta`` (METER-CLIP16-RoBERTa:
about 326.6M parameters with 3,129 answers at 384 px; random unless ``pretrained``,
``text_init`` or ``vision_init`` names local files) and ``meter_tiny`` (tests).

Anatomy: language = the RoBERTa layers and embeddings; vision = the CLIP blocks (packed
``nn.MultiheadAttention``), patch embedding, class token, positions and norms; cross = each of
the 12 fusion halves as a layer of its own (so that skipping one half leaves the other half of
its depth reading the skipped half's input), the transforms, the type table and the poolers;
the task head is the classifier.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.encoders.clip_resnet import _read_openai_checkpoint, clip_input
from vlcompress.encoders.clip_vit import CLIPVisionTransformer, clip_vit_config
from vlcompress.models.anatomy import (
    Anatomy,
    AttentionSpec,
    FFNSpec,
    LayerSpec,
    Modality,
    Stream,
    prunable_weights_in,
)
from vlcompress.models.anatomy.recognise import RECOGNISERS
from vlcompress.models.image_input import check_pair_answers, image_stack, trimmed_text
from vlcompress.options import ModelOptions, local_path, positive, probability
from vlcompress.utils.hf_checkpoint import checkpoint_folder, read_state_dict, size_mismatches

__all__ = [
    "METER",
    "METER_VARIANTS",
    "MeterAttention",
    "MeterCLIP",
    "MeterCrossLayer",
    "MeterIntermediate",
    "MeterOptions",
    "MeterOutput",
    "MeterPooler",
    "MeterSelfAttention",
    "MeterSelfOutput",
    "MeterVisual",
    "interpolate_positions",
    "load_clip_vision",
    "load_meter_checkpoint",
    "load_roberta",
    "save_meter_checkpoint",
]

log = logging.getLogger(__name__)

ROBERTA_PAD = 1
"""RoBERTa's padding id, from which its position ids count (real tokens start at 2)."""

FUSION_LN_EPS = 1e-12
"""LayerNorm eps of the fusion layers (METER builds them from a default ``RobertaConfig``)."""

TEXT_LN_EPS = 1e-5
"""LayerNorm eps of RoBERTa-base."""


@dataclass(frozen=True)
class MeterOptions(ModelOptions):
    """Sizes, inputs and initialisation of a METER model (see :data:`METER_VARIANTS`).

    Attributes:
        text_hidden_size: width of the RoBERTa text tower (768).
        text_layers: RoBERTa layers (12).
        text_heads: RoBERTa attention heads (12).
        text_ffn_size: RoBERTa FFN units (3072).
        text_positions: rows of RoBERTa's position table (514: 512 tokens + the 2 offset rows
            from the padding id); at least ``max_text_len + 2``.
        max_text_len: longest question in tokens (METER: 50); longer text is refused.
        vision_width: width of the CLIP ViT image tower (768 for ViT-B/16).
        vision_layers: CLIP blocks the model keeps (11: ViT-B/16's 12 less the last, which
            METER drops to read the second-to-last layer).
        vision_heads: attention heads of the CLIP blocks (OpenAI: ``vision_width // 64``).
        patch_size: side of an image patch in pixels (16 for ViT-B/16).
        image_size: side of the square images are resized to, and that the CLIP position table
            covers (384; METER's VQA fine-tuning used 576, NLVR2 288).
        resize_images: resize pixel batches to ``image_size`` (bicubic, as METER's transforms);
            ``False``: keep their size and interpolate the position table to their patch grid.
        hidden_size: width of the fusion layers (768).
        num_heads: attention heads of each fusion attention (12).
        ffn_size: FFN units of each fusion layer (3072).
        num_fusion_layers: co-attention depth: that many text and image layers each (6).
        head: ``vqa`` (one image, an answer classifier over ``[text; image]`` pooled) or
            ``pair`` (two images and one statement, NLVR2's two-pass head, 2 outputs).
        dropout: dropout of the text tower and the fusion layers (METER: 0.1; CLIP has none).
        pretrained: a METER Lightning checkpoint file (``torch.load(path)["state_dict"]`` with
            METER's key names, e.g. ``meter_clip16_288_roberta_vqa.ckpt``); its sizes must fit
            these options; a fine-tuned head of this kind and answer count loads, else the head
            starts fresh (logged); a position table of another size is interpolated.
        text_init: a local RoBERTa folder (Hugging Face layout: ``config.json`` +
            ``model.safetensors`` / ``pytorch_model.bin``, e.g. ``roberta-base``) for the text
            tower, the rest left fresh (METER's starting point before pre-training).
        vision_init: a local OpenAI CLIP ViT checkpoint (``ViT-B-16.pt``), or a folder holding
            exactly one ``.pt`` file, for the image tower (its first ``vision_layers`` blocks; the
            position table interpolated to ``image_size``).

    Raises:
        ValueError: for out-of-range sizes, widths not divisible by their heads, an
            ``image_size`` that is not a whole number of patches, a position table shorter than
            ``max_text_len + 2``, or ``pretrained`` together with ``text_init`` / ``vision_init``.

    Example::

        options = dataclasses.replace(METER_VARIANTS["meter_clip16_roberta"], image_size=576)
        model = METER(options, vocab_size=50265, num_answers=3129)
    """

    text_hidden_size: int = positive(768)
    text_layers: int = positive(12)
    text_heads: int = positive(12)
    text_ffn_size: int = positive(3072)
    text_positions: int = positive(514)
    max_text_len: int = positive(50)
    vision_width: int = positive(768)
    vision_layers: int = positive(11)
    vision_heads: int = positive(12)
    patch_size: int = positive(16)
    image_size: int = positive(384)
    resize_images: bool = True
    hidden_size: int = positive(768)
    num_heads: int = positive(12)
    ffn_size: int = positive(3072)
    num_fusion_layers: int = positive(6)
    head: Literal["vqa", "pair"] = "vqa"
    dropout: float = probability(0.1)
    pretrained: str | None = field(default=None, metadata=local_path("file"))
    text_init: str | None = field(default=None, metadata=local_path("dir"))
    vision_init: str | None = field(default=None, metadata=local_path("file_or_dir"))

    def check(self) -> None:
        """METER's cross-field checks (each field is checked on its own before)."""
        for width, heads, what in (
            ("text_hidden_size", "text_heads", "text tower"),
            ("vision_width", "vision_heads", "image tower"),
            ("hidden_size", "num_heads", "fusion layers"),
        ):
            w, h = getattr(self, width), getattr(self, heads)
            if w % h:
                raise ValueError(
                    f"METER {width} ({w}) must be divisible by {heads} ({h}) in the {what}; "
                    f"e.g. {width}={h * 64}."
                )
        if self.image_size % self.patch_size:
            fit = max(1, self.image_size // self.patch_size) * self.patch_size
            raise ValueError(
                f"METER image_size ({self.image_size}) must be a whole number of patches of "
                f"{self.patch_size} px; e.g. image_size={fit}."
            )
        if self.text_positions < self.max_text_len + 2:
            raise ValueError(
                f"METER text_positions ({self.text_positions}) must be at least max_text_len + 2 "
                f"({self.max_text_len + 2}: RoBERTa's positions start after the padding id); "
                "raise text_positions or lower max_text_len."
            )
        if self.pretrained and (self.text_init or self.vision_init):
            raise ValueError(
                "METER: give either pretrained (a whole METER checkpoint) or text_init / "
                "vision_init (towers under fresh fusion layers), not both; unset text_init and "
                "vision_init."
            )

    def roberta_config(self, vocab_size: int) -> Any:
        """The ``RobertaConfig`` of the text tower."""
        from transformers import RobertaConfig

        return RobertaConfig(**self.roberta_sizes(vocab_size), type_vocab_size=1,
                             pad_token_id=ROBERTA_PAD, bos_token_id=0, eos_token_id=2,
                             layer_norm_eps=TEXT_LN_EPS, hidden_dropout_prob=self.dropout,
                             attention_probs_dropout_prob=self.dropout)  # fmt: skip

    def roberta_sizes(self, vocab_size: int) -> dict[str, int]:
        """``{RobertaConfig field: value}`` of the text tower (what a RoBERTa folder's
        ``config.json`` must match)."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.text_hidden_size,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads,
            "intermediate_size": self.text_ffn_size,
            "max_position_embeddings": self.text_positions,
        }


METER_VARIANTS: dict[str, MeterOptions] = {
    "meter_clip16_roberta": MeterOptions(),
    "meter_tiny": MeterOptions(
        text_hidden_size=32, text_layers=2, text_heads=4, text_ffn_size=64, text_positions=34,
        max_text_len=32, vision_width=32, vision_layers=2, vision_heads=4, patch_size=16,
        image_size=32, hidden_size=32, num_heads=4, ffn_size=64, num_fusion_layers=2,
    ),
}  # fmt: skip
"""Registered sizes: ``meter_clip16_roberta`` as published (RoBERTa-base, CLIP ViT-B/16 less
its last block, 6 + 6 fusion layers of 768, 384 px), ``meter_tiny`` for tests."""


def _init_weights(module: nn.Module) -> None:
    """METER's ``objectives.init_weights``: N(0, 0.02) Linear / Embedding weights, zero
    biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


# ---------------------------------------------------------------------- the image tower
class MeterVisual(CLIPVisionTransformer):
    """CLIP's ViT as METER keeps it (``vit_model.visual``): OpenAI's parameter names, no output
    projection, ``ln_post`` over every token; ``forward(images) -> (B, 1 + patches, width)``.

    Args:
        image_size: side of the square the position table covers.
        patch_size: pixels per patch side.
        width: transformer width.
        layers: residual attention blocks (CLIP's count less the last).
        heads: attention heads.

    Example::

        visual = MeterVisual(384, 16, 768, 11, 12)
        visual(clip_input(pixels, 384)).shape      # (B, 577, 768)
    """

    def __init__(
        self, image_size: int, patch_size: int, width: int, layers: int, heads: int
    ) -> None:
        super().__init__(image_size, patch_size, width, layers, heads, embed_dim=1)
        del self.proj  # METER's VisualTransformer has none
        attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
        proj_std = attn_std * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:  # OpenAI's CLIP.initialize_parameters
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    @property
    def embed_dim(self) -> int:
        """Size of the output tokens (no projection: the width)."""
        return self.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Tokens ``(B, 1 + H/p * W/p, width)`` of CLIP-normalised images ``(B, 3, H, W)``:
        the class token first, each after ``ln_post``."""
        return self.tokens(images)


class MeterCLIP(nn.Module):
    """METER's ``vit_model``: the holder of the image tower ``visual`` (:class:`MeterVisual`)."""

    def __init__(self, o: MeterOptions) -> None:
        super().__init__()
        self.visual = MeterVisual(o.image_size, o.patch_size, o.vision_width, o.vision_layers,
                                  o.vision_heads)  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens of CLIP-normalised images (see :meth:`MeterVisual.forward`)."""
        return self.visual(images)


# ---------------------------------------------------------------------- the fusion layers
class MeterSelfAttention(nn.Module):
    """BERT's multi-head attention projections ``query`` / ``key`` / ``value`` (queries from
    ``hidden_states``, keys and values from ``context``); returns the heads' concatenated
    context ``(B, T, H)`` before the output projection."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.num_attention_heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``(B, T, H)`` queries over ``(B, S, H)`` keys with an additive ``bias`` ``(B, 1, 1,
        S)`` (``None``: every key) -> ``(B, T, H)``."""
        b, t, _ = hidden_states.shape
        d = self.query.out_features // self.num_attention_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], -1, d).transpose(1, 2)

        q, k, v = (
            split(self.query(hidden_states)),
            split(self.key(context)),
            split(self.value(context)),
        )
        if bias is not None:  # autocast: the mask in the queries' dtype, finite
            bias = bias.to(q.dtype).clamp(min=torch.finfo(q.dtype).min)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        return out.transpose(1, 2).reshape(b, t, -1)


class MeterSelfOutput(nn.Module):
    """BERT's attention output: ``LayerNorm(dropout(dense(heads)) + input_tensor)``."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=FUSION_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """Project, add the residual, normalise (post-norm)."""
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MeterAttention(nn.Module):
    """METER's ``BertAttention``: ``self`` (projections) and ``output`` (dense + residual +
    LayerNorm); self-attention when called without ``context``, cross-attention with it."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self = MeterSelfAttention(hidden, heads, dropout)
        self.output = MeterSelfOutput(hidden, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor | None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T, H)`` -> ``(B, T, H)``; ``bias`` masks the keys (of ``context`` if given)."""
        keys = hidden_states if context is None else context
        return self.output(self.self(hidden_states, keys, bias), hidden_states)


class MeterIntermediate(nn.Module):
    """BERT's FFN up-projection: ``gelu(dense(x))``."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` -> ``(B, T, ffn)``."""
        return F.gelu(self.dense(hidden_states))


class MeterOutput(nn.Module):
    """BERT's FFN output: ``LayerNorm(dropout(dense(units)) + input_tensor)``."""

    def __init__(self, hidden: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(ffn, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=FUSION_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """Project the units, add the residual, normalise (post-norm)."""
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MeterCrossLayer(nn.Module):
    """METER's ``BertCrossLayer``: self-attention over its stream, cross-attention to the
    other stream, FFN, each post-norm (BERT style).

    Args:
        hidden: stream width.
        heads: attention heads of both attentions.
        ffn: FFN units.
        dropout: dropout of the attention probabilities and the sublayer outputs.

    Example::

        layer = MeterCrossLayer(768, 12, 3072, 0.1)
        text = layer(text, image, text_bias, None)   # (B, T, 768)
    """

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = MeterAttention(hidden, heads, dropout)
        self.crossattention = MeterAttention(hidden, heads, dropout)
        self.intermediate = MeterIntermediate(hidden, ffn)
        self.output = MeterOutput(hidden, ffn, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The stream ``(B, T, H)`` after attending to itself and to ``encoder_hidden_states``
        ``(B, S, H)``; the masks are additive ``(B, 1, 1, T)`` / ``(B, 1, 1, S)`` (``None``:
        every token)."""
        x = self.attention(hidden_states, attention_mask)
        x = self.crossattention(x, encoder_attention_mask, encoder_hidden_states)
        return self.output(self.intermediate(x), x)


class MeterPooler(nn.Module):
    """METER's ``heads.Pooler``: ``tanh(dense(first token))``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` -> ``(B, H)``."""
        return self.activation(self.dense(hidden_states[:, 0]))


def _classifier(width: int, hidden: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
        nn.Linear(2 * hidden, outputs),
    )  # fmt: skip


# ---------------------------------------------------------------------- the model
class METER(nn.Module):
    """METER for VQA (``head: vqa``) or image pairs (``head: pair``);
    ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes, head and initialisation (see :data:`METER_VARIANTS`).
        vocab_size: text vocabulary (RoBERTa's BPE: 50,265).
        num_answers: classifier outputs (2 with ``head: pair``).

    Raises:
        ValueError: ``head: pair`` with other than 2 answers; a checkpoint that does not fit.
        FileNotFoundError: a missing checkpoint file or folder.

    Example::

        model = build_model("meter_tiny", vocab_size=50, num_answers=13)
        logits, extras = model(batch, return_extras=True)   # extras["pooled"]: (B, 64)
    """

    returns_extras = True

    def __init__(self, options: MeterOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        from transformers import RobertaModel

        o = options
        check_pair_answers("METER", o.head, num_answers)
        self.options, self.vocab_size, self.num_answers = o, vocab_size, num_answers
        self.reads_pairs = o.head == "pair"
        self.text_transformer = RobertaModel(o.roberta_config(vocab_size), add_pooling_layer=True)
        # METER keeps RoBERTa's pooler (its checkpoints hold it) but never runs it.
        self.text_transformer.pooler.requires_grad_(False)
        self.vit_model = MeterCLIP(o)
        self.cross_modal_text_transform = nn.Linear(o.text_hidden_size, o.hidden_size)
        self.cross_modal_image_transform = nn.Linear(o.vision_width, o.hidden_size)
        self.token_type_embeddings = nn.Embedding(3 if self.reads_pairs else 2, o.hidden_size)
        self.cross_modal_image_layers = nn.ModuleList(
            MeterCrossLayer(o.hidden_size, o.num_heads, o.ffn_size, o.dropout)
            for _ in range(o.num_fusion_layers)
        )
        self.cross_modal_text_layers = nn.ModuleList(
            MeterCrossLayer(o.hidden_size, o.num_heads, o.ffn_size, o.dropout)
            for _ in range(o.num_fusion_layers)
        )
        self.cross_modal_image_pooler = MeterPooler(o.hidden_size)
        self.cross_modal_text_pooler = MeterPooler(o.hidden_size)
        self.head_name = "nlvr2_classifier" if self.reads_pairs else "vqa_classifier"
        width = 2 * o.hidden_size * (2 if self.reads_pairs else 1)
        self.add_module(self.head_name, _classifier(width, o.hidden_size, num_answers))
        self.fused = nn.Identity()  # the classifier's input, as a read-out point
        for name, module in self.named_children():
            if name not in ("text_transformer", "vit_model"):
                module.apply(_init_weights)
        if self.reads_pairs:  # as METER starts NLVR2: the second image's type = the first's
            with torch.no_grad():
                self.token_type_embeddings.weight[2] = self.token_type_embeddings.weight[1]
        self.pooled_dim = width
        self.question_dim = o.text_hidden_size
        if o.pretrained:
            load_meter_checkpoint(self, o.pretrained)
        if o.text_init:
            load_roberta(self, o.text_init)
        if o.vision_init:
            load_clip_vision(self, o.vision_init)

    @property
    def classifier(self) -> nn.Sequential:
        """The task head (``vqa_classifier`` or ``nlvr2_classifier``)."""
        return getattr(self, self.head_name)

    # ------------------------------------------------------------------ inputs
    def _text(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Question ids and mask, trimmed (:func:`~vlcompress.models.image_input.trimmed_text`)."""
        limit = self.options.max_text_len
        return trimmed_text(
            batch, limit,
            f"METER reads questions of at most {limit} tokens (max_text_len), the batch has "
            "text of {length}; lower data.options.max_question_len (METER: 50) or raise "
            "model.options.max_text_len (and text_positions).",
        )  # fmt: skip

    def _images(self, batch: VLBatch) -> torch.Tensor:
        """CLIP-normalised pixels ``(B, I, 3, H, W)`` (``I`` = 1, or 2 for pairs), resized to
        ``image_size`` with ``resize_images``
        (:func:`~vlcompress.models.image_input.image_stack`)."""
        visual, mask = image_stack(batch, "METER", self.options.head, self.reads_pairs)
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                "METER has no pixel mask: it resizes each whole image to image_size x "
                "image_size, so the batch's padding (visual_mask False: images of different "
                f"sizes padded to {tuple(visual.shape[-2:])}) would be stretched into the "
                "picture. Give it images of one size, unpadded: resize every image to one fixed "
                "square in the data module (nlvr2 and vqa_v2 with visual_features: images keep "
                "each image's aspect ratio and pad), or use a data module whose images share "
                "one size (easy_vqa, easy_pairs)."
            )
        o = self.options
        size = o.image_size if o.resize_images else None
        return torch.stack([clip_input(visual[:, i], size) for i in range(visual.shape[1])], 1)

    # ------------------------------------------------------------------ towers and fusion
    def encode_text(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower: RoBERTa over ``(B, T)`` ids (positions counted from the mask, as
        RoBERTa counts them from its padding id).

        Returns:
            The tower's output ``(B, T, text_hidden_size)`` and the same mapped to the fusion
            width (``cross_modal_text_transform``) with the text type embedding added.
        """
        positions = torch.cumsum(text_mask.long(), dim=1) * text_mask.long() + ROBERTA_PAD
        hidden = self.text_transformer(
            input_ids=text_ids, attention_mask=text_mask.long(), position_ids=positions
        ).last_hidden_state
        types = self.token_type_embeddings(torch.zeros_like(text_ids))
        return hidden, self.cross_modal_text_transform(hidden) + types

    def encode_image(self, pixels: torch.Tensor, image_type: int = 1) -> torch.Tensor:
        """The image tower on CLIP-normalised ``(B, 3, H, W)``, mapped to the fusion width
        (``cross_modal_image_transform``) with the type embedding ``image_type`` added:
        ``(B, 1 + patches, hidden_size)``."""
        tokens = self.cross_modal_image_transform(self.vit_model(pixels))
        types = torch.full(tokens.shape[:2], image_type, dtype=torch.long, device=tokens.device)
        return tokens + self.token_type_embeddings(types)

    def fuse(
        self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """The co-attention layers over ``text`` ``(B, T, H)`` (masked by ``text_mask``) and
        ``image`` ``(B, N, H)``: ``[text pooled; image pooled]`` ``(B, 2H)``."""
        bias = (~text_mask)[:, None, None, :].to(text.dtype) * torch.finfo(text.dtype).min
        x, y = text, image
        for text_layer, image_layer in zip(self.cross_modal_text_layers,
                                           self.cross_modal_image_layers):  # fmt: skip
            x, y = text_layer(x, y, bias, None), image_layer(y, x, None, bias)
        return torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], -1)

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)``:
        ``"pooled"`` the classifier's input (``(B, 2H)``; pairs ``(B, 4H)``), ``"question"``
        the masked mean of the text tower's output ``(B, text_hidden_size)`` (before fusion).

        Raises:
            ValueError: for region features, the wrong number of images per example, padded
                images (a ``visual_mask`` not all True), or text longer than ``max_text_len``.
        """
        text_ids, text_mask = self._text(batch)
        pixels = self._images(batch)
        hidden, text = self.encode_text(text_ids, text_mask)
        pooled = [
            self.fuse(text, text_mask, self.encode_image(pixels[:, i], image_type=i + 1))
            for i in range(pixels.shape[1])
        ]
        features = self.fused(torch.cat(pooled, dim=-1))
        logits = self.classifier(features)
        if not return_extras:
            return logits
        weights = text_mask[..., None].to(hidden.dtype)
        question = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return logits, {"pooled": features, "question": question}

    # ------------------------------------------------------------------ anatomy
    def anatomy(self) -> Anatomy:
        """METER's structure: the RoBERTa layers (language, recognised), the CLIP blocks
        (vision, packed attention), each fusion half a cross layer of its own (self-attention
        on its stream, cross-attention to the other), the transforms, type table and poolers
        (cross), the classifier as task head. RoBERTa's unused pooler is declared but not
        prunable."""
        L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS
        an = RECOGNISERS["RobertaModel"](self.text_transformer).prefixed("text_transformer")
        unused = "text_transformer.pooler"
        an.extra_weights[L] = [w for w in an.extra_weights[L] if not w.startswith(unused)]
        vis = "vit_model.visual"
        stack = f"{vis}.transformer.resblocks"
        for i, block in enumerate(self.vit_model.visual.transformer.resblocks):
            path = f"{stack}.{i}"
            a = f"{path}.attn"
            heads = block.attn.num_heads
            an.attentions.append(
                AttentionSpec(
                    a,
                    heads,
                    block.attn.embed_dim // heads,
                    a,
                    a,
                    a,
                    f"{a}.out_proj",
                    V,
                    layout="packed",
                )  # fmt: skip
            )
            an.ffns.append(FFNSpec(f"{path}.mlp", f"{path}.mlp.c_fc", f"{path}.mlp.c_proj",
                                   block.mlp.c_fc.out_features, V))  # fmt: skip
            an.add_layer(LayerSpec(path, stack, i, V, (a,), (f"{path}.mlp",), output=Stream(0)))
        an.extra_modules[V] = [f"{vis}.{n}" for n in ("conv1", "class_embedding",
                               "positional_embedding", "ln_pre", "ln_post")]  # fmt: skip
        an.extra_weights[V] = [f"{vis}.conv1.weight"]
        for stack, side, other in (("cross_modal_text_layers", L, V),
                                   ("cross_modal_image_layers", V, L)):  # fmt: skip
            for i, layer in enumerate(getattr(self, stack)):
                path = f"{stack}.{i}"
                names = []
                for attn, kind in (("attention", "self"), ("crossattention", "cross")):
                    s = f"{path}.{attn}.self"
                    module = getattr(layer, attn).self
                    heads = module.num_attention_heads
                    an.attentions.append(
                        AttentionSpec(
                            f"{path}.{attn}",
                            heads,
                            module.query.out_features // heads,
                            f"{s}.query",
                            f"{s}.key",
                            f"{s}.value",
                            f"{path}.{attn}.output.dense",
                            X,
                            kind,
                            side,
                            other if kind == "cross" else side,
                        )  # fmt: skip
                    )
                    names.append(f"{path}.{attn}")
                an.ffns.append(FFNSpec(f"{path}.ffn", f"{path}.intermediate.dense",
                                       f"{path}.output.dense", layer.intermediate.dense.out_features,
                                       X, side))  # fmt: skip
                an.add_layer(LayerSpec(path, stack, i, X, tuple(names), (f"{path}.ffn",),
                                       streams=("hidden_states",), stream_sides=(side,),
                                       output=Stream(0)))  # fmt: skip
        tops = ["cross_modal_text_transform", "cross_modal_image_transform",
                "cross_modal_text_pooler", "cross_modal_image_pooler"]  # fmt: skip
        an.extra_modules[X] = [*tops, "token_type_embeddings", "fused"]
        an.extra_weights[X] = [w for t in tops for w in prunable_weights_in(getattr(self, t), t)]
        an.readouts.update(
            {
                "language_input": "text_transformer.embeddings",
                "vision_input": f"{vis}.ln_pre",
                "fused": "fused",
            }
        )
        an.head_modules = [self.head_name]
        return an


# ---------------------------------------------------------------------- checkpoints
_METER_ONLY = (
    "vit_model.positional_embedding", "vit_model.ln_final.", "vit_model.visual.proj",
    "text_transformer.embeddings.position_ids", "text_transformer.embeddings.token_type_ids",
    "mlm_score.", "itm_score.", "snli_classifier.", "rank_output.",
)  # fmt: skip
"""Keys of METER checkpoints the VQA / NLVR2 model does not use: CLIP's text-tower leftovers
(positions and final norm), RoBERTa's position buffers, the pre-training and other task heads."""

_HEADS = ("vqa_classifier.", "nlvr2_classifier.")
_POSITIONS = "vit_model.visual.positional_embedding"
_TYPES = "token_type_embeddings.weight"


def _option_for(key: str) -> str:
    """The option that sets the shape of checkpoint tensor ``key``."""
    if "word_embeddings" in key:
        return "the data's vocabulary (RoBERTa's 50,265 BPE tokens for METER's checkpoints)"
    if "position_embeddings" in key:
        return "model.options.text_positions"
    if key.startswith("text_transformer."):
        return "model.options.text_hidden_size / text_ffn_size"
    if key == "vit_model.visual.conv1.weight":
        return "model.options.patch_size / vision_width"
    if key.startswith("vit_model."):
        return "model.options.vision_width"
    if re.search(r"\.(intermediate|output)\.dense\.", key) and "attention" not in key:
        return "model.options.ffn_size"
    return "model.options.hidden_size"


def interpolate_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """A CLIP position table ``(1 + g*g, C)`` (class position first) resized to ``grid`` x
    ``grid`` patches, bicubically (METER's ``adapt_position_encoding``); the class position is
    kept.

    Raises:
        ValueError: when the table is not a square grid plus the class position.
    """
    before = math.isqrt(table.shape[0] - 1)
    if before * before + 1 != table.shape[0]:
        raise ValueError(
            f"{_POSITIONS} has {table.shape[0]} rows; expected a square patch grid plus the class "
            "position."
        )
    if before == grid:
        return table
    patches = table[1:].reshape(1, before, before, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
    return torch.cat([table[:1], patches])


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a METER Lightning checkpoint (or a bare state dict)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"METER checkpoint {str(path)!r} does not exist; download a METER checkpoint (e.g. "
            "meter_clip16_288_roberta_vqa.ckpt) on a machine with internet and set "
            "model.options.pretrained to the file."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A Lightning checkpoint may pickle its hyper-parameters as objects (AttributeDict).
        log.warning("METER checkpoint %s holds more than tensors: unpickling it in full "
                    "(load only files you trust)", path)  # fmt: skip
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"METER checkpoint {str(path)!r} holds no state dict (a dict with 'state_dict', as "
            "METER's Lightning checkpoints)."
        )
    return dict(state)


def load_meter_checkpoint(model: METER, path: str | Path) -> list[str]:
    """Load a METER Lightning checkpoint (``{"state_dict": {...}}`` with METER's key names) into
    ``model``.

    The keys are METER's and the model's alike (no renaming). CLIP's text-tower leftovers,
    RoBERTa's position buffers and the pre-training / other task heads are ignored
    (:data:`_METER_ONLY`); a position table of another image size is interpolated
    bicubically (:func:`interpolate_positions`); a 2-row type table loading into a ``head:
    pair`` model grows to 3 rows (row 2 = row 1), a 3-row one into a ``head: vqa`` model keeps
    its first 2; the classifier of this head loads when its shapes fit, else it starts fresh
    (logged). RoBERTa's unused pooler may be absent.

    Args:
        model: a :class:`METER` whose options fit the checkpoint.
        path: the file.

    Returns:
        The model's parameter names left at initialisation (logged).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when tensors are missing or unexpected, or a shape differs (each key named,
            with the option to change).
    """
    path = Path(path).expanduser()
    where = f"METER checkpoint {str(path)!r}"
    raw = _read_checkpoint(path)
    ours = model.state_dict()
    ignored = sorted({k for k in raw if k.startswith(_METER_ONLY)})
    state = {k: v for k, v in raw.items() if not k.startswith(_METER_ONLY)}
    if _POSITIONS in state and state[_POSITIONS].shape != ours[_POSITIONS].shape:
        grid = model.options.image_size // model.options.patch_size
        before = state[_POSITIONS].shape[0]
        state[_POSITIONS] = interpolate_positions(state[_POSITIONS], grid)
        log.info("%s: CLIP position table interpolated from %d to %d positions (%d px)", where,
                 before, state[_POSITIONS].shape[0], model.options.image_size)  # fmt: skip
    types = state.get(_TYPES)
    if types is not None and types.shape[0] != ours[_TYPES].shape[0]:
        if types.shape[0] == 2 and ours[_TYPES].shape[0] == 3:
            state[_TYPES] = torch.cat([types, types[1:2]])
            log.info("%s: type table grown to 3 rows (row 2 = row 1) for pairs", where)
        elif types.shape[0] == 3 and ours[_TYPES].shape[0] == 2:
            state[_TYPES] = types[:2]
            log.info("%s: type table of a pair model: rows 0 (text) and 1 (image) kept", where)
    head = {k: v for k, v in state.items() if k.startswith(_HEADS)}
    state = {k: v for k, v in state.items() if not k.startswith(_HEADS)}
    mine = {k: v for k, v in head.items() if k.startswith(model.head_name + ".")}
    if mine and all(k in ours and v.shape == ours[k].shape for k, v in mine.items()):
        state.update(mine)
    elif head:
        kinds = sorted({k.split(".")[0] for k in head})
        log.info("%s: its %s (%s outputs) is not this model's %s (%d outputs): the head starts "
                 "fresh", where, "/".join(kinds), next((v.shape[0] for k, v in head.items()
                                                        if k.endswith("3.bias")), "?"),
                 model.head_name, model.num_answers)  # fmt: skip
    optional = ("text_transformer.pooler.",)
    missing = [k for k in ours if k not in state and not k.startswith((*_HEADS, *optional))]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match this METER: missing {missing[:8] or 'nothing'}; unexpected "
            f"{unexpected[:8] or 'nothing'}. Set model.options.text_layers / vision_layers / "
            "num_fusion_layers to the checkpoint's, or give a METER checkpoint."
        )
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)} (set {_option_for(k)})"
        for k, v in state.items()
        if v.shape != ours[k].shape
    ]
    if shapes:
        raise ValueError(f"{where} does not fit this METER: {'; '.join(shapes[:5])}.")
    model.load_state_dict(state, strict=False)
    if ignored:
        groups = sorted({p.rstrip(".") for p in _METER_ONLY for k in ignored if k.startswith(p)})
        log.info("%s: ignoring %d tensors that this model does not use (%s)", where,
                 len(ignored), ", ".join(groups))  # fmt: skip
    fresh = [k for k, _ in model.named_parameters() if k not in state]
    log.info("loaded %s (%d tensors; %d left fresh: %s)", where, len(state), len(fresh), fresh)
    return fresh


def save_meter_checkpoint(model: METER, path: str | Path) -> Path:
    """Write ``model`` as METER's Lightning checkpoint layout (``{"state_dict": {...}}``, METER's
    key names), which :func:`load_meter_checkpoint` (``model.options.pretrained``) reads back.
    The write is atomic (a temporary file in the same folder, then ``os.replace``): an
    interrupted save leaves the previous file, never a truncated one.

    Returns:
        The file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_roberta(model: METER, path: str | Path) -> list[str]:
    """Load a RoBERTa folder (Hugging Face layout, e.g. ``roberta-base``) into the text tower.

    Keys under ``roberta.`` (``RobertaForMaskedLM``) or bare (``RobertaModel``) load into
    ``text_transformer``; the LM head is ignored; the pooler, absent from ``roberta-base``, may
    be missing.

    Returns:
        The text tower's tensors loaded.

    Raises:
        FileNotFoundError: when the folder or its files are missing.
        ValueError: when ``config.json``'s sizes differ from the options, or tensors are missing
            or of other shapes.
    """
    fix = "Download roberta-base on a machine with internet and set model.options.text_init."
    folder = checkpoint_folder(path, "RoBERTa", fix)
    where = f"RoBERTa {str(folder)!r}"
    config = json.loads((folder / "config.json").read_text())
    wrong = size_mismatches(config, model.options.roberta_sizes(model.vocab_size))
    if wrong:
        raise ValueError(
            f"{where} does not fit this METER's text tower: {'; '.join(wrong)}. Set the "
            "model.options.text_* sizes to the checkpoint's."
        )
    raw = read_state_dict(folder)
    state = {k.removeprefix("roberta."): v for k, v in raw.items()}
    ours = model.text_transformer.state_dict()
    state = {k: v for k, v in state.items() if k in ours}
    missing = [k for k in ours if k not in state and not k.startswith("pooler.")]
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
              for k, v in state.items() if v.shape != ours[k].shape]  # fmt: skip
    if missing or shapes:
        raise ValueError(
            f"{where} does not fit this METER's text tower: missing {missing[:8] or 'nothing'}; "
            f"other shapes {shapes[:5] or 'nothing'}."
        )
    model.text_transformer.load_state_dict(state, strict=False)
    log.info("initialised METER's text tower from %s (%d tensors)", where, len(state))
    return sorted(state)


def load_clip_vision(model: METER, path: str | Path) -> list[str]:
    """Load an OpenAI CLIP ViT checkpoint (``ViT-B-16.pt``, or a folder holding one ``.pt``) into
    the image tower: its first ``vision_layers`` blocks (METER drops the rest), the position
    table interpolated to ``image_size``; the text tower and projection are ignored.

    Returns:
        The image tower's tensors loaded (names under ``vit_model.visual``).

    Raises:
        FileNotFoundError: when the file (or the folder's one ``.pt`` file) is missing.
        ValueError: for a file that is not a CLIP ViT, with fewer blocks than ``vision_layers``
            or other sizes than the options.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        found = sorted(file.glob("*.pt"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"CLIP folder {str(file)!r} holds {len(found)} .pt files; set "
                "model.options.vision_init to the OpenAI ViT checkpoint itself (ViT-B-16.pt)."
            )
        file = found[0]
    where = f"CLIP checkpoint {str(file)!r}"
    state = _read_openai_checkpoint(file)
    try:
        config = clip_vit_config(state)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    o = model.options
    wanted = {"patch_size": o.patch_size, "width": o.vision_width}
    wrong = [f"{k}: checkpoint {config[k]}, model {v}" for k, v in wanted.items() if config[k] != v]
    if config["layers"] < o.vision_layers:
        wrong.append(f"blocks: checkpoint {config['layers']}, model keeps {o.vision_layers}")
    if wrong:
        raise ValueError(
            f"{where} does not fit this METER's image tower: {'; '.join(wrong)}. Set "
            "model.options.patch_size / vision_width / vision_layers to the checkpoint's."
        )
    visual = model.vit_model.visual
    ours = visual.state_dict()
    taken = {k.removeprefix("visual."): v.float() for k, v in state.items()
             if k.startswith("visual.") and k.removeprefix("visual.") in ours}  # fmt: skip
    taken["positional_embedding"] = interpolate_positions(
        taken["positional_embedding"], o.image_size // o.patch_size
    )
    missing = [k for k in ours if k not in taken]
    if missing:
        raise ValueError(f"{where} lacks the image tower's tensors {missing[:8]}.")
    visual.load_state_dict(taken, strict=True)
    log.info("initialised METER's image tower from %s (%d of its %d blocks, %d px)", where,
             o.vision_layers, config["layers"], o.image_size)  # fmt: skip
    return sorted(f"vit_model.visual.{k}" for k in taken)


_CONTEXT = ("vocab_size", "num_answers")
for _name, _summary in (
    ("meter_clip16_roberta", "METER-CLIP16-RoBERTa as published: RoBERTa-base text tower, CLIP "
     "ViT-B/16 (last block dropped) at 384 px, 6 + 6 co-attention layers of 768; pretrained "
     "loads a METER checkpoint."),
    ("meter_tiny", "A tiny METER for tests: towers of 2 layers, 2 + 2 fusion layers of 32, "
     "32 px images, patch 16."),
):  # fmt: skip
    registry.register("model", _name, options=MeterOptions, defaults=METER_VARIANTS[_name],
                      context=_CONTEXT, summary=_summary)(METER)  # fmt: skip
