"""One MCAN-small (or ``--model``) training step (forward + backward + AdamW, bf16 autocast)
with each attention backend (torch SDPA vs our Triton kernel, attention dropout 0.1 inside it) and each way of
handling padding (MCAN's ``packing``): ``padded``; ``attention`` (the real tokens packed around
every attention call: no padded query or key computed); ``stack`` (the whole encoder / decoder
runs on the real tokens only, projections and FFNs included).

    python benchmarks/mcan_step.py            # needs a CUDA GPU
    python benchmarks/mcan_step.py --device cpu --batch 8 --repeats 3   # smoke run on the CPU
    python benchmarks/mcan_step.py --model uniter_base     # a single-stream model (padded, stack)

Random region features at VQA v2's shapes: batch 64, up to 100 regions of 2048 (10-100 per
image) and up to 14 question tokens (4-14), so ~40% of all positions are padding; 3,129 answers,
20,572 words. Prints the median step time of each variant (steps interleaved across variants)
and the ratios measured in this one run; target: Triton >= 1.15x faster than SDPA padded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device

from vlcompress.data import VLBatch
from vlcompress.kernels import attention_backend
from vlcompress.models import build_model


def make_batch(batch: int, regions: int, tokens: int, dim: int, vocab: int, device: str) -> VLBatch:
    """Random features with VQA v2's raggedness: questions of 4..``tokens`` words, images of
    10..``regions`` regions (bottom-up features are adaptive, 10-100 per image)."""
    g = torch.Generator().manual_seed(0)
    n_words = torch.randint(4, tokens + 1, (batch,), generator=g)
    n_regions = torch.randint(10, regions + 1, (batch,), generator=g)
    text_mask = torch.arange(tokens) < n_words[:, None]
    ids = torch.randint(1, vocab, (batch, tokens), generator=g) * text_mask
    corners = torch.rand(batch, regions, 4, generator=g)
    boxes = torch.cat([corners[..., :2].minimum(corners[..., 2:]),
                       corners[..., :2].maximum(corners[..., 2:])], -1)  # fmt: skip
    b = VLBatch(text_ids=ids, text_mask=text_mask,
                visual=torch.randn(batch, regions, dim, generator=g),
                visual_mask=torch.arange(regions) < n_regions[:, None], boxes=boxes)  # fmt: skip
    return move_data_to_device(b, torch.device(device))


class Variant:
    """One model with its optimiser and attention backend; ``step()`` times one training step."""

    def __init__(self, model, backend: str, batch, targets, device: str) -> None:
        self.model, self.backend, self.batch, self.targets = model, backend, batch, targets
        self.device, self.times = device, []
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self, record: bool = True) -> None:
        """One forward + backward + AdamW step, its seconds kept when ``record``."""
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        dtype = torch.bfloat16 if cuda else torch.float32
        with attention_backend(self.backend), torch.autocast(self.device, dtype, enabled=cuda):
            logits = self.model(self.batch)
            loss = F.binary_cross_entropy_with_logits(logits.float(), self.targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", default="mcan_small", help="mcan_* or a single-stream model")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/mcan_step.py needs a CUDA GPU (or --device cpu for a smoke run)")
        return 0
    mcan = args.model.startswith("mcan")
    vocab = 20572 if mcan else 30522  # GloVe words / BERT word pieces
    batch = make_batch(args.batch, 100, 14, 2048, vocab, args.device)
    targets = torch.rand(args.batch, 3129, device=args.device)
    backends = ["sdpa", "triton"] if args.device == "cuda" else ["sdpa"]
    packings = ("padded", "attention", "stack") if mcan else ("padded", "stack")
    variants = [(f"{b} {p}", b, p) for b in backends for p in packings]
    runs = {}
    for name, backend, packing in variants:
        torch.manual_seed(0)
        model = build_model(args.model, vocab, 3129, packing=packing).to(args.device).train()
        runs[name] = Variant(model, backend, batch, targets, args.device)
        for _ in range(2):  # warm-up: compilation, autotuning, allocator
            runs[name].step(record=False)
    for _ in range(args.repeats):  # interleaved, so that drift of the machine hits all alike
        for run in runs.values():
            run.step()
    times = {name: statistics.median(run.times) for name, run in runs.items()}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    pad = (
        1
        - float(batch.visual_mask.float().mean() * 100 + batch.text_mask.float().mean() * 14) / 114
    )
    print(f"{args.model} training step, batch {args.batch}, <= 100 regions, <= 14 tokens "
          f"({pad:.0%} padding), {name}")  # fmt: skip
    for name, t in times.items():
        print(f"  {name:>16}: {t * 1e3:8.2f} ms  ({times['sdpa padded'] / t:.2f}x sdpa padded)")
    if "triton padded" in times:
        best = min(t for name, t in times.items() if name.startswith("triton"))
        speedup = times["sdpa padded"] / best
        print(f"  speed-up of triton (best layout) over sdpa: {speedup:.2f}x (target >= 1.15x: "
              f"{'met' if speedup >= 1.15 else 'missed'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
