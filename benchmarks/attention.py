"""Attention benchmark at VL shapes: our Triton kernel vs torch SDPA vs FlexAttention (GPU).

    python benchmarks/attention.py            # full table (needs a CUDA GPU)
    python benchmarks/attention.py --quick    # fewer shapes
    python benchmarks/attention.py --launch   # the launch overhead section only

Batch 128, 12 heads, head dim 64, (Lq, Lk) in {(20, 36), (36, 36), (40, 145), (50, 577),
(577, 577)}; keys padded per sequence (30% on average); 0 / 50 / 75% of (batch, head) pairs
dead. Every backend gets the equivalent mask: SDPA a boolean mask plus the head mask applied to
its output, FlexAttention a ``create_block_mask`` over padding and dead heads. Prints times,
ratios against SDPA and FlexAttention (one run, same process) and TFLOP/s counting only live
work and all work. Starts with a correctness check against the torch reference. A second table
times training (forward + backward with attention dropout 0.1) against SDPA with the same
dropout (FlexAttention has none); target: ours <= 0.8x SDPA at 30% padding. A third table
compares self-attention over ragged sequences kept padded (queries and keys 30% padding) with
the same sequences packed (``flash_attention_varlen``: no padded query or key computed).

Launch overhead (last; alone with ``--launch``): batch 128 x 12 heads x short sequences (Lq = Lk
= 20 and 36, D 64, 30% key padding), forward only, dropout 0 with a fixed seed tensor. Times
per call: our kernel eager and replayed from a CUDA graph (captured after a warm-up, static
inputs), and SDPA eager, each by ``do_bench`` (one call after an L2 flush: the flush lets the
host run ahead, so this is mostly device time) and back to back (1,000 calls between two
events: what a model's stream of attention calls sees when the host is the bottleneck), plus
the host time of one call (``time.perf_counter`` over 1,000 calls, no synchronisation: the
Python launcher's cost). Ends with a verdict: does graph replay beat eager by more than 10%?
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vlcompress.kernels.reference import attention_reference

SHAPES = [(20, 36), (36, 36), (40, 145), (50, 577), (577, 577)]
DEAD = [0.0, 0.5, 0.75]
LAUNCH_SHAPES = [(20, 20), (36, 36)]
LAUNCH_CALLS = 1000


def make_inputs(b, h, lq, lk, d, dead, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (
        torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for n in (lq, lk, lk)
    )
    # ~30% of keys padded on average: lengths uniform in [0.4, 1.0] * Lk.
    lengths = (lk * (0.4 + 0.6 * torch.rand(b, device="cuda", generator=g))).long().clamp(min=1)
    kpm = torch.arange(lk, device="cuda")[None, :] < lengths[:, None]
    live = torch.rand(b, h, device="cuda", generator=g) >= dead
    return q, k, v, kpm, live, lengths


def flops(b, h, lq, lk, d, live, lengths):
    """Forward FLOPs (2 matmuls) counting all work and only live work (live heads, real keys)."""
    all_work = 4.0 * b * h * lq * lk * d
    live_work = 4.0 * lq * d * float((live.sum(1) * lengths).sum())
    return all_work, live_work


def backends(q, k, v, kpm, live, hm, attn_mask, flex, block_mask):
    """The three implementations, each with the equivalent mask."""
    from vlcompress.kernels.flash_attention import flash_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {
        "ours": lambda: flash_attention(q, k, v, kpm, live),
        "sdpa": lambda: sdpa(q, k, v, attn_mask=attn_mask) * hm,
        "flex": lambda: flex(q, k, v, block_mask=block_mask),
    }


def bench(fn, backward: bool) -> float:
    from triton.testing import do_bench

    if not backward:
        return do_bench(lambda: fn(), warmup=10, rep=50)
    out = fn()
    grad = torch.randn_like(out)

    def step():
        o = fn()
        o.backward(grad)

    return do_bench(step, warmup=10, rep=50, grad_to_none=None)


def back_to_back_ms(fn, calls: int = LAUNCH_CALLS) -> float:
    """Milliseconds per call of ``calls`` calls issued back to back between two CUDA events
    (the larger of the host's launch time and the device's run time)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def host_us(fn, calls: int = LAUNCH_CALLS) -> float:
    """Microseconds of host time per call over ``calls`` calls, never waiting for the device
    (after one synchronisation; a device slower than the host shows up once its launch queue
    is full)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def captured(fn):
    """``fn`` (no arguments, static inputs) captured in a CUDA graph after a warm-up on a side
    stream (Triton compilation, the launch-configuration tuner and the launcher's caches run
    outside the capture): the graph's replay and the output of the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def launch_overhead(dtype: torch.dtype) -> bool:
    """The launch overhead table and verdict (see the module docstring); True when every
    graph replay reproduced the eager output."""
    from triton.testing import do_bench

    from vlcompress.kernels.flash_attention import flash_attention

    sdpa = torch.nn.functional.scaled_dot_product_attention
    b, h, d = 128, 12, 64
    print()
    print(f"launch overhead: batch {b} x {h} heads, D {d}, forward only, dropout 0 (fixed seed)")
    header = (
        f"{'Lq':>4} {'Lk':>4} | {'do_bench ms':^26} | {'back-to-back ms/call':^26} | "
        f"{'host us/call':^20} | {'graph/eager':>11}"
    )
    sub = (
        f"{'':>4} {'':>4} | {'ours':>8} {'graph':>8} {'sdpa':>8} | {'ours':>8} {'graph':>8} "
        f"{'sdpa':>8} | {'ours':>6} {'graph':>6} {'sdpa':>6} | {'b2b':>5} {'bench':>5}"
    )
    print(header)
    print(sub)
    print("-" * len(sub))
    ok, ratios = True, []
    for lq, lk in LAUNCH_SHAPES:
        q, k, v, kpm, _, _ = make_inputs(b, h, lq, lk, d, 0.0, dtype)
        attn_mask = kpm[:, None, None, :]
        seed = torch.tensor([1234], dtype=torch.int64, device="cuda")

        def ours(q=q, k=k, v=v, kpm=kpm, seed=seed):
            return flash_attention(q, k, v, kpm, dropout_p=0.0, seed=seed)

        def theirs(q=q, k=k, v=v, attn_mask=attn_mask):
            return sdpa(q, k, v, attn_mask=attn_mask)

        eager_out = ours()
        replay, graph_out = captured(ours)
        replay()
        torch.cuda.synchronize()
        same = torch.equal(graph_out, eager_out)
        ok &= same
        fns = {"ours": ours, "graph": replay, "sdpa": theirs}
        bench_ms = {name: do_bench(fn, warmup=25, rep=100) for name, fn in fns.items()}
        stream_ms = {name: back_to_back_ms(fn) for name, fn in fns.items()}
        host = {name: host_us(fn) for name, fn in fns.items()}
        b2b, bench_ratio = (
            stream_ms["graph"] / stream_ms["ours"],
            bench_ms["graph"] / bench_ms["ours"],
        )
        ratios.append((b2b, bench_ratio))
        print(
            f"{lq:>4} {lk:>4} | {bench_ms['ours']:>8.4f} {bench_ms['graph']:>8.4f} "
            f"{bench_ms['sdpa']:>8.4f} | {stream_ms['ours']:>8.4f} {stream_ms['graph']:>8.4f} "
            f"{stream_ms['sdpa']:>8.4f} | {host['ours']:>6.1f} {host['graph']:>6.1f} "
            f"{host['sdpa']:>6.1f} | {b2b:>5.2f} {bench_ratio:>5.2f}"
            + ("" if same else "  (graph output differs from eager!)")
        )

    def verdict(rs: list[float]) -> str:
        word = "yes" if all(r < 0.9 for r in rs) else "no"
        return f"{word} ({', '.join(f'{r:.2f}' for r in rs)})"

    print(
        f"verdict: CUDA-graph replay beats eager by more than 10% (graph/eager < 0.90) "
        f"at these shapes: back to back {verdict([r for r, _ in ratios])}, "
        f"do_bench {verdict([r for _, r in ratios])}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--launch", action="store_true", help="the launch overhead section only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU; nothing measured.")
        return 0
    if args.launch:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        print(
            f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}"
        )
        return 0 if launch_overhead(dtype) else 1
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from vlcompress.kernels.flash_attention import flash_attention

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    flex = torch.compile(flex_attention, dynamic=False)
    b, h, d = 128, 12, 64
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")

    # Correctness on the GPU against the fp32 reference, all features at once.
    q, k, v, kpm, live, _ = make_inputs(4, h, 40, 145, d, 0.5, dtype, seed=1)
    for t in (q, k, v):
        t.requires_grad_()
    out = flash_attention(q, k, v, kpm, live)
    ref = attention_reference(q.float(), k.float(), v.float(), kpm, live)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.float())
    errs = [float((out.float() - ref).abs().max())] + [
        float((a.float() - e).abs().max()) for a, e in zip(got, want)
    ]
    ok = all(e < 5e-2 for e in errs)
    print(
        f"correctness vs reference (max abs err out/dq/dk/dv): {', '.join(f'{e:.2e}' for e in errs)} -> {'OK' if ok else 'FAIL'}"
    )

    header = f"{'Lq':>4} {'Lk':>4} {'dead':>5} {'pass':>7} | {'ours ms':>8} {'sdpa ms':>8} {'flex ms':>8} | {'/sdpa':>6} {'/flex':>6} | {'TF/s live':>9} {'TF/s all':>8} | {'/all-live':>9}"
    print(header)
    print("-" * len(header))
    for lq, lk in SHAPES[1:3] if args.quick else SHAPES:
        base_time = {}
        for dead in DEAD:
            q, k, v, kpm, live, lengths = make_inputs(b, h, lq, lk, d, dead, dtype)
            for t in (q, k, v):
                t.requires_grad_()
            hm = live.to(dtype)[:, :, None, None]
            attn_mask = kpm[:, None, None, :]

            def mask_mod(bi, hi, qi, ki, kpm=kpm, live=live):
                return kpm[bi, ki] & live[bi, hi]

            block_mask = create_block_mask(mask_mod, b, h, lq, lk, device="cuda")
            fns = backends(q, k, v, kpm, live, hm, attn_mask, flex, block_mask)
            all_work, live_work = flops(b, h, lq, lk, d, live, lengths)
            for backward in (False, True):
                times = {name: bench(fn, backward) for name, fn in fns.items()}
                mult = 3.5 if backward else 1.0  # backward ~ 2.5x the forward matmul work
                t = times["ours"]
                key = "fwd+bwd" if backward else "fwd"
                base_time.setdefault(key, t)
                print(
                    f"{lq:>4} {lk:>4} {dead:>5.0%} {key:>7} | {t:>8.3f} {times['sdpa']:>8.3f} {times['flex']:>8.3f} | "
                    f"{t / times['sdpa']:>6.2f} {t / times['flex']:>6.2f} | "
                    f"{mult * live_work / t / 1e9:>9.1f} {mult * all_work / t / 1e9:>8.1f} | {t / base_time[key]:>9.2f}"
                )
    print()
    print("training: forward + backward with attention dropout 0.1 (no dead heads)")
    header = f"{'Lq':>4} {'Lk':>4} | {'ours ms':>8} {'sdpa ms':>8} | {'/sdpa':>6} {'<= 0.8':>6}"
    print(header)
    print("-" * len(header))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for lq, lk in SHAPES[1:3] if args.quick else SHAPES:
        q, k, v, kpm, live, _ = make_inputs(b, h, lq, lk, d, 0.0, dtype)
        for t in (q, k, v):
            t.requires_grad_()
        attn_mask = kpm[:, None, None, :]
        ours = bench(lambda: flash_attention(q, k, v, kpm, dropout_p=0.1), True)  # noqa: B023
        theirs = bench(lambda: sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.1), True)  # noqa: B023
        ratio = ours / theirs
        print(f"{lq:>4} {lk:>4} | {ours:>8.3f} {theirs:>8.3f} | {ratio:>6.2f} "
              f"{'yes' if ratio <= 0.8 else 'no':>6}")  # fmt: skip
    print()
    print("self-attention, 30% padding: padded batch vs packed sequences (fwd+bwd, dropout 0.1)")
    header = f"{'L':>4} | {'padded ms':>9} {'packed ms':>9} {'sdpa ms':>8} | {'packed/padded':>13}"
    print(header)
    print("-" * len(header))
    from vlcompress.kernels.flash_attention import flash_attention_varlen
    from vlcompress.kernels.packing import pack

    for length in sorted({lk for _, lk in (SHAPES[1:3] if args.quick else SHAPES)}):
        q, k, v, kpm, _, _ = make_inputs(b, h, length, length, d, 0.0, dtype)
        packed = [pack(x.detach().transpose(1, 2), kpm)[0].requires_grad_() for x in (q, k, v)]
        cu = pack(q.detach().transpose(1, 2), kpm)[1]
        for t in (q, k, v):
            t.requires_grad_()
        attn_mask = kpm[:, None, None, :]
        padded = bench(lambda: flash_attention(q, k, v, kpm, dropout_p=0.1), True)  # noqa: B023
        varlen = bench(
            lambda: flash_attention_varlen(*packed, cu, cu, length, length, dropout_p=0.1),  # noqa: B023
            True,
        )
        theirs = bench(lambda: sdpa(q, k, v, attn_mask=attn_mask, dropout_p=0.1), True)  # noqa: B023
        print(f"{length:>4} | {padded:>9.3f} {varlen:>9.3f} {theirs:>8.3f} | "
              f"{varlen / padded:>13.2f}")  # fmt: skip
    ok &= launch_overhead(dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
