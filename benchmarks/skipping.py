"""Seed 002 (DAS) by construction and by the clock: what skipping layers saves.

    python benchmarks/skipping.py            # everything (METER at 384 px takes a minute)
    python benchmarks/skipping.py --quick    # ViLT sections only

1. METER-CLIP16-RoBERTa, the published VQA configuration (384 px: 577 image tokens; text 50
   tokens; 3,129 answers): MACs per example of the whole model, and what skipping each of its
   12 fusion halves saves (the half's MACs minus its skip adapter's, b = 288); every set of 4
   halves, and those whose saving is the paper's 11.97% (within 0.25 points).
2. ViLT-B/32 at 384 x 640 (240 patches + [CLS], text 40): one layer skipped (skip adapter
   b = 192, parallel adapters b = 96 everywhere): MACs before and after.
3. Latency on this machine's CPU, as ratios measured in one run (the same process, batches
   interleaved): the exported ViLT-mini with 4 of its 6 layers removed (their skip adapters in
   their place, parallel adapters everywhere) against the full model, at batch 1 and 64; and a
   search-phase training step (a drawn arm skipped, plus the amortised probe forwards: 3 probes
   every 10 steps) against a plain adapter training step (nothing skipped).
4. bf16 autocast against fp32 on this CPU (``trainer.precision: bf16-mixed``, the ViLT-mini
   experiments' setting): a full fine-tuning step of ViLT-mini at batch 64, and the forward of
   the full model at batch 64, as ratios measured in one run. CPUs with AMX or AVX-512 BF16 run
   bf16 matrix products several times faster; elsewhere the ratio can exceed 1.

MACs follow :mod:`vlcompress.utils.flops` (matrix products and convolutions; element-wise work
not counted). Weights are random: MACs and latency do not depend on them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from vlcompress.compress.adapters import (
    BottleneckAdapter,
    add_parallel_adapters,
    block_width,
    install_adapters,
)
from vlcompress.data.batch import VLBatch
from vlcompress.models import build_model
from vlcompress.utils.flops import count_compute, interleaved_latency

PAPER_METER_SAVING = 0.1197


def _batch(b: int, text: int, height: int, width: int, vocab: int = 30522) -> VLBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (b, text), generator=g)
    return VLBatch(text_ids=ids, text_mask=torch.ones_like(ids, dtype=torch.bool),
                   visual=torch.rand(b, 3, height, width, generator=g))  # fmt: skip


def _skip_adapter(model: torch.nn.Module, anatomy, arm: str, b: int) -> torch.nn.Module:
    spec = anatomy.layer(arm)
    width = block_width(anatomy, dict(model.named_modules()), (spec.attentions or spec.ffns)[0])
    mods = [BottleneckAdapter(width, b, "zero", residual=True) for _ in spec.streams]
    return mods[0] if len(mods) == 1 else torch.nn.ModuleList(mods)


def _macs(model: torch.nn.Module, batch: VLBatch) -> int:
    with torch.no_grad():
        model(batch)  # a skipped layer learns its output structure on its first call
    return count_compute(model, batch).macs


def meter_table() -> None:
    """Section 1: METER's arms and the 4-arm sets that save the paper's 11.97%."""
    model = build_model("meter_clip16_roberta", vocab_size=50265, num_answers=3129).eval()
    anatomy = model.anatomy()
    arms = [x.name for x in anatomy.layers if x.name.startswith("cross_modal_")]
    batch = _batch(1, 50, 384, 384, vocab=50265)
    full = _macs(model, batch)
    saved: dict[str, dict[str, int]] = {"net": {}, "half": {}}
    for arm in arms:
        anatomy.skip_layer(model, arm, _skip_adapter(model, anatomy, arm, 288))
        saved["net"][arm] = full - _macs(model, batch)
        anatomy.skip_layer(model, arm, None)  # the half alone, no adapter in its place
        saved["half"][arm] = full - _macs(model, batch)
        anatomy.unskip_layer(model, arm)
    print(f"\n## METER-CLIP16-RoBERTa, 384 px, text 50: {full / 1e9:.2f} GMACs per example\n")
    print("| arm (fusion half) | MACs of the half (M) | share | saved with its skip adapter "
          "(b = 288) (M) | share |")  # fmt: skip
    print("|---|---|---|---|---|")
    for arm in arms:
        h, n = saved["half"][arm], saved["net"][arm]
        print(f"| {arm} | {h / 1e6:,.1f} | {h / full:.2%} | {n / 1e6:,.1f} | {n / full:.2%} |")
    for kind, what in (("half", "the halves' MACs"), ("net", "net of the skip adapters")):
        sets = [(sum(saved[kind][a] for a in c) / full, c) for c in itertools.combinations(arms, 4)]
        near = sorted(sets, key=lambda s: abs(s[0] - PAPER_METER_SAVING))
        shares = sorted(s for s, _ in sets)
        within = sum(abs(s - PAPER_METER_SAVING) <= 0.0025 for s, _ in sets)
        print(f"\n4-arm sets counting {what}: {len(sets)}; savings {shares[0]:.2%} .. "
              f"{shares[-1]:.2%}; {within} within 0.25 points of the paper's "
              f"{PAPER_METER_SAVING:.2%}; the closest:")  # fmt: skip
        for share, combo in near[:3]:
            texts = sum(a.startswith("cross_modal_text") for a in combo)
            print(f"  {share:.2%}  {texts} text + {4 - texts} image halves: {', '.join(combo)}")


def vilt_table() -> None:
    """Section 2: ViLT-B/32 at 384 x 640, one layer skipped."""
    model = build_model("vilt_b32", vocab_size=30522, num_answers=3129).eval()
    anatomy = model.anatomy()
    batch = _batch(1, 40, 384, 640)
    base = _macs(model, batch)
    added = add_parallel_adapters(model, anatomy, 96, "zero")
    full = _macs(model, batch)
    rows = []
    for arm in ("vilt.encoder.layer.0", "vilt.encoder.layer.5", "vilt.encoder.layer.11"):
        anatomy.skip_layer(model, arm, _skip_adapter(model, anatomy, arm, 192))
        rows.append((arm, _macs(model, batch)))
        anatomy.unskip_layer(model, arm)
    added.remove()
    print("\n## ViLT-B/32, 384 x 640 (241 image tokens), text 40\n")
    print("| model | GMACs per example | vs the backbone |")
    print("|---|---|---|")
    print(f"| backbone | {base / 1e9:.3f} | 1.000 |")
    print(f"| + parallel adapters (b = 96) | {full / 1e9:.3f} | {full / base:.3f} |")
    for arm, macs in rows:
        print(f"| + {arm} skipped (skip adapter b = 192) | {macs / 1e9:.3f} | {macs / base:.3f} "
              f"({1 - macs / full:.2%} below the adapted model) |")  # fmt: skip


def _interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn (noise hits all alike)."""
    times = interleaved_latency(fns, repeats, warmup=1)
    return {k: statistics.median(v) for k, v in times.items()}


def latency_table(repeats: int) -> None:
    """Section 3: exported skip-4 vs full ViLT-mini; search step vs adapter step."""
    torch.manual_seed(0)
    full = build_model("vilt_mini", vocab_size=30522, num_answers=13, language_init="random")
    skipped = build_model("vilt_mini", vocab_size=30522, num_answers=13, language_init="random")
    layers = [f"vilt.encoder.layer.{i}" for i in (1, 2, 3, 4)]
    install_adapters(skipped, skipped.anatomy(), {"bottleneck": 96,
                     "skipped": {name: 192 for name in layers}})  # fmt: skip
    full.eval(), skipped.eval()
    print("\n## ViLT-mini (64 px, 8 px patches, text 14) on this CPU: exported skip-4 vs full\n")
    print("| batch | full (ms) | skip 4 of 6 layers, exported (ms) | ratio |")
    print("|---|---|---|---|")
    for b in (1, 64):
        batch = _batch(b, 14, 64, 64)
        with torch.inference_mode():
            fns = {"full": lambda x=batch: full(x), "skip": lambda x=batch: skipped(x)}
            t = _interleaved(fns, repeats)
        print(
            f"| {b} | {t['full'] * 1e3:.2f} | {t['skip'] * 1e3:.2f} | {t['skip'] / t['full']:.3f} |"
        )

    # Search step vs plain adapter step (training, batch 64).
    model = build_model("vilt_mini", vocab_size=30522, num_answers=13, language_init="random")
    anatomy = model.anatomy()
    for p in model.parameters():
        p.requires_grad_(False)
    added = add_parallel_adapters(model, anatomy, 96, "seed")
    arms = [x.name for x in anatomy.layers]
    skip_adapters = {a: _skip_adapter(model, anatomy, a, 192) for a in arms}
    params = [
        *added.adapters.parameters(),
        *(p for m in skip_adapters.values() for p in m.parameters()),
    ]
    opt = torch.optim.Adam(params, lr=1e-4)
    batch = _batch(64, 14, 64, 64)
    target = torch.zeros(64, 13)
    g = torch.Generator().manual_seed(0)

    def train_step() -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def search_step() -> None:
        arm = arms[int(torch.randint(len(arms), (1,), generator=g))]
        anatomy.skip_layer(model, arm, skip_adapters[arm])
        try:
            train_step()
        finally:
            anatomy.unskip_layer(model, arm)

    def probe() -> None:
        arm = arms[int(torch.randint(len(arms), (1,), generator=g))]
        anatomy.skip_layer(model, arm, skip_adapters[arm])
        try:
            with torch.no_grad():
                model(batch)
        finally:
            anatomy.unskip_layer(model, arm)

    t = _interleaved({"adapter": train_step, "search": search_step, "probe": probe}, repeats)
    amortised = t["search"] + 3 * t["probe"] / 10
    print("\n## A search step vs a plain adapter step (ViLT-mini, batch 64, training)\n")
    print("| step | ms | vs the adapter step |")
    print("|---|---|---|")
    print(f"| adapter step (nothing skipped) | {t['adapter'] * 1e3:.1f} | 1.000 |")
    print(
        f"| search step (1 drawn arm skipped) | {t['search'] * 1e3:.1f} | {t['search'] / t['adapter']:.3f} |"
    )
    print(
        f"| + 3 probes every 10 steps, amortised | {amortised * 1e3:.1f} | {amortised / t['adapter']:.3f} |"
    )


def precision_table(repeats: int) -> None:
    """Section 4: bf16 autocast vs fp32 on this CPU (ViLT-mini, batch 64)."""
    torch.manual_seed(0)
    model = build_model("vilt_mini", vocab_size=30522, num_answers=13, language_init="random")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = _batch(64, 14, 64, 64)
    target = torch.zeros(64, 13)

    def train_step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def forward(bf16: bool) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(batch)

    t = _interleaved(
        {
            "train32": lambda: train_step(False),
            "train16": lambda: train_step(True),
            "fwd32": lambda: forward(False),
            "fwd16": lambda: forward(True),
        },
        max(3, repeats // 3),
    )
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"\n## bf16 autocast vs fp32 on this CPU ({cap}; ViLT-mini, batch 64)\n")
    print("| work | fp32 (ms) | bf16 autocast (ms) | ratio |")
    print("|---|---|---|---|")
    for name, a, b in (("training step (full fine-tuning)", "train32", "train16"),
                       ("forward (inference)", "fwd32", "fwd16")):  # fmt: skip
        print(f"| {name} | {t[a] * 1e3:.0f} | {t[b] * 1e3:.0f} | {t[b] / t[a]:.3f} |")


def main() -> None:
    """Print the tables (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip METER (the ViLT sections only)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    if not args.quick:
        meter_table()
    vilt_table()
    latency_table(args.repeats)
    precision_table(args.repeats)


if __name__ == "__main__":
    main()
