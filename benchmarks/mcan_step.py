"""One MCAN-small training step (forward + backward + AdamW, bf16 autocast) with each attention
backend: torch SDPA vs our Triton kernel (attention dropout 0.1 inside it), padded, and packed
around every attention call (``packed_attention``: no padded query or key computed).

    python benchmarks/mcan_step.py            # needs a CUDA GPU
    python benchmarks/mcan_step.py --device cpu --batch 8 --repeats 3   # smoke run on the CPU

Random region features at VQA v2's shapes (batch 64, 100 regions of 2048 with ~10% padding, 14
question tokens with padding), 3,129 answers, 20,572 words. Prints the median step time of
each backend and the ratio measured in this one run; target: Triton >= 1.15x faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from slimmable import make_batch  # noqa: E402

from vlcompress.kernels import attention_backend  # noqa: E402
from vlcompress.models import build_model  # noqa: E402


def step_time(model, batch, targets, backend: str, repeats: int, device: str) -> float:
    """Median seconds of one training step with ``backend``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    times = []
    for i in range(repeats + 2):  # two warm-up steps (compilation, autotuning, allocator)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with attention_backend(backend), torch.autocast(device, dtype, enabled=device == "cuda"):
            logits = model(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/mcan_step.py needs a CUDA GPU (or --device cpu for a smoke run)")
        return 0
    batch = make_batch(args.batch, 100, 14, 2048, 20572, args.device)
    targets = torch.rand(args.batch, 3129, device=args.device)
    variants = [("sdpa", "sdpa", False), ("sdpa packed", "sdpa", True)]
    if args.device == "cuda":
        variants += [("triton", "triton", False), ("triton packed", "triton", True)]
    times = {}
    for name, backend, packed in variants:
        torch.manual_seed(0)
        model = build_model("mcan_small", 20572, 3129, packed_attention=packed)
        model = model.to(args.device).train()
        times[name] = step_time(model, batch, targets, backend, args.repeats, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"MCAN-small training step, batch {args.batch}, 100 regions, 14 tokens, {name}")
    for name, t in times.items():
        print(f"  {name:>13}: {t * 1e3:8.2f} ms  ({times['sdpa'] / t:.2f}x sdpa)")
    if "triton" in times:
        best = min(times["triton"], times["triton packed"])
        speedup = times["sdpa"] / best
        print(f"  speed-up of triton (best layout) over sdpa: {speedup:.2f}x (target >= 1.15x: "
              f"{'met' if speedup >= 1.15 else 'missed'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
