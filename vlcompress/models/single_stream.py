"""What the single-stream BERT models (UNITER, CLIP-ViL_p) share: one Hugging Face BERT encoder
over ``[question tokens ; visual tokens]``, a pooler, and the VQA head
``Linear(H -> 2H)``, GELU, ``LayerNorm(2H)``, ``Linear(2H -> answers)``.

* :class:`StreamOptions`: the stream's sizes (and their checks, the BERT config, the MiniLM/BERT
  loader's size table, the sizes of a slimmed submodel);
* :class:`BertStream`: text embeddings, the model's visual embeddings (its own name, so that
  published checkpoints load by name), encoder, pooler;
* :class:`SingleStreamVQA`: the VQA wrapper's shared forward (question trimming, task head,
  extras), anatomy and ``slimmed_options``.

A model file subclasses both and supplies its visual inputs (regions with boxes, CLIP grids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.kernels.packing import Packing
from vlcompress.models.anatomy import (
    BERT_PATTERNS,
    Anatomy,
    Modality,
    SlimSpec,
    Stream,
    anatomy_from_patterns,
)
from vlcompress.models.anatomy.specs import scaled
from vlcompress.options import ModelOptions, positive, probability

__all__ = [
    "LN_EPS",
    "TYPE_VOCAB",
    "BertStream",
    "SingleStreamVQA",
    "StreamOptions",
    "init_bert_weights",
    "stream_patterns",
    "task_head",
]

LN_EPS = 1e-12
"""BERT's (and UNITER's) LayerNorm epsilon."""
TYPE_VOCAB = 2
"""Token types of the stream: 0 text, 1 image."""


@dataclass(frozen=True)
class StreamOptions(ModelOptions):
    """Sizes of a single BERT stream (a base for the models' options dataclasses).

    Attributes:
        hidden_size: width of the stream (divisible by ``num_heads``).
        num_heads: attention heads per layer.
        ffn_size: feed-forward units.
        num_layers: transformer layers.
        dropout: dropout inside the embeddings and the encoder (attention included).
        max_position_embeddings: longest question in tokens.
        packing: ``padded`` (the stream is ``(B, T + N, H)``, padded keys masked) or ``stack``
            (the real text and image tokens of the whole batch are packed once into one
            ``(1, total, H)`` row and every layer runs on them only; the attention sees the
            sequences' cumulative lengths: the same logits and gradients, no padding computed).
    """

    hidden_size: int = positive(768)
    num_heads: int = positive(12)
    ffn_size: int = positive(3072)
    num_layers: int = positive(12)
    dropout: float = probability(0.1)
    max_position_embeddings: int = positive(512)
    packing: Literal["padded", "stack"] = "padded"

    def check_stream(self, model: str) -> None:
        """Check that ``hidden_size`` is a whole number of heads (a subclass's :meth:`check`
        calls it).

        Args:
            model: the model's name, for the message.

        Raises:
            ValueError: when ``hidden_size`` is not divisible by ``num_heads``.
        """
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"{model} hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); e.g. hidden_size={self.num_heads * 64}."
            )

    def bert_config(self, vocab_size: int) -> Any:
        """The Hugging Face ``BertConfig`` of the stream; its attention goes through
        :func:`vlcompress.kernels.attention` (:mod:`vlcompress.kernels.hf`): the Triton kernel
        on CUDA, torch SDPA elsewhere."""
        from transformers import BertConfig

        from vlcompress.kernels import hf

        return BertConfig(
            **self.bert_sizes(vocab_size),
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            layer_norm_eps=LN_EPS,
            attn_implementation=hf.NAME,
        )

    def bert_sizes(self, vocab_size: int) -> dict[str, int]:
        """``{BertConfig field: value}`` of the stream's shapes (what a BERT checkpoint's
        ``config.json`` must match to initialise it)."""
        return {
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.ffn_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": TYPE_VOCAB,
        }

    def slimmed_sizes(self, width: float, layers: int) -> dict[str, int]:
        """The stream sizes of a submodel at ``width`` with ``layers`` layers (whole heads of
        the same head size).

        Raises:
            ValueError: when the width does not keep the head size.
        """
        head_dim = self.hidden_size // self.num_heads
        out = {
            "hidden_size": scaled(self.hidden_size, width),
            "num_heads": scaled(self.num_heads, width),
            "ffn_size": scaled(self.ffn_size, width),
            "num_layers": int(layers),
        }
        if out["hidden_size"] != out["num_heads"] * head_dim:
            raise ValueError(
                f"width {width} gives hidden {out['hidden_size']} but {out['num_heads']} heads "
                f"of {head_dim}; choose a width that keeps whole heads."
            )
        return out


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation (``module.apply``): N(0, 0.02) weights, zero biases, unit
    LayerNorms, zero padding rows."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def task_head(hidden: int, num_answers: int) -> nn.Sequential:
    """The VQA classifier of UNITER (``vqa_output``) and CLIP-ViL: ``Linear(H -> 2H)``, GELU,
    ``LayerNorm(2H)``, ``Linear(2H -> answers)`` (indices 0, 2, 3 hold the weights).

    Example::

        logits = task_head(768, 3129)(pooled)   # (B, 3129)
    """
    return nn.Sequential(
        nn.Linear(hidden, 2 * hidden),
        nn.GELU(),
        nn.LayerNorm(2 * hidden, eps=LN_EPS),
        nn.Linear(2 * hidden, num_answers),
    )


def stream_patterns(visual: str) -> Any:
    """The anatomy patterns of a :class:`BertStream` whose visual embeddings are named
    ``visual``: BERT layers over the mixed stream (cross), embeddings per modality."""
    return dataclasses.replace(
        BERT_PATTERNS,
        layer=r"^encoder\.layer\.(?P<index>\d+)$",
        modality=((r"", Modality.CROSS),),
        output=Stream(0),  # transformers 5's BertLayer returns the hidden states bare
        extra_modules=(
            (r"^embeddings$", Modality.LANGUAGE),
            (rf"^{visual}$", Modality.VISION),
            (r"^pooler$", Modality.CROSS),
        ),
    )


class BertStream(nn.Module):
    """Text embeddings, visual embeddings, a BERT encoder over both, the pooler.

    Args:
        options: the stream's sizes.
        vocab_size: text vocabulary size.
        visual_name: the attribute name of the visual embeddings (``img_embeddings`` in UNITER's
            checkpoints).
        visual: the visual embeddings module (its ``forward`` is called by the subclass).

    Example::

        body = BertStream(options, 30522, "img_embeddings", UniterImageEmbeddings(2048, 768, 0.1))
        pooled, text = body.encode(ids, mask, body.img_embeddings(...), None)
    """

    def __init__(
        self, options: StreamOptions, vocab_size: int, visual_name: str, visual: nn.Module
    ) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder, BertPooler

        config = options.bert_config(vocab_size)
        self.packing = options.packing
        self.embeddings = BertEmbeddings(config)
        self.add_module(visual_name, visual)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def image_type(self, like: torch.Tensor) -> torch.Tensor:
        """The token-type embedding of image tokens (type 1), ``(H,)``."""
        ids = torch.ones((), dtype=torch.long, device=like.device)
        return self.embeddings.token_type_embeddings(ids)

    def encode(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the stream ``[text ; image]``.

        Args:
            text_ids: ``(B, T)``; text_mask: ``(B, T)`` bool, True for real tokens.
            image: ``(B, N, H)`` embedded visual tokens; image_mask: ``(B, N)`` bool or
                ``None`` (all real).

        Returns:
            The pooled output ``(B, H)`` and the text embeddings ``(B, T, H)``.
        """
        text = self.embeddings(input_ids=text_ids)
        if image_mask is None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
        mask = torch.cat([text_mask.bool(), image_mask.bool()], dim=1)
        x = torch.cat([text, image], dim=1)
        if self.packing == "stack":
            return self.pooler(self._packed(x, mask)), text
        hidden = self.encoder(x, attention_mask=mask[:, None, None, :])
        return self.pooler(hidden.last_hidden_state), text

    def _packed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder over the real tokens only, as one packed row; back to ``(B, L, H)``."""
        from vlcompress.kernels import hf

        if self.encoder.config._attn_implementation != hf.NAME:
            raise ValueError(
                f"packing: stack needs the stream's attention to be {hf.NAME!r} (it reads the "
                f"sequences' lengths), not {self.encoder.config._attn_implementation!r}."
            )
        p = Packing.of(mask)
        lengths = dict(cu_seq_lens_q=p.cu_seqlens, cu_seq_lens_k=p.cu_seqlens,
                       max_length_q=p.max_seqlen, max_length_k=p.max_seqlen)  # fmt: skip
        hidden = self.encoder(p.pack(x)[None], attention_mask=None, **lengths)
        return p.unpack(hidden.last_hidden_state[0])


class SingleStreamVQA(nn.Module):
    """The shared VQA wrapper of a :class:`BertStream` model: ``forward(VLBatch) -> logits``.

    A subclass sets :attr:`display_name`, :attr:`body_name`, :attr:`visual_name` and
    :attr:`slim_resets`, builds ``self.options`` (a :class:`StreamOptions`), the body under
    ``body_name`` and ``self.task_head``, and implements :meth:`embed_visual`.
    """

    returns_extras = True
    """``forward(batch, return_extras=True)`` also returns the extra outputs (loss contract)."""
    display_name: ClassVar[str] = "single-stream model"
    body_name: ClassVar[str] = "body"
    visual_name: ClassVar[str] = "visual_embeddings"
    slim_resets: ClassVar[dict[str, Any]] = {}
    """Option overrides of an exported submodel (it starts from its own weights)."""
    options: StreamOptions
    task_head: nn.Module

    @property
    def body(self) -> BertStream:
        """The :class:`BertStream` (``self.uniter``, ``self.clip_vil``, ...)."""
        return getattr(self, self.body_name)

    def embed_visual(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's visual tokens through the visual embeddings, ``(B, N, H)``, and their
        mask ``(B, N)`` (``None``: all real)."""
        raise NotImplementedError

    def question(self, batch: VLBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The question ids and bool mask without the trailing columns that are padding in
        every question (masked out anyway, and a full token of cost in every layer; packed,
        they cost nothing, and are kept unless the position table is too short for them).

        Raises:
            ValueError: for questions longer than the position table.
        """
        limit = self.options.max_position_embeddings
        if self.options.packing == "stack" and batch.text_ids.shape[1] <= limit:
            # padded columns cost nothing packed: no need to read the device to trim them
            return batch.text_ids, batch.text_mask.bool()
        real = batch.text_mask.any(0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        if length > limit:
            raise ValueError(
                f"{self.display_name} has position embeddings for {limit} tokens, the batch "
                f"has questions of {length}; lower the data's max_question_len or raise "
                "model.options.max_position_embeddings."
            )
        return batch.text_ids[:, :length], batch.text_mask[:, :length].bool()

    def forward(
        self, batch: VLBatch, return_extras: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer logits ``(B, num_answers)``; with ``return_extras``, ``(logits, extras)``:
        ``"pooled"`` ``(B, hidden)`` is the pooled output the task head reads, ``"question"``
        ``(B, hidden)`` the masked mean of the question's text embeddings (the single stream
        has no question-only encoder output: this is the representation before any fusion)."""
        image, image_mask = self.embed_visual(batch)
        text_ids, text_mask = self.question(batch)
        pooled, text = self.body.encode(text_ids, text_mask, image, image_mask)
        logits = self.task_head(pooled)
        if not return_extras:
            return logits
        weights = text_mask[..., None].to(text.dtype)
        question = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return logits, {"pooled": pooled, "question": question}

    def stream_anatomy(self, fixed: tuple[str, ...] = ()) -> Anatomy:
        """The stream's structure: the encoder layers (cross: self-attention over text and
        image together), language = text embeddings, vision = visual embeddings, cross =
        pooler, the task head; width slimming over the body and the task head's hidden layer
        (the answer layer and ``fixed`` keep their outputs)."""
        body = self.body_name
        an = anatomy_from_patterns(self.body, stream_patterns(self.visual_name)).prefixed(body)
        an.readouts.update(
            {
                "language_input": f"{body}.embeddings",
                "vision_input": f"{body}.{self.visual_name}",
                "fused": f"{body}.pooler",
            }
        )
        an.head_modules = ["task_head"]
        an.slim = SlimSpec(region=(body, "task_head"), fixed=(*fixed, "task_head.3"))
        return an

    def slimmed_options(self, width: float, layers: int) -> dict[str, Any]:
        """Option overrides that build this model's submodel at ``width`` with ``layers``
        layers (an exported submodel starts from its own weights: no checkpoint loading).

        Raises:
            ValueError: when the width does not keep the head size.
        """
        return {**self.options.slimmed_sizes(width, layers), **self.slim_resets}
