"""The anatomy of every recognised model, measured (tiny random configs, CPU, a few seconds).

    python benchmarks/anatomy_table.py

For each model of :data:`vlcompress.models.anatomy.tiny.TINY_MODELS` (and MCAN, which declares
its own anatomy) it builds the model, finds its anatomy and checks, on the example input:

* recognised — ``anatomy_of`` finds it (layers / stacks / attention blocks / FFN blocks);
* coverage — declared parameters / all parameters;
* mask heads — for *every* attention block, switching head 1 off changes the output, gives the
  dead head's query rows exactly zero gradient, and removing the mask restores the output
  bit for bit (the layouts met are listed);
* bypass — every layer of every stack bypassed at once: the model runs through its real call
  signature and returns the same structure; restoring gives the same output bit for bit;
* capture — every read-out yields a tensor;
* modalities — the modalities of the declared layers.

A failed check prints ``FAIL: <reason>`` in its cell.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from vlcompress.models.anatomy import Anatomy, anatomy_of
from vlcompress.models.anatomy.tiny import TINY_MODELS, TinyModel, tensors_of


def _mcan() -> TinyModel:
    from vlcompress.data import VLBatch
    from vlcompress.models.mcan import MCAN

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (2, 6), generator=g)
    batch = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(2, 5, 16, generator=g))
    return TinyModel("mcan", MCAN.from_variant("tiny", 30, 7).eval(), (batch,), source="vlcompress")


def _same(a: Any, b: Any) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _hidden(output: Any) -> dict[str, torch.Tensor]:
    return {k: t for k, t in tensors_of(output).items() if "attentions" not in k}


def check_heads(case: TinyModel, an: Anatomy) -> str:
    """Mask head 1 of every attention block, one block at a time."""
    model = case.model
    with torch.no_grad():
        base = case.run()
    for spec in an.attentions:
        mask = torch.ones(spec.num_heads)
        mask[min(1, spec.num_heads - 1)] = 0
        (handle,) = an.mask_heads(model, {spec.name: mask})
        model.zero_grad(set_to_none=True)
        out = case.run()
        if _same(out, base):
            return f"FAIL: {spec.name}: output unchanged"
        loss = sum(t.float().pow(2).mean() for t in _hidden(out).values() if t.requires_grad)
        loss.backward()
        w, idx = an.head_weights(model, spec.name, min(1, spec.num_heads - 1))["q"]
        if w.grad is None or w.grad[idx].abs().sum() != 0:
            return f"FAIL: {spec.name}: the dead head's query rows get gradient"
        handle.remove()
        with torch.no_grad():
            if not _same(case.run(), base):
                return f"FAIL: {spec.name}: removing the mask does not restore the output"
    layouts = sorted({a.layout for a in an.attentions})
    return f"ok ({len(an.attentions)} blocks; {', '.join(layouts)})"


def check_bypass(case: TinyModel, an: Anatomy) -> str:
    """Bypass every layer at once, run, restore."""
    model = case.model
    with torch.no_grad():
        base = case.run()
        names = [n for stack in an.stacks.values() for n in stack]
        originals = {n: an.bypass_layer(model, n) for n in names}
        try:
            skipped = case.run()
        finally:
            for n, layer in originals.items():
                an.replace_layer(model, n, layer)
        got = {k: t.shape for k, t in _hidden(skipped).items()}
        want = {k: t.shape for k, t in _hidden(base).items()}
        if got != want:
            return f"FAIL: output structure {sorted(got)} != {sorted(want)}"
        if not _same(case.run(), base):
            return "FAIL: restoring the layers does not restore the output"
    return f"ok ({len(names)} layers)"


def check_capture(case: TinyModel, an: Anatomy) -> str:
    """Every read-out yields a tensor."""
    with torch.no_grad(), an.capture(case.model) as states:
        case.run()
    missing = [k for k in an.readouts if not isinstance(states.get(k), torch.Tensor)]
    if missing:
        return f"FAIL: no tensor at {missing[:3]}"
    return f"ok ({len(states)} read-outs)"


def _cell(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a failed check is reported in its cell
        return f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:80]}"


def row(name: str, build: Callable[[], TinyModel]) -> list[str]:
    """The measured cells of one model."""
    try:
        case = build()
    except Exception as err:  # noqa: BLE001
        return [name, f"FAIL: cannot build ({type(err).__name__}: {err})", "", "", "", "", ""]
    label = f"{name} ({type(case.model).__name__}{', ' + case.source if case.source != 'transformers' else ''})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            an = anatomy_of(case.model)
    except Exception as err:  # noqa: BLE001
        return [label, f"FAIL: {type(err).__name__}: {err}", "", "", "", "", ""]
    recognised = (
        f"ok ({len(an.layers)} layers, {len(an.stacks)} stacks, "
        f"{len(an.attentions)} attn, {len(an.ffns)} ffn)"
    )
    report = an.coverage(case.model)
    coverage = f"{report.fraction:.1%} of {report.total:,}"
    if report.uncovered:
        coverage += f" (missing {report.largest_uncovered(2)})"
    modalities = ", ".join(m.value for m in an.modalities)
    return [
        label,
        recognised,
        coverage,
        _cell(lambda: check_heads(case, an)),
        _cell(lambda: check_bypass(case, an)),
        _cell(lambda: check_capture(case, an)),
        modalities,
    ]


def main() -> None:
    """Print the table."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    table = Table(title="Anatomy of the recognised models (tiny random configs)")
    for col in ("model", "recognised", "coverage", "mask heads", "bypass", "capture", "modalities"):
        table.add_column(col, overflow="fold")
    builders: dict[str, Callable[[], TinyModel]] = {"mcan": _mcan, **TINY_MODELS}
    for name, build in builders.items():
        table.add_row(*row(name, build))
    console = Console(width=200)
    console.print(table)
    console.print(f"{len(builders)} models in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
