"""lossd.kernels in process vs torch, in the same run: where the compute time goes.

Prints medians and their ratio to a torch baseline measured in the same run:

1. ``cross_entropy`` alone on [N, K] logits (float32, bfloat16) vs
   ``F.cross_entropy`` on the same tensor, with the share of the shared row
   statistics, the finiteness check and the score-kind diagnostics;
2. cross_entropy + accuracy + ece + entropy of the same logits in ONE request
   (the row statistics are shared) vs the torch equivalents computed one by one,
   and vs four separate lossd requests;
3. ``lm_cross_entropy`` on [B, T, V] vs ``F.cross_entropy`` on the shifted,
   reshaped logits;
4. the cost of the finiteness check and of the score-kind diagnostics on
   logits, log-probabilities and probabilities sent as "logits".

The machine's load average is printed beside each table: medians taken on a
loaded machine are noisy, so compare ratios within one run only.

Usage: python bench/bench_kernels.py [--repeats 7] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import median_seconds, report  # noqa: E402

from lossd.kernels import evaluate, input_diagnostics, row_stats, view  # noqa: E402
from lossd.kernels.evaluate import prepare  # noqa: E402
from lossd.kernels.tensor_names import names_read  # noqa: E402

__all__ = ["main"]

SIZES = ((4096, 1024), (512, 32768), (64, 128256))
QUICK_SIZES = ((4096, 1024),)
ECE_BINS = 15


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def logits_and_labels(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, k, generator=g) * 2).to(dtype)
    return z, torch.randint(0, k, (n,), generator=g)


def torch_ece(z: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """Top-1 ECE with equal-width bins, the way a training script computes it."""
    conf, pred = torch.softmax(z.float(), 1).max(1)
    correct = (pred == y).float()
    idx = torch.clamp((conf * bins).long(), max=bins - 1)
    count = torch.bincount(idx, minlength=bins).float()
    gap = torch.bincount(idx, weights=conf - correct, minlength=bins).abs()
    return gap.sum() / count.sum()


def torch_entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z.float(), 1)
    return -(lp.exp() * lp).sum(1).mean()


def cross_entropy_alone(sizes: tuple[tuple[int, int], ...], repeats: int) -> None:
    for n, k in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            z, y = logits_and_labels(n, k, dtype)
            nbytes = z.numel() * z.element_size()
            tensors = {"logits": z, "labels": y}
            base = median_seconds(lambda z=z, y=y: F.cross_entropy(z, y), repeats=repeats)
            rows: list[tuple[str, float, float | None]] = [("torch F.cross_entropy (baseline)", base, nbytes)]
            if dtype != torch.float32:
                rows.append(
                    (
                        "torch F.cross_entropy(z.float())",
                        median_seconds(lambda z=z, y=y: F.cross_entropy(z.float(), y), repeats=repeats),
                        nbytes,
                    )
                )
            rows += [
                (
                    "lossd evaluate(cross_entropy)",
                    median_seconds(lambda t=tensors: evaluate(t, ["cross_entropy"]), repeats=repeats),
                    nbytes,
                ),
                ("  of which row_statistics", median_seconds(lambda z=z: row_stats.row_statistics(z, 1, False), repeats=repeats), nbytes),
                ("  of which finiteness check", median_seconds(lambda z=z: input_diagnostics.count_nonfinite(z), repeats=repeats), nbytes),
            ]
            dtype_name = str(dtype).replace("torch.", "")
            report(f"cross_entropy [{n}, {k}] {dtype_name} ({load()})", rows, base)


def shared_request(sizes: tuple[tuple[int, int], ...], repeats: int) -> None:
    names = ["cross_entropy", "accuracy", "ece", "entropy"]
    for n, k in sizes:
        z, y = logits_and_labels(n, k, torch.float32)
        nbytes = z.numel() * z.element_size()
        tensors = {"logits": z, "labels": y}
        torch_parts: dict[str, Callable[[], object]] = {
            "cross_entropy": lambda: F.cross_entropy(z, y),
            "accuracy": lambda: (z.argmax(1) == y).float().mean(),
            "ece": lambda: torch_ece(z, y),
            "entropy": lambda: torch_entropy(z),
        }
        timed = {name: median_seconds(fn, repeats=repeats) for name, fn in torch_parts.items()}
        base = sum(timed.values())
        rows: list[tuple[str, float, float | None]] = [("torch, 4 functions one by one (baseline)", base, nbytes)]
        rows += [(f"  torch {name}", seconds, nbytes) for name, seconds in timed.items()]
        rows.append(("lossd ONE request, 4 functions", median_seconds(lambda: evaluate(tensors, names), repeats=repeats), nbytes))
        # Each alone gets only the tensors it reads (entropy reads no labels; an unread tensor is refused).
        alone = {name: {k: t for k, t in tensors.items() if k in names_read(prepare([name]))} for name in names}
        separate = [median_seconds(lambda name=name: evaluate(alone[name], [name]), repeats=repeats) for name in names]
        rows.append(("lossd 4 separate requests", sum(separate), nbytes))
        rows += [(f"  lossd {name} alone", seconds, nbytes) for name, seconds in zip(names, separate, strict=True)]
        report(f"cross_entropy + accuracy + ece + entropy [{n}, {k}] float32 ({load()})", rows, base)


def lm_request(shape: tuple[int, int, int], repeats: int) -> None:
    b, t, v = shape
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        z = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
        y = torch.randint(0, v, (b, t), generator=g)
        nbytes = z.numel() * z.element_size()
        base = median_seconds(lambda z=z, y=y: F.cross_entropy(z[:, :-1].reshape(-1, v), y[:, 1:].reshape(-1)), repeats=repeats)
        rows: list[tuple[str, float, float | None]] = [
            ("torch F.cross_entropy(z[:, :-1], y[:, 1:]) (baseline)", base, nbytes),
            (
                "lossd evaluate(lm_cross_entropy)",
                median_seconds(lambda z=z, y=y: evaluate({"logits": z, "labels": y}, ["lm_cross_entropy"]), repeats=repeats),
                nbytes,
            ),
        ]
        dtype_name = str(dtype).replace("torch.", "")
        report(f"lm_cross_entropy [{b}, {t}, {v}] {dtype_name} ({load()})", rows, base)


def checks(n: int, k: int, repeats: int) -> None:
    """What the finiteness check and the score-kind diagnostics add to a cross_entropy request."""
    z, y = logits_and_labels(n, k, torch.float32)
    nbytes = z.numel() * z.element_size()
    kinds = {
        "logits": z,
        "log-probs sent as logits": torch.log_softmax(z, 1),
        "probs sent as logits": torch.softmax(z, 1),
    }
    base = median_seconds(lambda: F.cross_entropy(z, y), repeats=repeats)
    rows: list[tuple[str, float, float | None]] = [("torch F.cross_entropy on logits (baseline)", base, nbytes)]
    for kind, scores in kinds.items():
        tensors = {"logits": scores, "labels": y}
        full = median_seconds(lambda t=tensors: evaluate(t, ["cross_entropy"]), repeats=repeats)
        # Each check switched off where the kernels call it (module globals of input_diagnostics and view).
        real_check, real_diagnose = input_diagnostics.count_nonfinite, view.diagnose_score_kind
        try:
            input_diagnostics.count_nonfinite = lambda t: (0, False)
            no_check = median_seconds(lambda t=tensors: evaluate(t, ["cross_entropy"]), repeats=repeats)
            view.diagnose_score_kind = lambda *args: None
            neither = median_seconds(lambda t=tensors: evaluate(t, ["cross_entropy"]), repeats=repeats)
        finally:
            input_diagnostics.count_nonfinite, view.diagnose_score_kind = real_check, real_diagnose
        rows += [
            (f"{kind}: evaluate(cross_entropy)", full, nbytes),
            (f"{kind}:   without the finiteness check", no_check, nbytes),
            (f"{kind}:   without it and the score-kind check", neither, nbytes),
        ]
    report(f"finiteness check and score-kind diagnostics [{n}, {k}] float32 ({load()})", rows, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="only [4096, 1024] and a smaller LM batch")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK_SIZES if args.quick else SIZES
    print(f"torch {torch.__version__}; {load()}")
    cross_entropy_alone(sizes, args.repeats)
    shared_request(sizes[:1], args.repeats)
    lm_request((2, 128, 32000) if args.quick else (2, 512, 32000), args.repeats)
    checks(*sizes[0], args.repeats)


if __name__ == "__main__":
    main()
