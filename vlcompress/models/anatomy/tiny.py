"""Tiny random instances of every recognised model family, with example inputs.

For tests, the anatomy table (``benchmarks/anatomy_table.py``) and for checking a recogniser
against the installed transformers / timm. Each builder imports its library when called.
Without timm, ``timm_vit`` builds :class:`TimmStyleViT`, a replica of timm's
``VisionTransformer`` module names and forward (``blocks.N.attn.qkv`` fused, ``attn.proj``,
``mlp.fc1``/``mlp.fc2``, ``attn.num_heads``), so the fused-qkv path is exercised everywhere.

Example::

    case = TINY_MODELS["lxmert"]()
    out = case.run()            # seeded forward on the example input
    anatomy_of(case.model)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TINY_MODELS", "TimmStyleViT", "TinyModel", "tensors_of"]


@dataclass
class TinyModel:
    """A tiny random model in eval mode and an example input.

    Attributes:
        name: key in :data:`TINY_MODELS`.
        model: the model.
        args: positional example input.
        kwargs: keyword example input.
        source: where the class comes from (``"transformers"``, ``"timm"``, ``"replica"``).
    """

    name: str
    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "transformers"

    def run(self, seed: int = 0, **extra: Any) -> Any:
        """The model's output on the example input, after seeding (ViLT samples patches at
        random even in eval mode)."""
        torch.manual_seed(seed)
        return self.model(*self.args, **self.kwargs, **extra)


def tensors_of(output: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a model output (ModelOutput, tuple, dict), by path, for comparisons."""
    if isinstance(output, torch.Tensor):
        return {prefix or "output": output}
    items: Any = ()
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        items = output.items()
    elif isinstance(output, (tuple, list)):
        items = enumerate(output)
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(tensors_of(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _ids(vocab: int, length: int = 7, low: int = 2, pad: int | None = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(low, vocab, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    if pad is not None:
        ids[1, -2:] = pad
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _finish(
    name: str, model: nn.Module, source: str = "transformers", args: tuple = (), **kwargs: Any
) -> TinyModel:
    return TinyModel(name, model.eval(), args, kwargs, source)


# ---------------------------------------------------------------------- transformers
def _bert() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=32)  # fmt: skip
    return _finish("bert", T.BertModel(cfg), **_ids(60))


def _roberta() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=32)  # fmt: skip
    return _finish("roberta", T.RobertaModel(cfg), **_ids(60, pad=1))


def _lxmert() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LxmertConfig(vocab_size=60, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                         l_layers=2, x_layers=2, r_layers=1, visual_feat_dim=12, visual_pos_dim=4,
                         max_position_embeddings=32)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    return _finish(
        "lxmert", T.LxmertModel(cfg), **_ids(60), visual_feats=torch.randn(2, 5, 12, generator=g),
        visual_pos=torch.rand(2, 5, 4, generator=g),
    )  # fmt: skip


def _visual_bert() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.VisualBertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, visual_embedding_dim=12, max_position_embeddings=32)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    return _finish("visual_bert", T.VisualBertModel(cfg), **_ids(60),
                   visual_embeds=torch.randn(2, 4, 12, generator=g))  # fmt: skip


def _vilt() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViltConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, image_size=32, patch_size=8, max_image_length=-1,
                       max_position_embeddings=16)  # fmt: skip
    return _finish("vilt", T.ViltModel(cfg), **_ids(60), pixel_values=_pixels())


def _clip_vision() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    return _finish("clip_vision", T.CLIPVisionModel(cfg), pixel_values=_pixels())


def _clip_text() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.CLIPTextConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                           eos_token_id=1, pad_token_id=1)  # fmt: skip
    ids = _ids(60)
    ids["input_ids"][:, -1] = 1  # CLIP pools at the end-of-text token
    return _finish("clip_text", T.CLIPTextModel(cfg), input_ids=ids["input_ids"])


def _bridgetower() -> TinyModel:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BridgeTowerConfig(
        text_config={"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "intermediate_size": 48,
                     "max_position_embeddings": 32},
        vision_config={"hidden_size": 128, "num_hidden_layers": 2, "image_size": 32,
                       "patch_size": 16},
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    return _finish(
        "bridgetower", T.BridgeTowerModel(cfg), **_ids(60, pad=1), pixel_values=_pixels()
    )


# ---------------------------------------------------------------------- timm
class _TimmAttention(nn.Module):
    """timm ``Attention`` (fused qkv), same names and forward."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)  # fmt: skip
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _TimmBlock(nn.Module):
    """timm ``Block`` (pre-norm), same names and forward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _TimmAttention(dim, num_heads)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _TimmMlp(dim, int(dim * mlp_ratio))
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:  # fmt: skip
        x = x + self.drop_path1(
            self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        )
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class VisionTransformer(nn.Module):
    """A replica of timm's ``VisionTransformer`` module names and forward (class token,
    absolute position embedding, pre-norm blocks with fused qkv, final norm, linear head).

    Its class is named ``VisionTransformer``, as timm's is (what the recogniser looks for);
    :data:`TimmStyleViT` is the same class.

    Args:
        img_size: image side.
        patch_size: patch side.
        embed_dim: width.
        depth: number of blocks.
        num_heads: heads per block.
        num_classes: outputs of the head.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2,
                 num_heads: int = 4, num_classes: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = _PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(
            torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dim) * 0.02
        )
        self.pos_drop, self.patch_drop, self.norm_pre = (
            nn.Dropout(0.0),
            nn.Identity(),
            nn.Identity(),
        )
        self.blocks = nn.Sequential(*(_TimmBlock(embed_dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm, self.head_drop = nn.Identity(), nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens through the blocks and the final norm."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token logits."""
        return self.head(self.head_drop(self.fc_norm(self.forward_features(x)[:, 0])))


TimmStyleViT = VisionTransformer
"""The replica under a name that says what it is (its class is named like timm's)."""


def _timm_vit(replica: bool | None = None) -> TinyModel:
    torch.manual_seed(0)
    if replica is None:
        replica = importlib.util.find_spec("timm") is None
    if replica:
        return _finish("timm_vit", TimmStyleViT(), "replica", (_pixels(),))
    import timm

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5
    )
    return _finish("timm_vit", model, "timm", (_pixels(),))


TINY_MODELS: dict[str, Callable[[], TinyModel]] = {
    "bert": _bert,
    "roberta": _roberta,
    "lxmert": _lxmert,
    "visual_bert": _visual_bert,
    "vilt": _vilt,
    "clip_vision": _clip_vision,
    "clip_text": _clip_text,
    "bridgetower": _bridgetower,
    "timm_vit": _timm_vit,
}
"""Name -> builder of a :class:`TinyModel` (imports transformers / timm when called)."""
