"""MCAN (Yu et al., CVPR 2019): Deep Modular Co-Attention Networks, encoder-decoder variant.

Faithful to MILVLG's OpenVQA implementation: question = word embeddings + one LSTM; image =
region features (+ optional box features) or a grid from raw pixels through a light conv stem;
``num_layers`` self-attention (SA) encoder layers over the question, ``num_layers``
self-guided-attention (SGA) decoder layers over the image guided by the final question
features; attentional reduction (AttFlat) of both streams, sum, LayerNorm, linear classifier.
Post-norm residual blocks, dropout 0.1.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlcompress import registry
from vlcompress.data.batch import VLBatch
from vlcompress.kernels import Packing, attention, attention_varlen
from vlcompress.models.anatomy import (
    Anatomy,
    AttentionSpec,
    FFNSpec,
    LayerSpec,
    Modality,
    SlimSpec,
    Stream,
    default_depth_priority,
    prunable_weights_in,
)
from vlcompress.models.anatomy.specs import scaled
from vlcompress.options import ModelOptions, in_range, positive, probability

__all__ = [
    "MCAN",
    "MCAN_VARIANTS",
    "AttFlat",
    "FeedForward",
    "GridStem",
    "MCANOptions",
    "MultiHeadAttention",
    "RegionInput",
    "SALayer",
    "SGALayer",
]


@dataclass(frozen=True)
class MCANOptions(ModelOptions):
    """Sizes and inputs of an MCAN model (see :data:`MCAN_VARIANTS`); the model keeps it as
    ``model.options`` (it was ``MCANConfig`` / ``model.config`` before: ``MCANConfig`` still
    imports, deprecated, and a model pickled with ``config`` still loads; ``model.config`` is
    gone, since generic code reads it as a Hugging Face configuration).

    Attributes:
        hidden_size: width of every layer (divisible by ``num_heads``).
        num_heads: attention heads per block.
        ffn_size: feed-forward units.
        num_layers: SA encoder layers = SGA decoder layers.
        dropout: dropout everywhere (attention included).
        flat_mlp_size, flat_glimpses, flat_out_size: the attentional reduction (AttFlat).
        word_dim: word-embedding size (GloVe: 300).
        visual_input: ``regions`` (features ``(B, N, region_dim)``) or ``grid`` (pixels through
            a conv stem).
        region_dim: region feature size; ``use_boxes``/``box_dim``: optional box features.
        grid_channels, grid_context_layers, grid_pool, grid_cells: the conv stem of ``grid``.
        packing: how padding is handled (the same logits and gradients in every mode):
            ``padded``: the layers see ``(B, L, D)`` and attention skips padded keys;
            ``attention``: the real tokens are packed around every attention call
            (:func:`~vlcompress.kernels.attention_varlen`: the Triton kernel computes no padded
            query or key), the rest of each layer stays padded;
            ``stack``: the question and the image are packed once after their inputs and the
            whole encoder / decoder runs on the real tokens only (projections, FFNs and
            LayerNorms included); the layers' inputs and outputs are then ``(total, D)``.
            Both packed modes find the real tokens once per forward (one device read each).
        packed_attention: the earlier name of ``packing: attention`` (``true``), kept so that
            configs and exports that carry it still load.
        width_adapters: BST's input adapters (seed 001), needed for width slimming: a linear
            layer + LayerNorm after the LSTM (``lang_adapter``) and a LayerNorm after the
            visual input projection (``visual_norm``), so that both streams can enter the
            encoder / decoder at any width while the LSTM and region features stay full.
        adapter_init: with ``width_adapters``, how the language adapter's linear layer
            starts: ``default`` (PyTorch's initialisation, as BST) or ``identity`` (the LSTM
            output passes unchanged into the adapter's LayerNorm; zero bias). On easy-VQA the
            default-initialised adapter keeps MCAN on the plateau where it names colours and
            shapes but answers every yes/no question with its type's prior (validation 0.862
            after one epoch, 1 layer, seeds 0 and 1), the identity one learns them as the model
            without adapters does (0.931; without adapters 0.935 / 0.938).
        adapter_visual_norm: with ``width_adapters``, the LayerNorm after the visual input
            projection (``visual_norm``; BST's VQA adapter). ``false``: none, as BST's GQA
            adapter (``frcn_linear`` alone).
        adapter_lang_norm: with ``width_adapters``, the LayerNorm after the language adapter's
            linear layer. ``false`` with ``adapter_init: identity``, no ``adapter_visual_norm``
            and ``lstm_size`` equal to ``hidden_size``: the adapters start as the identity, so
            the model computes what the same MCAN without adapters would.
        zero_init_residual: start every encoder and decoder layer as the identity: the last
            projection of each residual branch (attention ``out``, FFN ``down``) starts at
            zero, as torchvision's ResNet option of that name (Goyal et al., 2017) and Fixup /
            SkipInit. A deep stack then trains like a shallow one at first and adds depth as it
            learns; the published MCAN uses PyTorch's default initialisation (``false``).
    """

    hidden_size: int = positive(512)
    num_heads: int = positive(8)
    ffn_size: int = positive(2048)
    num_layers: int = positive(6)
    dropout: float = probability(0.1)
    flat_mlp_size: int = positive(512)
    flat_glimpses: int = positive(1)
    flat_out_size: int = positive(1024)
    word_dim: int = positive(300)
    visual_input: Literal["regions", "grid"] = "regions"
    region_dim: int = positive(2048)
    use_boxes: bool = False
    box_dim: int = positive(1024)
    grid_channels: tuple[int, ...] = (32, 64, 128)
    grid_context_layers: int = dataclasses.field(default=2, metadata=in_range(0))
    grid_pool: bool = True
    grid_cells: int = positive(16)
    width_adapters: bool = False
    lstm_size: int | None = positive(None)
    packing: Literal["padded", "attention", "stack"] = "padded"
    packed_attention: bool | None = None
    adapter_init: Literal["default", "identity"] = "default"
    adapter_visual_norm: bool = True
    adapter_lang_norm: bool = True
    zero_init_residual: bool = False

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_heads

    def check(self) -> None:
        """MCAN's cross-field checks (each field is checked on its own before).

        Raises:
            ValueError: ``hidden_size`` not divisible by ``num_heads``, an ``lstm_size``
                without ``width_adapters``, ``packed_attention`` contradicting ``packing``,
                or empty / non-positive ``grid_channels``.
        """
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"MCAN hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. hidden_size={self.num_heads * max(1, self.head_dim)}."
            )
        if self.lstm_size not in (None, self.hidden_size) and not self.width_adapters:
            raise ValueError(
                f"MCAN lstm_size ({self.lstm_size}) differs from hidden_size "
                f"({self.hidden_size}); that needs width_adapters: true (the LSTM output goes "
                "through lang_adapter to the hidden size)."
            )
        if self.packed_attention and self.packing == "padded":
            object.__setattr__(self, "packing", "attention")
        elif self.packed_attention and self.packing != "attention":
            raise ValueError(
                f"MCAN packed_attention: true means packing: attention, but packing is "
                f"{self.packing!r}; drop packed_attention."
            )
        if not self.grid_channels or any(c < 1 for c in self.grid_channels):
            raise ValueError(
                f"MCAN grid_channels must be a non-empty list of positive sizes, got "
                f"{list(self.grid_channels)}."
            )


MCAN_VARIANTS: dict[str, MCANOptions] = {
    "small": MCANOptions(),
    "large": MCANOptions(hidden_size=1024, ffn_size=4096, flat_out_size=2048),
    "tiny": MCANOptions(
        hidden_size=32, num_heads=4, ffn_size=64, num_layers=2, flat_mlp_size=32,
        flat_out_size=64, word_dim=16, region_dim=16, box_dim=8, grid_channels=(8, 16), grid_cells=256,
    ),
}  # fmt: skip
"""Registered sizes: ``small`` and ``large`` as published, ``tiny`` for tests."""


class MultiHeadAttention(nn.Module):
    """Multi-head attention with q/k/v/out projections; heads are concatenated head-major.

    ``head_mask`` (``(H,)`` or ``(B, H)``, set through the anatomy) reaches the attention
    kernel, which then neither loads nor computes the dead heads. Given :class:`Packing` objects as
    masks, it attends over the real tokens only (varlen): inputs are then either padded
    ``(B, L, D)`` (packed around the attention, zeros at padded queries) or already packed
    ``(total, D)``.
    """

    supports_head_mask = True

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.head_mask: torch.Tensor | None = None
        self.num_heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: torch.Tensor | Packing | None,
        query_mask: torch.Tensor | Packing | None = None,
    ) -> torch.Tensor:
        """Attend from ``query (B, Lq, D)`` to ``key``/``value (B, Lk, D)`` (masks: True =
        real; ``query_mask`` matters only as a :class:`Packing`), or from packed ``(total_q, D)``
        to ``(total_k, D)`` with both masks :class:`Packing` objects."""
        d = self.head_dim  # the head count follows the projections (width slimming: fewer)
        q, k, v = self.q(query), self.k(key), self.v(value)
        p = self.dropout if self.training else 0.0
        h = q.shape[-1] // d
        mask = self.head_mask
        if mask is not None and mask.shape[-1] != h:
            mask = mask[..., :h]
        if isinstance(key_mask, Packing) and isinstance(query_mask, Packing):
            return self.out(self._varlen(q, k, v, query_mask, key_mask, mask, p))
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (x.view(b, n, h, d).transpose(1, 2) for x, n in ((q, lq), (k, lk), (v, lk)))
        ctx = attention(q, k, v, key_padding_mask=key_mask, head_mask=mask, dropout_p=p)
        return self.out(ctx.transpose(1, 2).reshape(b, lq, h * d))

    def _varlen(self, q, k, v, qp: Packing, kp: Packing, head_mask, p) -> torch.Tensor:
        """Projected q, k, v (padded or packed) -> the attention output over real tokens."""
        padded = q.dim() == 3
        if padded:
            q, k, v = qp.pack(q), kp.pack(k), kp.pack(v)
        d = self.head_dim
        ctx = attention_varlen(
            q.view(q.shape[0], -1, d), k.view(k.shape[0], -1, d), v.view(v.shape[0], -1, d),
            qp.cu_seqlens, kp.cu_seqlens, qp.max_seqlen, kp.max_seqlen,
            head_mask=head_mask, dropout_p=p,
        ).flatten(1)  # fmt: skip
        return qp.unpack(ctx) if padded else ctx


class FeedForward(nn.Module):
    """``down(dropout(relu(up(x))))``."""

    def __init__(self, hidden: int, inner: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.down(self.drop(self.act(self.up(x))))


class SALayer(nn.Module):
    """Self-attention layer (encoder): post-norm residual attention + FFN."""

    def __init__(self, o: MCANOptions) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(o.hidden_size, o.num_heads, o.dropout)
        self.ffn = FeedForward(o.hidden_size, o.ffn_size, o.dropout)
        self.drop1, self.drop2 = nn.Dropout(o.dropout), nn.Dropout(o.dropout)
        self.norm1 = nn.LayerNorm(o.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(o.hidden_size, eps=1e-6)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        """Update ``x (B, L, D)`` (or packed ``(total, D)`` with a :class:`Packing`)."""
        x = self.norm1(x + self.drop1(self.attn(x, x, x, x_mask, x_mask)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class SGALayer(nn.Module):
    """Self-guided-attention layer (decoder): self-attention, guided attention to ``y``, FFN."""

    def __init__(self, o: MCANOptions) -> None:
        super().__init__()
        args = (o.hidden_size, o.num_heads, o.dropout)
        self.self_attn = MultiHeadAttention(*args)
        self.guided_attn = MultiHeadAttention(*args)
        self.ffn = FeedForward(o.hidden_size, o.ffn_size, o.dropout)
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(o.dropout) for _ in range(3))
        self.norm1, self.norm2, self.norm3 = (
            nn.LayerNorm(o.hidden_size, eps=1e-6) for _ in range(3)
        )

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | Packing | None,
        y_mask: torch.Tensor | Packing | None,
    ) -> torch.Tensor:
        """Update ``x`` (image) guided by ``y`` (question)."""
        x = self.norm1(x + self.drop1(self.self_attn(x, x, x, x_mask, x_mask)))
        x = self.norm2(x + self.drop2(self.guided_attn(x, y, y, y_mask, x_mask)))
        return self.norm3(x + self.drop3(self.ffn(x)))


class AttFlat(nn.Module):
    """Attentional reduction: an MLP scores tokens, softmax over valid tokens, weighted sum,
    linear merge to ``flat_out_size``."""

    def __init__(self, o: MCANOptions) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(o.hidden_size, o.flat_mlp_size),
            nn.ReLU(),
            nn.Dropout(o.dropout),
            nn.Linear(o.flat_mlp_size, o.flat_glimpses),
        )
        self.merge = nn.Linear(o.hidden_size * o.flat_glimpses, o.flat_out_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Reduce ``x (B, L, D)`` to ``(B, flat_out_size)``."""
        att = self.mlp(x)  # (B, L, G)
        if mask is not None:
            att = att.masked_fill(~mask[..., None], -1e9)
        att = att.softmax(dim=1)
        pooled = torch.einsum("blg,bld->bgd", att, x).flatten(1)
        return self.merge(pooled)


class GridStem(nn.Module):
    """Light conv stem for raw images, one token per cell of the final grid.

    Each stage is conv3x3 + BatchNorm + ReLU, then downsampling by 2 (max-pooling when
    ``pool``, else a stride-2 conv); ``context_layers`` stride-1 convs at the grid resolution
    widen every cell's view to the whole object; a learned position embedding marks each cell.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        hidden: int,
        context_layers: int = 2,
        pool: bool = True,
        grid_cells: int = 16,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3

        def block(c_in: int, c: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False)
            return [conv, nn.BatchNorm2d(c), nn.ReLU()]

        for c in channels:
            layers += [*block(c_in, c, 1), nn.MaxPool2d(2)] if pool else block(c_in, c, 2)
            c_in = c
        for _ in range(context_layers):
            layers += block(c_in, c_in, 1)
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, hidden)
        self.pos = nn.Parameter(torch.zeros(1, grid_cells, hidden))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> ``(B, cells, hidden)``."""
        f = self.convs(pixels * 2.0 - 1.0).flatten(2).transpose(1, 2)
        if f.shape[1] != self.pos.shape[1]:
            raise ValueError(
                f"the grid stem made {f.shape[1]} cells but has position embeddings for "
                f"{self.pos.shape[1]}; set grid_cells = (image_size / 2**len(grid_channels))**2."
            )
        x = self.proj(f)
        return x + self.pos[..., : x.shape[-1]]  # width slimming: the first features


class RegionInput(nn.Module):
    """Region features (+ optional 5-d box features ``x1, y1, x2, y2, area``) to the hidden size."""

    def __init__(self, o: MCANOptions) -> None:
        super().__init__()
        self.box = nn.Linear(5, o.box_dim) if o.use_boxes else None
        self.proj = nn.Linear(o.region_dim + (o.box_dim if o.use_boxes else 0), o.hidden_size)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """``(B, N, region_dim)`` -> ``(B, N, hidden)``."""
        if self.box is not None:
            if boxes is None:
                raise ValueError(
                    "this MCAN uses box features (use_boxes=True) but the batch has no boxes."
                )
            area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
            feats = torch.cat(
                [feats, self.box(torch.cat([boxes, area[..., None]], dim=-1))], dim=-1
            )
        return self.proj(feats)


class MCAN(nn.Module):
    """MCAN encoder-decoder for VQA; ``forward(VLBatch) -> logits (B, num_answers)``.

    Args:
        options: sizes and visual input (see :data:`MCAN_VARIANTS`).
        vocab_size: question vocabulary size (id 0 is padding).
        num_answers: classifier outputs.
    """

    def __init__(self, options: MCANOptions, vocab_size: int, num_answers: int) -> None:
        super().__init__()
        self.options, self.vocab_size, self.num_answers = options, vocab_size, num_answers
        c = options
        self.embedding = nn.Embedding(vocab_size, c.word_dim, padding_idx=0)
        lstm_size = c.lstm_size or c.hidden_size
        self.lstm = nn.LSTM(c.word_dim, lstm_size, batch_first=True)
        self.visual = (
            GridStem(
                c.grid_channels, c.hidden_size, c.grid_context_layers, c.grid_pool, c.grid_cells
            )
            if c.visual_input == "grid"
            else RegionInput(c)
        )
        if c.width_adapters:
            self.lang_adapter = nn.Sequential(
                nn.Linear(lstm_size, c.hidden_size),
                *([nn.LayerNorm(c.hidden_size, eps=1e-6)] if c.adapter_lang_norm else []),
            )
            if c.adapter_init == "identity":
                with torch.no_grad():
                    linear = self.lang_adapter[0]
                    linear.weight.copy_(torch.eye(c.hidden_size, lstm_size))
                    linear.bias.zero_()
            if c.adapter_visual_norm:
                self.visual_norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.encoder = nn.ModuleList(SALayer(c) for _ in range(c.num_layers))
        self.decoder = nn.ModuleList(SGALayer(c) for _ in range(c.num_layers))
        if c.zero_init_residual:
            for layer in (*self.encoder, *self.decoder):
                for m in layer.modules():
                    if isinstance(m, MultiHeadAttention):
                        nn.init.zeros_(m.out.weight), nn.init.zeros_(m.out.bias)
                    elif isinstance(m, FeedForward):
                        nn.init.zeros_(m.down.weight), nn.init.zeros_(m.down.bias)
        self.flat_lang = AttFlat(c)
        self.flat_img = AttFlat(c)
        self.norm = nn.LayerNorm(c.flat_out_size)
        self.classifier = nn.Linear(c.flat_out_size, num_answers)
        self.pooled_dim = c.flat_out_size
        self.question_dim = c.flat_out_size

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle, also an MCAN pickled before its options moved from ``config`` to
        ``options``."""
        if "config" in state and "options" not in state:
            state = {**state}
            state["options"] = state.pop("config")
        super().__setstate__(state)

    @classmethod
    def from_variant(
        cls, variant: str, vocab_size: int, num_answers: int, **overrides: Any
    ) -> MCAN:
        """Build the registered variant ``mcan_<variant>`` with field ``overrides`` (e.g.
        ``visual_input="grid"``); the same as ``build_model(f"mcan_{variant}", ...)``.

        Raises:
            vlcompress.registry.UnknownComponentError: for an unknown variant.
            ValueError: for a bad option value.
            TypeError: for an unknown option name.
        """
        return registry.build(
            "model", f"mcan_{variant}", overrides, vocab_size=vocab_size, num_answers=num_answers
        )

    def encode_visual(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual tokens ``(B, N, hidden)`` and their mask (None = all real)."""
        if self.options.visual_input == "grid":
            if not batch.is_pixels:
                raise ValueError(
                    "this MCAN expects pixels (B, 3, H, W) (visual_input='grid'); got region features."
                )
            return self._visual_norm(self.visual(batch.visual)), None
        if batch.is_pixels:
            raise ValueError(
                "this MCAN expects region features (B, N, D) (visual_input='regions'); got pixels."
            )
        return self._visual_norm(self.visual(batch.visual, batch.boxes)), batch.visual_mask

    def _visual_norm(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        return self.visual_norm(x) if o.width_adapters and o.adapter_visual_norm else x

    returns_extras = True
    """``forward(batch, return_extras=True)`` also returns the extra outputs (loss contract)."""

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)`` where
        ``extras = {"pooled": (B, flat_out_size), "question": (B, flat_out_size)}`` holds the
        fused, normalised features the classifier reads (LMH's gate) and the AttFlat question
        vector before fusion (the original RUBi's question-only branch)."""
        lang_mask = batch.text_mask.bool()
        lang, _ = self.lstm(self.embedding(batch.text_ids))
        if self.options.width_adapters:
            lang = self.lang_adapter(lang)
        img, img_mask = self.encode_visual(batch)
        lang_m, img_m = lang_mask, img_mask
        mode = self.options.packing
        if mode != "padded":  # the real tokens, found once for all layers
            lang_m = Packing.of(lang_mask)
            img_m = (
                Packing.full(*img.shape[:2], img.device)
                if img_mask is None
                else Packing.of(img_mask.bool())
            )
            if mode == "stack":
                lang, img = lang_m.pack(lang), img_m.pack(img)
        for layer in self.encoder:
            lang = layer(lang, lang_m)
        for layer in self.decoder:
            img = layer(img, lang, img_m, lang_m)
        if mode == "stack":
            lang, img = lang_m.unpack(lang), img_m.unpack(img)
        question = self.flat_lang(lang, lang_mask)
        fused = self.norm(question + self.flat_img(img, img_mask))
        logits = self.classifier(fused)
        return (logits, {"pooled": fused, "question": question}) if return_extras else logits

    def anatomy(self) -> Anatomy:
        """MCAN's structure: the encoder (language self-attention), the decoder (cross: vision
        self-attention, then vision queries guided by language keys), inputs and task head.

        Head counts and FFN sizes are read from the modules (the options' outside a bypassed
        layer), so the anatomy stays right after heads or units are removed for good."""
        c = self.options
        an = Anatomy()
        lang, vis, cross = Modality.LANGUAGE, Modality.VISION, Modality.CROSS
        modules = dict(self.named_modules())

        def attn(path: str, modality: Modality, kind: str, query: Modality, key: Modality) -> str:
            heads = getattr(modules.get(path), "num_heads", c.num_heads)
            an.attentions.append(
                AttentionSpec(path, heads, c.head_dim, f"{path}.q", f"{path}.k", f"{path}.v",
                              f"{path}.out", modality, kind, query_side=query, key_side=key)
            )  # fmt: skip
            return path

        def ffn(path: str, modality: Modality, side: Modality) -> str:
            up = modules.get(f"{path}.up")
            inner = up.out_features if isinstance(up, nn.Linear) else c.ffn_size
            an.ffns.append(FFNSpec(path, f"{path}.up", f"{path}.down", inner, modality, side))
            return path

        for i in range(c.num_layers):  # SALayer.forward(x, x_mask) -> x
            name = f"encoder.{i}"
            attns = (attn(f"{name}.attn", lang, "self", lang, lang),)
            an.add_layer(LayerSpec(name, "encoder", i, lang, attns, (ffn(f"{name}.ffn", lang, lang),),
                                   streams=("x",), output=Stream(0)))  # fmt: skip
        for i in range(c.num_layers):  # SGALayer.forward(x, y, x_mask, y_mask) -> x (image)
            name = f"decoder.{i}"
            attns = (
                attn(f"{name}.self_attn", cross, "self", vis, vis),
                attn(f"{name}.guided_attn", cross, "cross", vis, lang),
            )
            an.add_layer(LayerSpec(name, "decoder", i, cross, attns, (ffn(f"{name}.ffn", cross, vis),),
                                   streams=("x",), stream_sides=(vis,), output=Stream(0)))  # fmt: skip
        an.readouts.update({"language_input": "lstm", "vision_input": "visual", "fused": "norm"})
        an.extra_weights = {
            lang: ["embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0"],
            vis: prunable_weights_in(self.visual, "visual"),
            cross: prunable_weights_in(self.flat_lang, "flat_lang") + prunable_weights_in(self.flat_img, "flat_img"),
        }  # fmt: skip
        an.extra_modules = {lang: ["embedding", "lstm"], vis: ["visual"], cross: ["flat_lang", "flat_img", "norm"]}  # fmt: skip
        an.head_modules = ["classifier"]
        if c.width_adapters:
            an.extra_weights[lang] += prunable_weights_in(self.lang_adapter, "lang_adapter")
            an.extra_modules[lang].append("lang_adapter")
            if c.adapter_visual_norm:
                an.extra_modules[vis].append("visual_norm")
        an.slim = self._slim_spec()
        return an

    def _slim_spec(self) -> SlimSpec:
        """BST's slimming of MCAN: the hidden width inside the adapters, the encoder, the
        decoder and both AttFlat reductions (their MLP and output too, as in MILVLG/bst); the
        embeddings, the LSTM and the answer classifier's outputs stay full. Depth keeps the
        encoder's layers in the order ``[0, 5, 1, 4, 2, 3]`` and the decoder's in
        ``[5, 0, 1, 4, 2, 3]`` (generalised: the decoder's last layer first)."""
        c = self.options
        enc = default_depth_priority(c.num_layers)
        dec = (c.num_layers - 1, *(i for i in enc if i != c.num_layers - 1))
        priority = {"encoder": enc, "decoder": dec}
        if not c.width_adapters or c.flat_glimpses != 1:
            return SlimSpec(region=(), depth_priority=priority)  # depth only
        region = ("lang_adapter", "encoder", "decoder", "flat_lang", "flat_img")
        visual = ("visual.proj",)
        params = ("visual.pos",) if c.visual_input == "grid" else ()
        return SlimSpec(
            region=region + visual,
            fixed=("flat_lang.mlp.3", "flat_img.mlp.3"),
            params=params,
            depth_priority=priority,
        )

    def slimmed_options(self, width: float, layers: int) -> dict[str, Any]:
        """Option overrides that build this model's submodel at ``width`` with ``layers``
        encoder and decoder layers (what an exported submodel's ``config.yaml`` records).

        Raises:
            ValueError: when the width does not keep the head size (hidden / heads).
        """
        c = self.options
        out = {
            "hidden_size": scaled(c.hidden_size, width),
            "num_heads": scaled(c.num_heads, width),
            "ffn_size": scaled(c.ffn_size, width),
            "flat_mlp_size": scaled(c.flat_mlp_size, width),
            "flat_out_size": scaled(c.flat_out_size, width),
            "num_layers": int(layers),
            "lstm_size": c.lstm_size or c.hidden_size,
        }
        if out["hidden_size"] != out["num_heads"] * c.head_dim:
            raise ValueError(
                f"width {width} gives hidden {out['hidden_size']} but {out['num_heads']} heads "
                f"of {c.head_dim}; choose a width that keeps whole heads (multiples of "
                f"1/{c.num_heads})."
            )
        return out


_CONTEXT = ("vocab_size", "num_answers")

registry.register(
    "model",
    "mcan_small",
    options=MCANOptions,
    defaults=MCAN_VARIANTS["small"],
    context=_CONTEXT,
    summary="MCAN-small as published (OpenVQA): hidden 512, 8 heads, FFN 2048, 6 encoder and "
    "6 decoder layers.",
)(MCAN)
registry.register(
    "model",
    "mcan_large",
    options=MCANOptions,
    defaults=MCAN_VARIANTS["large"],
    context=_CONTEXT,
    summary="MCAN-large as published (OpenVQA): hidden 1024, 8 heads, FFN 4096, 6 encoder and "
    "6 decoder layers, AttFlat output 2048.",
)(MCAN)
registry.register(
    "model",
    "mcan_tiny",
    options=MCANOptions,
    defaults=MCAN_VARIANTS["tiny"],
    context=_CONTEXT,
    summary="A tiny MCAN for tests: hidden 32, 4 heads, FFN 64, 2 encoder and 2 decoder layers.",
)(MCAN)


def __getattr__(name: str) -> Any:
    """``MCANConfig``: the deprecated name of :class:`MCANOptions` (code and pickles that name
    it still load)."""
    if name == "MCANConfig":
        warnings.warn(
            "vlcompress.models.mcan.MCANConfig is deprecated; use MCANOptions",
            DeprecationWarning,
            stacklevel=2,
        )
        return MCANOptions
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
