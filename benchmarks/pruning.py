"""Pruning benchmarks: what structured removal and 2:4 sparsity buy, what mask training costs.

    python benchmarks/pruning.py                 # every section, full sizes
    python benchmarks/pruning.py --quick         # smoke run: small models, few repeats
    python benchmarks/pruning.py --sections latency --threads 4   # default: 1 thread

Sections (each an independent function printing one table; add one to :data:`SECTIONS`):

* ``latency`` — CPU inference latency of a model whose lowest-magnitude 50% of heads (per
  attention block) and 50% of FFN units (per FFN block) were removed for good
  (:func:`vlcompress.compress.structured.remove_heads` / ``remove_ffn_units``) against the dense
  model: a BERT-base-sized ``BertModel`` (12 layers, 768, 12 heads, FFN 3072; random init;
  batch 8 x 64 tokens) and MCAN-small as published (batch 8, 14 tokens, 100 regions x 2048).
  ``torch.inference_mode``, warm-up, dense and pruned called alternately, median over repeats,
  same batch; the issue's target is a speed-up of at least 1.6x. The FLOP ratio (torch's
  ``FlopCounterMode``) is the noise-free upper bound of the speed-up; a column checks that the
  reduced model computes what the masked dense model computes.
* ``mask_step`` — one training step of mask training (``MaskTraining`` at 50%: weights frozen,
  scores through the straight-through threshold, the scores' own Adam) against one dense
  fine-tuning step (AdamW on every weight), same model and batch; target at most 1.3x.
* ``semi_structured`` — with a CUDA GPU (compute capability 8.0 or newer): a stack of
  ``nn.Linear`` layers with 2:4 magnitude-masked weights, dense fp16 / bf16 against
  ``torch.sparse.to_sparse_semi_structured``; prints "skipped: no CUDA" otherwise.

Timings on a shared machine are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from vlcompress.compress.structured import remove_ffn_units, remove_heads
from vlcompress.models.anatomy import Anatomy, anatomy_of
from vlcompress.models.anatomy.tiny import tensors_of


# ---------------------------------------------------------------------- shared helpers
def median_seconds(fn: Callable[[], Any], warmup: int, repeats: int, cuda: bool = False) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_median_seconds(
    first: Callable[[], Any], second: Callable[[], Any], warmup: int, repeats: int
) -> tuple[float, float]:
    """Median wall times of ``first()`` and ``second()``, called alternately (so that load
    from other processes on a shared machine falls on both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def magnitude_plan(
    model: nn.Module, anatomy: Anatomy, fraction: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Float keep-masks removing the ``fraction`` lowest-magnitude heads of every attention
    block (squared L2 norm of the head's q/k/v rows and out columns) and units of every FFN
    block (squared norm of the unit's up row and down column); at least one of each is kept."""
    heads = {}
    for a in anatomy.attentions:
        scores = torch.stack(
            [
                sum(w[i].detach().float().pow(2).sum() for w, i in where.values())
                for where in (anatomy.head_weights(model, a.name, h) for h in range(a.num_heads))
            ]
        )
        heads[a.name] = _top(scores, fraction)
    units = {}
    for f in anatomy.ffns:
        up, down = model.get_submodule(f.up).weight, model.get_submodule(f.down).weight
        scores = up.detach().float().pow(2).sum(1) + down.detach().float().pow(2).sum(0)
        units[f.name] = _top(scores, fraction)
    return heads, units


def _top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    keep = max(1, scores.numel() - math.floor(fraction * scores.numel()))
    mask = torch.zeros_like(scores)
    mask[scores.topk(keep).indices] = 1.0
    return mask


# ---------------------------------------------------------------------- latency (CPU)
@dataclass
class Case:
    """A model to time: the model (eval mode) and a call on a fixed batch."""

    name: str
    shape: str
    model: nn.Module
    call: Callable[[nn.Module], Any]


def _bert_case(quick: bool) -> Case:
    import transformers

    torch.manual_seed(0)
    layers, batch, tokens = (2, 2, 16) if quick else (12, 8, 64)
    cfg = transformers.BertConfig(num_hidden_layers=layers)  # base: 768, 12 heads, FFN 3072
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, cfg.vocab_size, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    return Case(
        f"BERT-base ({layers} layers)",
        f"{batch} x {tokens} tokens",
        model,
        lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state,
    )


def _mcan_case(quick: bool) -> Case:
    from vlcompress import registry
    from vlcompress.data import VLBatch

    torch.manual_seed(0)
    layers, batch = (1, 2) if quick else (6, 8)
    model = registry.build(
        "model", "mcan_small", {"num_layers": layers}, vocab_size=20572, num_answers=3129
    ).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20572, (batch, 14), generator=g)
    data = VLBatch(
        text_ids=ids,
        text_mask=ids != 0,
        visual=torch.randn(batch, 100, 2048, generator=g),
        visual_mask=torch.ones(batch, 100, dtype=torch.bool),
    )
    return Case(f"MCAN-small ({layers}+{layers} layers)", f"{batch} x (14 tok, 100 reg)", model,
                lambda m: m(data))  # fmt: skip


def _flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls and attention, as torch's FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _max_diff(a: Any, b: Any) -> float:
    ta, tb = tensors_of(a), tensors_of(b)
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def latency_section(args: argparse.Namespace, console: Console) -> None:
    """Dense vs 50%-heads-and-50%-FFN-units-removed CPU inference latency."""
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    table = Table(
        title=(
            f"CPU inference latency, {args.fraction:.0%} of heads and FFN units removed "
            f"(torch threads {torch.get_num_threads()}, median of {repeats} alternating calls after {warmup} warm-up)"
        )
    )
    for col in ("model", "batch", "params dense", "params pruned", "GFLOP dense / pruned",
                "FLOP ratio", "dense ms", "pruned ms", "speed-up", "max |masked - pruned|"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("model", "batch") else "right")
    for build in (_bert_case, _mcan_case):
        case = build(args.quick)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the BERT without pooler: coverage is not the point
            anatomy = anatomy_of(case.model)
        heads, units = magnitude_plan(case.model, anatomy, args.fraction)
        pruned = copy.deepcopy(case.model)
        remove_ffn_units(pruned, remove_heads(pruned, anatomy, heads).anatomy, units)
        with torch.inference_mode():
            handles = anatomy.mask_heads(case.model, heads)
            handles += anatomy.mask_ffn_units(case.model, units)
            masked = case.call(case.model)
            for h in handles:
                h.remove()
            diff = _max_diff(masked, case.call(pruned))
            flops = [_flops(lambda c=case, m=m: c.call(m)) for m in (case.model, pruned)]
            dense_s, pruned_s = paired_median_seconds(
                lambda c=case: c.call(c.model), lambda c=case, p=pruned: c.call(p), warmup, repeats
            )
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        table.add_row(
            case.name, case.shape, f"{count(case.model) / 1e6:.1f}M", f"{count(pruned) / 1e6:.1f}M",
            f"{flops[0] / 1e9:.1f} / {flops[1] / 1e9:.1f}", f"{flops[0] / flops[1]:.2f}x",
            f"{dense_s * 1e3:.1f}", f"{pruned_s * 1e3:.1f}", f"{dense_s / pruned_s:.2f}x",
            f"{diff:.1e}",
        )  # fmt: skip
    console.print(table)


# ---------------------------------------------------------------------- mask-training step
class _Holder(nn.Module):
    """What a LightningModule looks like to a callback: the model under ``.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def mask_step_section(args: argparse.Namespace, console: Console) -> None:
    """A mask-training step (MaskTraining: frozen weights, scores through the straight-through
    threshold, the scores' Adam) against a dense fine-tuning step (every weight trained by
    AdamW), same model and batch; the issue's target is at most 1.3x."""
    from vlcompress.callbacks import MaskTraining

    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    table = Table(
        title=(
            f"training step: mask training at 50% sparsity vs dense fine-tuning (torch threads "
            f"{torch.get_num_threads()}, median of {repeats} alternating steps after {warmup} warm-up)"
        )
    )
    for col in ("model", "batch", "masked weights", "dense step ms", "mask step ms", "ratio"):
        table.add_column(col, justify="left" if col in ("model", "batch") else "right")
    for build in (_bert_case, _mcan_case):
        case = build(args.quick)
        dense = case.model.train()
        masked = copy.deepcopy(dense)
        opt = torch.optim.AdamW(dense.parameters(), lr=1e-5)
        holder = _Holder(masked)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cb = MaskTraining(0.5, seed=0)
            cb.setup(None, holder, "fit")
            cb.on_fit_start(None, holder)

        def dense_step(
            m: nn.Module = dense, o: torch.optim.Optimizer = opt, c: Case = case
        ) -> None:
            o.zero_grad(set_to_none=True)
            c.call(m).float().pow(2).mean().backward()
            o.step()

        def mask_step(
            m: nn.Module = masked, c: Case = case, cb: Any = cb, h: nn.Module = holder
        ) -> None:
            c.call(m).float().pow(2).mean().backward()
            cb.on_before_optimizer_step(None, h, None)  # the scores' Adam step

        dense_s, mask_s = paired_median_seconds(dense_step, mask_step, warmup, repeats)
        n = sum(t.numel for t in cb.targets)
        table.add_row(case.name, case.shape, f"{n / 1e6:.1f}M", f"{dense_s * 1e3:.0f}",
                      f"{mask_s * 1e3:.0f}", f"{mask_s / dense_s:.2f}x")  # fmt: skip
    console.print(table)


# ---------------------------------------------------------------------- 2:4 (GPU)
def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive ones in each row."""
    groups = weight.abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(weight.shape)


def semi_structured_section(args: argparse.Namespace, console: Console) -> None:
    """2:4 semi-structured sparse vs dense inference of a Linear stack (CUDA only)."""
    title = "2:4 semi-structured sparse vs dense Linear stack (GPU)"
    if not torch.cuda.is_available():
        console.print(f"[bold]{title}[/bold]: skipped: no CUDA")
        return
    if torch.cuda.get_device_capability() < (8, 0):
        console.print(f"[bold]{title}[/bold]: skipped: needs compute capability 8.0 or newer")
        return
    from torch.sparse import to_sparse_semi_structured

    warmup, repeats = (2, 5) if args.quick else (10, 50)
    dims = [(768, 3072), (3072, 768)] * (2 if args.quick else 6)  # BERT-base FFNs
    tokens = 1024 if args.quick else 8 * 64 * 8
    table = Table(
        title=f"{title}: {len(dims)} layers, {tokens} tokens, {torch.cuda.get_device_name()}"
    )
    for col in ("dtype", "dense ms", "2:4 ms", "speed-up", "max |dense - 2:4|"):
        table.add_column(col, justify="right")
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        dense = nn.Sequential(*(nn.Linear(i, o) for i, o in dims)).to("cuda", dtype).eval()
        for layer in dense:
            layer.weight.data.mul_(two_four_mask(layer.weight.data))
        sparse = copy.deepcopy(dense)
        try:
            for layer in sparse:
                layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.data))
            x = torch.randn(tokens, dims[0][0], device="cuda", dtype=dtype)
            with torch.inference_mode():
                diff = (dense(x).float() - sparse(x).float()).abs().max().item()
                dense_s = median_seconds(lambda d=dense, x=x: d(x), warmup, repeats, cuda=True)
                sparse_s = median_seconds(lambda s=sparse, x=x: s(x), warmup, repeats, cuda=True)
        except (RuntimeError, NotImplementedError) as err:  # no kernel for this dtype / build
            table.add_row(str(dtype), "-", "-", "-", f"failed: {str(err)[:60]}")
            continue
        table.add_row(str(dtype), f"{dense_s * 1e3:.3f}", f"{sparse_s * 1e3:.3f}",
                      f"{dense_s / sparse_s:.2f}x", f"{diff:.1e}")  # fmt: skip
    console.print(table)


# ---------------------------------------------------------------------- entry point
SECTIONS: dict[str, Callable[[argparse.Namespace, Console], None]] = {
    "latency": latency_section,
    "mask_step": mask_step_section,
    "semi_structured": semi_structured_section,
}
"""Name -> section; each prints one table (or one line saying why it was skipped)."""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models, few repeats")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared machine, threads beyond the free cores "
        "wait at OpenMP barriers and the timings measure the neighbours, not the model)",
    )  # fmt: skip
    parser.add_argument("--fraction", type=float, default=0.5, help="share of heads/units removed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if not 0.0 <= args.fraction < 1.0:
        parser.error(f"--fraction must be in [0, 1), got {args.fraction}")
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    console.print(f"torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")
    for name in args.sections:
        SECTIONS[name](args, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
