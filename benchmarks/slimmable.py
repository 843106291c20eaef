"""Slimmable MCAN (BST, seed 001): what slicing costs and what the submodels save.

Prints, as ratios measured in one run on random region features (MCAN-small with BST's
adapters, 20,572 words, 3,129 answers, 14 tokens, 100 regions of 2048):

1. the exported smallest submodel's latency vs the full model at batch 64 (target <= 0.25x);
2. the slimmed-in-place vs the exported latency of the same submodels (target <= 1.1x: slicing
   weights at run time must not cost much);
3. a sandwich training step (largest + smallest + 3 random submodels, one backward) vs one
   plain step, next to the sum of the sampled submodels' MACs over the full model's (the
   expected ratio).

Usage: ``python benchmarks/slimmable.py [--device cpu|cuda] [--batch 64] [--repeats 5]``
(``--model mcan_tiny`` for a quick check).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlcompress.compress.slimmable import TRIANGLE, Slimmable, Submodel
from vlcompress.data import VLBatch
from vlcompress.models import build_model
from vlcompress.utils.flops import count_compute, measure_latency, resize_batch


def make_batch(batch: int, regions: int, tokens: int, dim: int, vocab: int, device: str) -> VLBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, tokens), generator=g)
    ids[:, tokens - 3 :] = 0  # some question padding
    mask = torch.ones(batch, regions, dtype=torch.bool)
    mask[:, regions - 10 :] = False
    b = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(batch, regions, dim, generator=g),
                visual_mask=mask)  # fmt: skip
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(b, torch.device(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mcan_small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    dev = args.device
    tiny = args.model == "mcan_tiny"
    vocab, answers = (30, 7) if tiny else (20572, 3129)
    dim, regions, tokens = (16, 20, 14) if tiny else (2048, 100, 14)
    opts = {"width_adapters": True, **({"num_layers": 6, "num_heads": 4} if tiny else {})}
    torch.manual_seed(0)
    model = build_model(args.model, vocab, answers, **opts).to(dev).eval()
    big = make_batch(args.batch, regions, tokens, dim, vocab, dev)
    one = resize_batch(big, 1)
    slim = Slimmable(model)
    full_macs = count_compute(model, one).macs

    print(
        f"# every triangle submodel of {args.model} (+ BST adapters): {vocab} words, {answers} "
        f"answers, {tokens} tokens, {regions} regions; MACs and FLOPs (= 2 x MACs) per example"
    )
    print("| submodel | parameters (M) | x full | MACs (G) | FLOPs (G) | x full |")
    print("|---|---|---|---|---|---|")
    for sub in TRIANGLE:
        small = slim.export(sub, one)
        c = count_compute(small, one)
        n = sum(p.numel() for p in small.parameters())
        n_full = sum(p.numel() for p in model.parameters())
        print(f"| {sub.name} | {n / 1e6:.2f} | {n / n_full:.2f} | {c.macs / 1e9:.3f} | "
              f"{c.flops / 1e9:.3f} | {c.macs / full_macs:.2f} |")  # fmt: skip
    print()

    def t(fn) -> float:
        return measure_latency(fn, repeats=args.repeats, warmup=2, device=dev)

    print(
        f"# slimmable {args.model} on {dev}, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    t_full = t(lambda: model(big))
    print(f"full model: {t_full * 1e3:.1f} ms, {full_macs / 1e6:.1f} M MACs / example")
    print("| submodel | MACs ratio | exported / full | slimmed / exported |")
    print("|---|---|---|---|")
    ratios = {}
    for sub in (TRIANGLE[0], Submodel(0.5, 1.0), Submodel(0.75, 1.0)):
        small = slim.export(sub, one).eval()
        macs = count_compute(small, one).macs
        t_exp = t(lambda small=small: small(big))
        with slim.submodel(sub):
            t_slim = t(lambda: model(big))
        ratios[sub.name] = (t_exp / t_full, t_slim / t_exp)
        print(f"| {sub.name} | {macs / full_macs:.3f}x | {t_exp / t_full:.3f}x | "
              f"{t_slim / t_exp:.3f}x |")  # fmt: skip
    smallest = ratios[TRIANGLE[0].name]
    print(f"\nsmallest exported vs full, batch {args.batch}: {smallest[0]:.3f}x (target <= 0.25x)")
    print(f"slimmed in place vs exported, smallest: {smallest[1]:.3f}x (target <= 1.1x)")

    # sandwich step vs plain step
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    sample = [TRIANGLE[-1], TRIANGLE[0], TRIANGLE[3], TRIANGLE[5], TRIANGLE[8]]

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        model(big).sum().backward()
        opt.step()

    def sandwich_step() -> None:
        opt.zero_grad(set_to_none=True)
        total = 0
        for sub in sample:
            slim.set(sub)
            total = total + model(big).sum()
        slim.set(Submodel(1.0, 1.0))
        total.backward()
        opt.step()

    def timed(fn, n: int) -> float:
        fn()
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    n = max(1, args.repeats // 2)
    t_plain, t_sand = timed(plain_step, n), timed(sandwich_step, n)
    expected = 0.0
    for sub in sample:
        with slim.submodel(sub):
            expected += count_compute(model, one).macs / full_macs
    print(f"\nsandwich step ({', '.join(s.name for s in sample)}) vs plain step: "
          f"{t_sand / t_plain:.2f}x; sum of their MACs / full: {expected:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
