"""Benchmark one decoder layer's attention (projections, RoPE, attention) forward + backward: dense masks vs none.

"dense" is the attention of the decoder before document runs existed, re-implemented here as the baseline: plain
rows ran ``F.scaled_dot_product_attention(is_causal=True)`` on repeated kv heads, packed rows built a
``[B, S, S]`` bool mask ``same_document & kv_pos <= q_pos`` for SDPA. "runs" is
:class:`mimo_titan.models.decoder.Attention` as it is now (``is_causal`` with ``enable_gqa``; packed rows as
causal SDPA calls per group of equally long documents, see :mod:`mimo_titan.models.varlen_attention`).

Every case runs in a fresh subprocess, which reports its peak resident memory (``ru_maxrss``, after
``import torch`` and building the inputs: ``base``; at the end: ``peak``) and the wall time of one forward +
backward after a warm-up pass (the packed path's plan is cached across the two passes, as across the layers of
one forward; ``plan_ms`` is its one-off cost). Run on CPU (or CUDA when ``--device cuda``, where the memory column
is ``torch.cuda.max_memory_allocated``).

Usage::

    python scripts/bench_attention.py --seq-lens 8192 32768 --docs 8
    python scripts/bench_attention.py --seq-lens 32768 --impls runs   # skip the O(S^2) baseline
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _doc_lengths(seq_len: int, docs: int) -> list[int]:
    """``docs`` unequal document lengths summing to ``seq_len`` (weights 3, 1, 4, 1, 5, 9, 2, 6, ...)."""
    weights = [(3, 1, 4, 1, 5, 9, 2, 6)[i % 8] for i in range(docs)]
    lengths = [max(1, seq_len * w // sum(weights)) for w in weights]
    lengths[-1] += seq_len - sum(lengths)
    return lengths


def _case(impl: str, layout: str, seq_len: int, args: argparse.Namespace) -> dict:
    """Run one case in this process; returns its measurements."""
    import torch
    import torch.nn.functional as F

    from mimo_titan.config import LanguageModelConfig
    from mimo_titan.models.decoder import Attention, rope_cos_sin

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    hidden = args.heads * args.head_dim
    cfg = LanguageModelConfig(
        vocab_size=8,
        hidden_size=hidden,
        intermediate_size=8,
        num_layers=1,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
    )
    attn = Attention(cfg).to(dev)
    x = torch.randn(1, seq_len, hidden, device=dev, requires_grad=True)
    if layout == "plain":
        pos, doc = torch.arange(seq_len, device=dev), None
    else:
        lengths = _doc_lengths(seq_len, args.docs)
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(dev)
        doc = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]).unsqueeze(0).to(dev)
    cos, sin = rope_cos_sin(pos, args.head_dim, cfg.rope_theta, x.dtype)

    if impl == "dense":

        def dense(q, k, v, positions, doc_ids):
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if doc_ids is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            same_doc = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)  # [B, S, S]
            causal = positions.unsqueeze(-1) >= positions.unsqueeze(-2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(same_doc & causal).unsqueeze(1))

        attn.attn_fn = dense

    def step() -> None:
        out = attn(x, cos, sin, pos if doc is not None else None, doc)
        out.sum().backward()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    plan_ms = 0.0
    if impl == "runs" and doc is not None:
        from mimo_titan.models.varlen_attention import build_plan

        t0 = time.perf_counter()
        build_plan(pos, pos, doc, doc, device=dev)
        sync()
        plan_ms = (time.perf_counter() - t0) * 1e3
    step()  # warm-up (and the cached plan)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "impl": impl,
        "layout": layout,
        "seq_len": seq_len,
        "fwd_bwd_s": round(seconds, 3),
        "plan_ms": round(plan_ms, 1),
        "base_mb": round(base_mb),
        "peak_mb": round(peak_mb),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--impls", nargs="+", default=["dense", "runs"], choices=["dense", "runs"])
    p.add_argument("--layouts", nargs="+", default=["plain", "packed"], choices=["plain", "packed"])
    p.add_argument("--docs", type=int, default=8, help="documents per packed row")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads per case")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mem-limit-gb", type=float, default=0, help="address-space limit per case (0: none)")
    p.add_argument("--case", nargs=3, metavar=("IMPL", "LAYOUT", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        if args.mem_limit_gb > 0:
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(_case(args.case[0], args.case[1], int(args.case[2]), args)))
        return
    print(f"{'S':>6} {'layout':>7} {'impl':>6} {'fwd+bwd s':>10} {'plan ms':>8} {'base MB':>8} {'peak MB':>8}")
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for seq_len in args.seq_lens:
        for layout in args.layouts:
            for impl in args.impls:
                cmd = [sys.executable, __file__, *passthrough, "--case", impl, layout, str(seq_len)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
                    print(f"{seq_len:>6} {layout:>7} {impl:>6} failed: {why}", flush=True)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(
                    f"{seq_len:>6} {layout:>7} {impl:>6} {r['fwd_bwd_s']:>10.3f} {r['plan_ms']:>8.1f} "
                    f"{r['base_mb']:>8} {r['peak_mb']:>8}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
