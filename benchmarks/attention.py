"""torch SDPA vs explicit batched matmuls for the attention shapes of table denoisers.

`fastmdm.models.layers.attend` picks between the two from this measurement: run it on a
device, and if the winner differs from the rule in `attend`'s docstring, change the rule.
Shapes: N rows x 4 heads x head width 12 (the default d_model=48), L columns:
- bidirectional training: L queries x L keys, no mask, with backward;
- causal training: 2L+1 queries (content + query streams) x L+1 keys, masked, with backward;
- causal decoding step: 2 queries x L+2 cached keys, a mask per row, no autograd.
Medians of 7 runs; ratio = explicit / SDPA time (below 1: explicit is faster).

    python benchmarks/attention.py [--device cuda] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPORT = Path(__file__).resolve().parent / "results" / "attention.md"


def explicit(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q, k, v, allowed):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def median_ms(fn, shapes, allowed, backward, device, repeats=7):
    times = []
    for _ in range(repeats):
        q, k, v = (torch.randn(s, device=device, requires_grad=backward) for s in shapes)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = fn(q, k, v, allowed)
            if backward:
                out.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    heads, width = 4, 12
    lines = ["# Attention: torch SDPA vs explicit batched matmuls", "",
             f"`python benchmarks/attention.py` on {args.device} ({args.threads} torch thread(s), load average "
             f"{os.getloadavg()[0]:.1f} at the start: single cells are noisy, compare the ratios). {args.rows:,} rows, "
             f"{heads} heads of width {width}; median of 7 runs each.", "",
             "| case | L | SDPA (ms) | explicit (ms) | explicit / SDPA |", "|---|---|---|---|---|"]
    print("\n".join(lines))
    for length in (15, 60):
        slots = torch.arange(length + 2, device=device)
        sees = torch.cat([torch.arange(1, length + 2), torch.arange(length)]).to(device)
        cases = [
            ("bidirectional training", (length, length), None, True),
            ("causal training", (2 * length + 1, length + 1), (slots[:length + 1] <= sees[:, None])[None, None], True),
            # decoding masks differ per row (each row has its own prefix length): [N, 1, 2, L+2]
            ("causal decoding step", (2, length + 2),
             (slots <= torch.randint(0, length + 1, (args.rows, 1, 2, 1), device=device)), False),
        ]
        for name, (queries, keys), allowed, backward in cases:
            shapes = [(args.rows, heads, queries, width), (args.rows, heads, keys, width), (args.rows, heads, keys, width)]
            a = median_ms(sdpa, shapes, allowed, backward, device)
            b = median_ms(explicit, shapes, allowed, backward, device)
            lines.append(f"| {name} | {length} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
            print(lines[-1], flush=True)
    REPORT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
