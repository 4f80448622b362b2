"""Peak memory and time of lm_cross_entropy on LLM-sized logits, against in-process torch.

    python bench/bench_lm_memory.py                      # [4, 512, 128256] float32 (1 GiB of logits)
    python bench/bench_lm_memory.py --batch 2 --seq 128 --vocab 32768 --repeats 5

Each measurement runs in a fresh child process, so that one measurement's
peak cannot hide another's: the child records its resident set size (RSS)
before allocating the logits, allocates them, resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``; ``ru_maxrss`` when that is not allowed),
evaluates, and reads the peak.  It prints

- peak / input: (peak RSS − RSS before the input) / input bytes; the input
  itself counts 1.0, so 1.0 + the extra memory of the evaluation (the target
  is < 1.5);
- the same for torch ``F.cross_entropy`` on ``logits[:, :-1].reshape(-1, V)``,
  which copies and log-softmaxes the logits;
- the median time of each over ``--repeats`` runs and their ratio.

Linux only (it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

__all__ = ["main"]


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib(reset: bool) -> int:
    return _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _inputs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(args.batch, args.seq, args.vocab, generator=g, dtype=torch.float32).mul_(3).to(dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels[:, -args.seq // 8 :] = -100  # some padding
    return logits, labels


def _lossd(logits, labels):  # type: ignore[no-untyped-def]
    from lossd.kernels import evaluate

    return evaluate({"logits": logits, "labels": labels}, ["lm_cross_entropy"])["lm_cross_entropy"].value


def _torch(logits, labels):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    v = logits.shape[-1]
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1), ignore_index=-100))


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    tiny = (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)))
    _lossd(*tiny), _torch(*tiny)  # imports, registry and thread pools before the baseline
    before = _status_kib("VmRSS")
    logits, labels = _inputs(args)
    input_bytes = logits.numel() * logits.element_size()
    after_input = _status_kib("VmRSS")
    reset = _reset_peak()
    fn = _lossd if args.child == "lossd" else _torch
    value = fn(logits, labels)
    peak = _peak_kib(reset)
    out = {
        "value": value,
        "input_mib": input_bytes / 2**20,
        "peak_ratio": (peak - before) * 1024 / input_bytes,
        "extra_ratio": (peak - after_input) * 1024 / input_bytes,
        "peak_reset": reset,
    }
    if args.repeats:
        times = {}
        for name, f in (("lossd", _lossd), ("torch", _torch)):
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                f(logits, labels)
                runs.append(time.perf_counter() - t0)
            times[name] = statistics.median(runs)
        out["times"] = times
    print(json.dumps(out))


def _run_child(args: argparse.Namespace, which: str, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--repeats", str(repeats)]
    cmd += [
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--limit", type=float, default=1.5, help="fail (exit 1) when lossd's peak / input exceeds this")
    parser.add_argument("--child", choices=("lossd", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    ours = _run_child(args, "lossd", args.repeats)
    ref = _run_child(args, "torch", 0)
    shape = f"[{args.batch}, {args.seq}, {args.vocab}] {args.dtype}"
    print(f"lm_cross_entropy on {shape} ({ours['input_mib']:.0f} MiB of logits)")
    print(f"  value              lossd {ours['value']:.6f}   torch {ref['value']:.6f}")
    print(f"  peak / input size  lossd {ours['peak_ratio']:.3f}   torch F.cross_entropy {ref['peak_ratio']:.3f}   (limit {args.limit})")
    print(f"  extra / input size lossd {ours['extra_ratio']:.3f}   torch F.cross_entropy {ref['extra_ratio']:.3f}")
    if not ours["peak_reset"]:
        print("  (peak from ru_maxrss: /proc/self/clear_refs was not writable)")
    if "times" in ours:
        t = ours["times"]
        print(
            f"  median time        lossd {t['lossd'] * 1e3:.1f} ms   torch {t['torch'] * 1e3:.1f} ms   lossd/torch {t['lossd'] / t['torch']:.2f}"
        )
    return 0 if ours["peak_ratio"] < args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
