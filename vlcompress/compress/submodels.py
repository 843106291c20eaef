"""Submodels of a slimmable model: their cost, the best one under a budget, a standalone export.

* :func:`profile_submodels` — parameters, MACs / FLOPs (one example) and measured latency (batch
  1 and a large batch) of every submodel, on its *exported* (physically smaller) copy;
* :func:`select` — the most accurate submodel whose cost fits a budget;
* :func:`save_export` / :func:`load_export` — a submodel as its own folder (``model.pt`` state
  dict + ``config.yaml`` with the smaller model's options + ``export.json``), loaded back with
  nothing but the registry: no slimming machinery;
* :class:`ExportedModel` — an export with what it needs to answer questions on its own (the
  answer list, the question vocabulary or tokenizer, the input format)::

      model = ExportedModel.load("runs/seed001_bst/export/w0.5_d0.6667")
      model.predict(["what color is the shape?"], [Image.open("0.png")])  # -> ["red"]
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlcompress.compress.slimmable import Slimmable, Submodel, logits_in
from vlcompress.models.contract import options_of

__all__ = [
    "BUDGET_KEYS",
    "LATENCY_SPREAD_LIMIT",
    "ExportedModel",
    "latency_spread_problems",
    "noisy_latency_message",
    "load_export",
    "parse_budget",
    "profile_submodels",
    "save_export",
    "select",
]

log = logging.getLogger(__name__)

BUDGET_KEYS = ("parameters", "macs", "flops", "latency_b1_ms", "latency_large_ms")
"""Costs a budget may bound (latency in milliseconds: the median of the timed calls)."""

LATENCY_SPREAD_LIMIT = 1.5
"""A latency whose 90th / 10th percentile ratio exceeds this is too noisy to trust."""


def profile_submodels(
    slim: Slimmable,
    space: Sequence[Submodel],
    example: Any,
    large: Any | None = None,
    *,
    latency: bool = True,
    repeats: int = 20,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Cost of every submodel of ``space``, measured on its exported copy.

    Latency is the median of ``repeats`` timed calls (after 3 untimed ones), with the 10th and
    90th percentiles as its spread; a spread wider than :data:`LATENCY_SPREAD_LIMIT` is logged
    as a warning (a shared or busy machine).

    Args:
        slim: the slimmable model.
        space: the submodels.
        example: a one-example input (``model(example)``; MACs are per this input).
        large: a large-batch input for the second latency (``None``: skip it).
        latency: measure latency at all.
        repeats: timed calls per latency.
        device: where latency is measured.

    Returns:
        One row per submodel: ``submodel``, ``width``, ``depth``, ``parameters``, ``macs``,
        ``flops`` and, when measured, ``latency_b1_ms`` / ``latency_large_ms`` (medians) with
        ``latency_b1_p10_ms``, ``latency_b1_p90_ms``, ``latency_large_p10_ms``,
        ``latency_large_p90_ms``.

    Raises:
        ValueError: for ``repeats < 1``.
    """
    from vlcompress.utils.flops import count_compute, latency_samples

    if latency and repeats < 1:
        raise ValueError(f"repeats must be at least 1 (timed calls per latency), got {repeats}.")
    rows = []
    for sub in space:
        small = slim.export(sub, example).eval()
        compute = count_compute(small, example)
        row: dict[str, Any] = {
            "submodel": sub.name,
            "width": sub.width,
            "depth": sub.depth,
            "parameters": sum(p.numel() for p in small.parameters()),
            "macs": compute.macs,
            "flops": compute.flops,
        }
        if latency:
            small.to(device)
            for key, x in (("latency_b1", example), ("latency_large", large)):
                if x is not None:
                    x = _to(x, device)
                    times = latency_samples(lambda x=x, m=small: m(x), repeats, device=device)
                    row.update(latency_columns(key, times))
        rows.append(row)
        log.info("%s: %s", sub.name, {k: v for k, v in row.items() if k != "submodel"})
    problems = latency_spread_problems(rows)
    if problems:
        log.warning("%s", noisy_latency_message(problems))
    return rows


def latency_columns(key: str, seconds: Sequence[float]) -> dict[str, float]:
    """``{key}_ms`` (median), ``{key}_p10_ms`` and ``{key}_p90_ms`` of ``seconds``."""
    ms = sorted(1e3 * t for t in seconds)
    if len(ms) > 1:
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    else:
        p10 = p90 = ms[0]
    return {
        f"{key}_ms": round(statistics.median(ms), 3),
        f"{key}_p10_ms": round(p10, 3),
        f"{key}_p90_ms": round(p90, 3),
    }


def latency_spread_problems(
    rows: Iterable[Mapping[str, Any]],
    limit: float = LATENCY_SPREAD_LIMIT,
    keys: Sequence[str] = ("latency_b1_ms", "latency_large_ms"),
) -> list[str]:
    """The measured latencies of ``keys`` whose p90 / p10 ratio exceeds ``limit``.

    Args:
        rows: rows of :func:`profile_submodels`.
        limit: the largest trusted ratio.
        keys: the latency columns to check.

    Returns:
        One entry per noisy latency, e.g. ``["w1/4-d1/6 latency_b1_ms 0.4-9.8 ms (x24.5)"]``.
    """
    out = []
    for r in rows:
        for key in keys:
            stem = key.removesuffix("_ms")
            p10, p90 = r.get(f"{stem}_p10_ms"), r.get(f"{stem}_p90_ms")
            if p10 is None or p90 is None:
                continue
            ratio = p90 / p10 if p10 > 0 else math.inf
            if ratio > limit:
                out.append(f"{r.get('submodel')} {key} {p10:.3g}-{p90:.3g} ms (x{ratio:.3g})")
    return out


def noisy_latency_message(problems: Sequence[str], limit: float = LATENCY_SPREAD_LIMIT) -> str:
    """One warning line for :func:`latency_spread_problems`'s output."""
    return (
        f"latency too noisy to trust (p90/p10 > {limit:g}; a shared or busy CPU? measure on an "
        f"idle machine, or with more repeats): {'; '.join(problems)}"
    )


def _to(x: Any, device: torch.device | str) -> Any:
    """``x`` (a tensor, a dataclass batch, or a container of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {f.name: _to(getattr(x, f.name), device) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **changes)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def parse_budget(text: str) -> dict[str, float]:
    """``"macs=5e8"`` or ``"parameters=2e7,latency_b1_ms=5"`` -> ``{key: bound}``.

    Raises:
        ValueError: for an unknown key (the allowed ones are listed, with the closest), a
            value that is not a positive number, a key given twice, or an empty budget.
    """
    allowed = ", ".join(BUDGET_KEYS)
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep:
            raise ValueError(
                f"budget {part!r}: write key=value with key one of {allowed}, e.g. macs=1e7 or "
                "parameters=2e7,latency_b1_ms=5."
            )
        if key not in BUDGET_KEYS:
            close = difflib.get_close_matches(key, BUDGET_KEYS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"budget {part!r}: unknown key {key!r}{hint}; the keys are {allowed}, e.g. "
                "budget=macs=1e7."
            )
        try:
            bound = float(value)
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound) or bound <= 0:
            raise ValueError(
                f"budget {part!r}: {value!r} is not a positive number; write e.g. {key}=1e7."
            )
        if key in out:
            raise ValueError(f"budget {text!r}: {key!r} is given twice; give each key once.")
        out[key] = bound
    if not out:
        raise ValueError(f"empty budget; give key=value with key one of {allowed}, e.g. macs=1e7.")
    return out


def select(
    rows: Iterable[Mapping[str, Any]], budget: Mapping[str, float], metric: str = "accuracy"
) -> dict[str, Any]:
    """The row with the highest ``metric`` among those within every bound of ``budget``
    (ties: the cheaper in MACs).

    Raises:
        ValueError: when a row lacks a budgeted cost or the metric, or nothing fits (naming,
            per budgeted key, the smallest value any submodel reaches).
    """
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("no submodels to select from.")
    for key in (*budget, metric):
        missing = [r.get("submodel") for r in rows if r.get(key) is None]
        if missing:
            raise ValueError(
                f"select: submodels {missing} have no {key!r}; profile them first (latency "
                "keys need profile_submodels(latency=True))."
            )
    fits = [r for r in rows if all(r[k] <= v for k, v in budget.items())]
    if not fits:
        smallest = []
        for k in budget:
            low = min(rows, key=lambda r, k=k: r[k])
            smallest.append(f"{k}={low[k]:.4g} ({low['submodel']})")
        asked = ",".join(f"{k}={v:g}" for k, v in budget.items())
        raise ValueError(
            f"no submodel fits the budget {asked}; the smallest achievable: "
            f"{', '.join(smallest)}: raise the budget to at least that."
        )
    return max(fits, key=lambda r: (r[metric], -r.get("macs", 0)))


def save_export(
    model: nn.Module,
    folder: str | Path,
    *,
    model_name: str,
    context: Mapping[str, Any],
    record: Mapping[str, Any],
    experiment: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    adapters: Mapping[str, Any] | None = None,
) -> Path:
    """Write an exported submodel as its own folder (atomically per file).

    Args:
        model: the exported (physically smaller) model; its ``options`` (a dataclass,
            :func:`vlcompress.models.contract.options_of`) rebuild it.
        folder: where to write.
        model_name: its registry name (e.g. ``mcan_small``).
        context: the builder's context arguments (``vocab_size``, ``num_answers``).
        record: what to record in ``export.json`` (submodel, costs, accuracy, source).
        experiment: the source run's configuration; written with the new model options as
            ``experiment.yaml`` (for evaluating the export with the same data).
        inputs: what :class:`ExportedModel` needs to answer questions, written as
            ``inputs.json``: ``answers`` (in output order), ``text_encoding`` (``words`` with
            ``words``, the vocabulary in id order, or ``wordpiece`` with ``tokenizer``),
            ``max_question_len``, ``visual_input`` and ``visual_shape`` (one example's pixels
            or features, e.g. ``[3, 64, 64]``).
        tokenizer: ``wordpiece`` only: the data's Hugging Face tokenizer, saved in
            ``tokenizer/``.
        adapters: for a model with installed adapters and removed layers, the spec of
            :func:`~vlcompress.compress.adapters.install_adapters` (re-applied on load).

    Returns:
        The folder.

    Raises:
        TypeError: for a model without dataclass ``options``.
        ValueError: for ``inputs`` without the answers or the question encoding.
    """
    from omegaconf import OmegaConf

    from vlcompress.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    model_options = options_of(model)
    if model_options is None:
        raise TypeError(
            f"save_export needs a model with dataclass options (a registered model's "
            f".options); {type(model).__name__} has none: save its state_dict and rebuild it "
            "with its own library instead."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = _plain(asdict(model_options))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(folder / "model.pt", data)
    spec = {"model": {"name": model_name, "options": options}, "context": dict(context)}
    if adapters is not None:
        spec["adapters"] = _plain(dict(adapters))
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec)))
    if experiment is not None:
        exp = dict(experiment)
        exp["model"] = {"name": model_name, "options": options}
        exp["callbacks"] = [c for c in exp.get("callbacks") or [] if c.get("name") not in
                            ("slimmable_training", "architecture_skipping")]  # fmt: skip
        exp["init_from"] = None  # the export's weights are in model.pt (load_export)
        atomic_write_text(folder / "experiment.yaml", OmegaConf.to_yaml(OmegaConf.create(exp)))
    if inputs is not None:
        _check_inputs(inputs, tokenizer)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "tokenizer"))
        atomic_write_json(folder / "inputs.json", _plain(dict(inputs)))
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_json(folder / "export.json", {**_plain(dict(record)), "model_sha256": digest})
    return folder


def _check_inputs(inputs: Mapping[str, Any], tokenizer: Any) -> None:
    missing = [k for k in ("answers", "text_encoding", "max_question_len", "visual_input")
               if inputs.get(k) is None]  # fmt: skip
    if missing:
        raise ValueError(f"save_export: inputs lacks {missing}; give the data module's.")
    if inputs["text_encoding"] == "words" and not inputs.get("words"):
        raise ValueError("save_export: text_encoding 'words' needs inputs['words'] (the "
                         "vocabulary in id order, data module .word_vocab.words).")  # fmt: skip
    if inputs["text_encoding"] == "wordpiece" and tokenizer is None:
        raise ValueError("save_export: text_encoding 'wordpiece' needs tokenizer= (the data "
                         "module's .tokenizer).")  # fmt: skip


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_export(folder: str | Path) -> nn.Module:
    """A model exported by :func:`save_export`, rebuilt from the registry and its weights.

    Raises:
        FileNotFoundError: when ``config.yaml`` or ``model.pt`` is missing.
    """
    from omegaconf import OmegaConf

    from vlcompress import registry

    folder = Path(folder)
    for name in ("config.yaml", "model.pt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing: not an export folder (write one with "
                "`python -m vlcompress export <run> width=... depth=...`)."
            )
    spec = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    model = registry.build(
        "model", spec["model"]["name"], spec["model"]["options"], **spec["context"]
    )
    if spec.get("adapters"):  # adapters installed, skipped layers removed (seed 002)
        from vlcompress.compress.adapters import install_adapters
        from vlcompress.models.anatomy import anatomy_of

        install_adapters(model, anatomy_of(model), spec["adapters"])
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _logits(output: Any) -> torch.Tensor:
    logits = logits_in(output)
    if logits is None:
        raise TypeError(f"cannot find the logits in the model's output ({type(output).__name__}).")
    return logits


@dataclass
class ExportedModel:
    """An exported submodel with what it needs to answer a question on its own.

    Build it with :meth:`load` from a folder written by ``python -m vlcompress export``.

    Attributes:
        model: the standalone model (:func:`load_export`), in eval mode.
        answers: the answer strings, in the model's output order.
        text_encoding: ``words`` or ``wordpiece``.
        max_question_len: question tokens kept (as in training).
        visual_input: what ``images`` are: ``pixels`` (images) or ``regions`` / ``grid``
            (features).
        visual_shape: one example's visual input shape in training (e.g. ``(3, 64, 64)``).
        words: ``words`` only: the question vocabulary, in id order.
        tokenizer: ``wordpiece`` only: the question tokenizer.
        record: the export's ``export.json`` (submodel, accuracy, costs, source run).

    Example::

        model = ExportedModel.load("runs/seed001_bst/export/w0.5_d0.6667")
        model.predict(["what shape is in the image?"], [Image.open("test/images/0.png")])
    """

    model: nn.Module
    answers: list[str]
    text_encoding: str
    max_question_len: int
    visual_input: str
    visual_shape: tuple[int, ...] | None = None
    words: list[str] | None = None
    tokenizer: Any = None
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | Path) -> ExportedModel:
        """The export in ``folder`` with its answers and question encoding.

        Raises:
            FileNotFoundError: when the folder is not an export, or an export written before
                exports carried their inputs (``inputs.json``): export it again.
        """
        folder = Path(folder)
        model = load_export(folder)
        path = folder / "inputs.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: this export has no answer list or question vocabulary "
                "(written by an older vlcompress); export it again with `python -m vlcompress "
                "export <run> width=... depth=...`, or use load_export(folder) for the bare model."
            )
        inputs = json.loads(path.read_text())
        tokenizer = None
        if inputs["text_encoding"] == "wordpiece":
            from vlcompress.data.text import wordpiece_tokenizer

            tokenizer = wordpiece_tokenizer(str(folder / "tokenizer"))
        record_path = folder / "export.json"
        shape = inputs.get("visual_shape")
        return cls(
            model=model,
            answers=list(inputs["answers"]),
            text_encoding=inputs["text_encoding"],
            max_question_len=int(inputs["max_question_len"]),
            visual_input=inputs["visual_input"],
            visual_shape=tuple(shape) if shape else None,
            words=inputs.get("words"),
            tokenizer=tokenizer,
            record=json.loads(record_path.read_text()) if record_path.is_file() else {},
        )

    def encode_questions(self, questions: Sequence[str]) -> torch.Tensor:
        """Token ids ``(len(questions), max_question_len)`` (0 pads), encoded as in training."""
        if isinstance(questions, str):
            raise TypeError("give a list of questions, e.g. ['what color is the shape?'].")
        if self.text_encoding == "words":
            from vlcompress.data.text import WordVocab

            return WordVocab(self.words or []).encode(list(questions), self.max_question_len)
        return self.tokenizer(
            list(questions), padding="max_length", truncation=True,
            max_length=self.max_question_len, return_tensors="pt",
        )["input_ids"]  # fmt: skip

    def batch(
        self,
        questions: Sequence[str],
        images: Any,
        *,
        visual_mask: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> Any:
        """The model's input (a :class:`~vlcompress.data.VLBatch`) for ``questions``.

        Args:
            questions: one question string per example.
            images: ``pixels``: PIL images, image file paths, ``H x W x 3`` uint8 arrays, a
                ``(B, H, W, 3)`` uint8 array / tensor or a ``(B, 3, H, W)`` float tensor in
                ``[0, 1]``; ``regions`` / ``grid``: a ``(B, N, D)`` feature tensor.
            visual_mask: features only: ``(B, N)`` True where a region is real.
            boxes: features only: ``(B, N, 4)`` normalised region boxes, if the model uses them.

        Raises:
            ValueError: for a count or shape that does not match the questions or training.
        """
        from vlcompress.data import VLBatch

        ids = self.encode_questions(questions)
        visual = self._visual(images)
        if visual.shape[0] != ids.shape[0]:
            raise ValueError(
                f"{ids.shape[0]} questions but {visual.shape[0]} images: give one image per "
                "question."
            )
        if self.visual_shape and tuple(visual.shape[1:]) != self.visual_shape:
            raise ValueError(
                f"the images have shape {tuple(visual.shape[1:])} per example; this export was "
                f"trained on {self.visual_shape} ({self.visual_input}): resize them first."
            )
        return VLBatch(text_ids=ids, text_mask=ids != 0, visual=visual,
                       visual_mask=visual_mask, boxes=boxes)  # fmt: skip

    def _visual(self, images: Any) -> torch.Tensor:
        import numpy as np

        if self.visual_input != "pixels":
            if not isinstance(images, torch.Tensor) or images.dim() != 3:
                raise ValueError(
                    f"this export reads {self.visual_input} features: give a (B, N, D) float "
                    "tensor of them (as the data module serves), not images."
                )
            return images.float()
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given: give one per question.")
            return torch.stack([self._visual(np.asarray(_open(im)))[0] for im in images])
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.dim() != 4 or not x.is_floating_point() or x.shape[1] not in (1, 3):
            raise ValueError(
                f"images of shape {tuple(x.shape)} ({x.dtype}): give PIL images, H x W x 3 "
                "uint8 arrays, or a (B, 3, H, W) float tensor in [0, 1]."
            )
        return x.float()

    @torch.no_grad()
    def predict(self, questions: Sequence[str], images: Any, **visual: Any) -> list[str]:
        """The answer to each question about its image (the highest-scoring answer).

        Args:
            questions: one question string per example.
            images: one image (or feature set) per question; see :meth:`batch`.
            **visual: ``visual_mask`` / ``boxes`` for feature inputs (see :meth:`batch`).

        Returns:
            One answer string per question.
        """
        batch = self.batch(questions, images, **visual)
        device = next(self.model.parameters()).device
        logits = _logits(self.model(_to(batch, device)))
        return [self.answers[i] for i in logits.argmax(dim=-1).tolist()]


def _open(image: Any) -> Any:
    """A PIL image for a path, the image itself otherwise (RGB)."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        image = Image.open(image)
    convert = getattr(image, "convert", None)
    return convert("RGB") if convert is not None else image
