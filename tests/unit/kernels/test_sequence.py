"""lm_cross_entropy against F.cross_entropy on reshaped logits; ctc against F.ctc_loss and a float64 recursion."""

from __future__ import annotations

import ctypes
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, assert_merge_exact, tol
from lossd.kernels import Accumulator, InvalidInput, evaluate


def lm(tensors, **params):
    out = evaluate(tensors, [{"name": "lm_cross_entropy", "params": params}])
    return out["lm_cross_entropy"], out


def codes(out):
    return [d.code for d in out.diagnostics]


def lm_batch(b, t, v, dtype=torch.float64, pad=0.0, scale=3.0):
    z = (torch.randn(b, t, v, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(0, v, (b, t))
    y[torch.rand(b, t) < pad] = -100
    return z, y


def torch_lm(z, y, shift=True, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """The oracle: F.cross_entropy on the shifted, reshaped logits (this copies them; lossd must not)."""
    v = z.shape[-1]
    if shift:
        z, y = z[:, :-1], y[:, 1:]
    return F.cross_entropy(
        z.double().reshape(-1, v), y.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )


def sequence_mean(z, y, shift=True, ignore_index=-100, label_smoothing=0.0):
    """Mean over sequences of each sequence's token mean, sequences without a valid token skipped."""
    per_token = torch_lm(z, y, shift, ignore_index, label_smoothing, reduction="none").reshape(z.shape[0], -1)
    valid = (y[:, 1:] if shift else y) != ignore_index
    counts = valid.sum(1)
    keep = counts > 0
    return ((per_token * valid).sum(1)[keep] / counts[keep]).mean().item(), int(keep.sum())


# -- lm_cross_entropy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2, 1), (1, 2, 3), (3, 7, 11), (2, 5, 257)])
@pytest.mark.parametrize("shift", [True, False])
def test_token_normalization_matches_torch(dtype, shape, shift):
    z, y = lm_batch(*shape, dtype=dtype, pad=0.2)
    y[0, -1] = 1 % shape[2]  # at least one valid token
    r, _ = lm({"logits": z, "labels": y}, shift=shift)
    assert_close(r.value, torch_lm(z, y, shift).item(), **tol(dtype))
    valid = int(((y[:, 1:] if shift else y) != -100).sum())
    assert (r.values["tokens"], r.denominator, r.denominator_kind) == (valid, valid, "valid_tokens")
    assert_close(r.values["perplexity"], math.exp(torch_lm(z, y, shift).item()), **tol(dtype))


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_ignore_index_and_label_smoothing(shift, smoothing, ignore_index):
    z, y = lm_batch(4, 9, 13, pad=0.3)
    y[y == -100] = ignore_index
    r, _ = lm({"logits": z, "labels": y}, shift=shift, label_smoothing=smoothing, ignore_index=ignore_index)
    assert_close(r.value, torch_lm(z, y, shift, ignore_index, smoothing).item(), rtol=1e-12)
    # perplexity is exp of the unsmoothed token NLL whatever the smoothing
    assert_close(r.values["perplexity"], math.exp(torch_lm(z, y, shift, ignore_index).item()), rtol=1e-12)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_sequence_normalization(shift, smoothing):
    z, y = lm_batch(5, 8, 7, pad=0.4)
    y[2] = -100  # an empty sequence, skipped and reported
    r, out = lm({"logits": z, "labels": y}, shift=shift, normalization="sequence", label_smoothing=smoothing)
    ref, kept = sequence_mean(z, y, shift, label_smoothing=smoothing)
    assert_close(r.value, ref, rtol=1e-12)
    assert (r.denominator, r.denominator_kind, r.values["sequences"]) == (kept, "sequences", kept)
    assert "empty_sequences" in codes(out)
    assert "1 of 5 sequences" in next(d.message for d in out.diagnostics if d.code == "empty_sequences")


def test_sequence_and_token_means_differ_as_they_should():
    z, _ = lm_batch(2, 6, 5, scale=1.0)
    y = torch.tensor([[1, 2, 3, 4, 0, 1], [1, 2, -100, -100, -100, -100]])
    token, _ = lm({"logits": z, "labels": y}, shift=False)
    seq, out = lm({"logits": z, "labels": y}, shift=False, normalization="sequence")
    per = F.cross_entropy(z.reshape(-1, 5), y.reshape(-1), reduction="none").reshape(2, 6)
    assert_close(token.value, (per.sum() / 8).item(), rtol=1e-12)
    assert_close(seq.value, ((per[0].mean() + per[1, :2].mean()) / 2).item(), rtol=1e-12)
    assert out.diagnostics == []


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_all_ignored_is_nan_with_denominator_zero(normalization):
    z, _ = lm_batch(2, 4, 5)
    r, out = lm({"logits": z, "labels": torch.full((2, 4), -100)}, normalization=normalization)
    assert math.isnan(r.value) and math.isnan(r.values["perplexity"]) and r.denominator == 0
    assert "all_ignored" in codes(out)
    r, out = lm({"logits": z[:, :1], "labels": torch.zeros(2, 1, dtype=torch.int64)})  # T = 1 with shift: nothing to predict
    assert math.isnan(r.value) and "all_ignored" in codes(out)


def test_shift_never_reads_the_first_label():
    z, y = lm_batch(2, 5, 6)
    y[:, 0] = 99  # out of range, but labels[:, 0] is never a target under shift
    r, _ = lm({"logits": z, "labels": y})
    assert_close(r.value, torch_lm(z, y).item(), rtol=1e-12)
    with pytest.raises(InvalidInput, match="got 99 at flat index 0") as info:
        lm({"logits": z, "labels": y}, shift=False)
    assert info.value.violations[0].field == "tensors.labels"
    y[1, 3] = 6
    with pytest.raises(InvalidInput, match="got 6 at flat index 8"):  # the index is the label's own position
        lm({"logits": z, "labels": y})


def test_extreme_and_low_precision_logits():
    z = torch.zeros(1, 3, 4)
    z[0, 0, 1], z[0, 1, 2] = 1e4, -1e4
    y = torch.tensor([[0, 1, 2]])
    r, _ = lm({"logits": z, "labels": y})
    assert_close(r.value, torch_lm(z, y).item(), rtol=1e-6)
    zh = (torch.randn(2, 6, 50) * 8).to(torch.bfloat16)
    yh = torch.randint(0, 50, (2, 6))
    r, _ = lm({"logits": zh, "labels": yh})
    assert_close(r.value, torch_lm(zh, yh).item(), **tol(torch.bfloat16))


@pytest.mark.parametrize(
    "params",
    [{}, {"normalization": "sequence"}, {"label_smoothing": 0.1, "shift": False}, {"normalization": "sequence", "ignore_index": 3}],
)
def test_merge_over_batches_split_on_b(params):
    z, y = lm_batch(23, 6, 9, dtype=torch.float32, pad=0.3)
    y[4] = -100
    y[y == -100] = params.get("ignore_index", -100)
    assert_merge_exact({"logits": z, "labels": y}, {"name": "lm_cross_entropy", "params": params}, parts=5)


def test_shared_row_statistics_with_tiny_blocks(monkeypatch):
    """The logsumexp pass runs a few tokens at a time; the loss is unchanged."""
    from lossd.kernels import chunks

    z, y = lm_batch(3, 10, 17, pad=0.2)
    whole, _ = lm({"logits": z, "labels": y})
    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 40)  # two rows of 17 per block
    blocked, _ = lm({"logits": z, "labels": y})
    assert_close(blocked.value, whole.value, rtol=1e-13)
    assert_close(blocked.value, torch_lm(z, y).item(), rtol=1e-12)


def _status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _release_free_memory_and_reset_peak():
    """Hand freed heap pages back (glibc malloc_trim) and set the peak RSS to the current RSS; skip where impossible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot measure the peak RSS here: {exc}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_evaluation_never_copies_the_logits(monkeypatch, dtype):
    """[2, 64, 32768] logits (16 MiB in float32) in 256 KiB blocks: the peak RSS grows by well under one copy.

    Freed heap pages are returned to the kernel first, so a temporary that
    reuses them still shows up as RSS growth.  Half-precision logits are
    upcast one block at a time, never as a whole."""
    from lossd.kernels import chunks, row_stats

    monkeypatch.setattr(chunks, "CHUNK_ELEMENTS", 1 << 16)
    # The row pass's cache blocks too (1M elements by default: their two 4 MiB float32 buffers alone
    # are the whole float16 input here, and whether their pages show depends on the heap earlier tests left).
    monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", 1 << 16)
    monkeypatch.setattr(row_stats, "CACHE_BLOCK_ELEMENTS", 1 << 16)
    specs = [
        "lm_cross_entropy",
        {"name": "lm_cross_entropy", "alias": "seq", "params": {"normalization": "sequence", "label_smoothing": 0.1}},
    ]
    evaluate({"logits": torch.randn(2, 3, 5, dtype=dtype), "labels": torch.randint(0, 5, (2, 3))}, specs)  # warm: code paths, thread pools
    logits = torch.randn(2, 64, 32768, dtype=dtype)
    labels = torch.randint(0, 32768, (2, 64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small blocks: thread hand-offs would dominate on a busy machine
    try:
        # The least of three: a copy of the logits shows every time, while the heap left by
        # thousands of earlier tests in one process can add a one-off page or two.
        extras = []
        for _ in range(3):
            _release_free_memory_and_reset_peak()
            before = _status_kib("VmHWM")
            out = evaluate({"logits": logits, "labels": labels}, specs)
            extras.append((_status_kib("VmHWM") - before) * 1024)
        extra = min(extras)
    finally:
        torch.set_num_threads(threads)
    input_bytes = logits.numel() * logits.element_size()
    assert math.isfinite(out["seq"].value)
    assert extra < 0.5 * input_bytes, f"evaluation grew the peak RSS by {extra / input_bytes:.2f}× the input size"


@pytest.mark.parametrize(
    "tensors, params, field, match",
    [
        ({"logits": torch.randn(4, 3), "labels": torch.zeros(4, dtype=torch.int64)}, {}, "tensors.logits", r"expected shape \[B, T, V\]"),
        (
            {"logits": torch.randn(2, 4, 3), "labels": torch.zeros(2, 5, dtype=torch.int64)},
            {},
            "tensors.labels",
            r"expected shape \[2, 4\]",
        ),
        ({"logits": torch.randn(2, 4, 3), "labels": torch.full((2, 4), 0.5)}, {}, "tensors.labels", "non-integer"),
        (
            {"logits": torch.randn(2, 4, 3), "labels": torch.zeros(2, 4, dtype=torch.int64)},
            {"normalization": "batch"},
            "functions[0].params.normalization",
            "'token', 'sequence'",
        ),
        (
            {"logits": torch.randn(2, 4, 3), "labels": torch.zeros(2, 4, dtype=torch.int64)},
            {"label_smoothing": -0.1},
            "functions[0].params.label_smoothing",
            r"\[0, 1\]",
        ),
        (
            {"logits": torch.randint(0, 3, (2, 4, 3)), "labels": torch.zeros(2, 4, dtype=torch.int64)},
            {},
            "tensors.logits",
            "floating-point",
        ),
    ],
)
def test_lm_errors_name_the_field(tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        lm(tensors, **params)
    assert info.value.violations[0].field == field


# -- ctc -----------------------------------------------------------------------------------------------------------


def ctc_forward(log_probs: np.ndarray, target: list[int], blank: int) -> float:
    """−log p(target | x) by the CTC forward (alpha) recursion in float64, written independently of torch."""
    ext = [blank]
    for c in target:
        ext += [c, blank]
    alpha = np.full(len(ext), -np.inf)
    alpha[0] = log_probs[0, blank]
    if len(ext) > 1:
        alpha[1] = log_probs[0, ext[1]]
    for t in range(1, log_probs.shape[0]):
        new = np.full(len(ext), -np.inf)
        for s, label in enumerate(ext):
            a = alpha[s]
            if s > 0:
                a = np.logaddexp(a, alpha[s - 1])
            if s > 1 and label != blank and label != ext[s - 2]:
                a = np.logaddexp(a, alpha[s - 2])
            new[s] = a + log_probs[t, label]
        alpha = new
    last = alpha[-1] if len(ext) == 1 else np.logaddexp(alpha[-1], alpha[-2])
    return float(-last)


def ctc_batch(t=12, n=4, c=6, s=5, blank=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(torch.randn(t, n, c, dtype=torch.float64, generator=g) * 2, 2).to(dtype)
    labels = [x for x in range(c) if x != blank]
    targets = torch.tensor(labels)[torch.randint(0, len(labels), (n, s), generator=g)]
    target_lengths = torch.randint(1, s + 1, (n,), generator=g)
    input_lengths = torch.randint(t - 3, t + 1, (n,), generator=g)
    return {"log_probs": log_probs, "targets": targets, "input_lengths": input_lengths, "target_lengths": target_lengths}


def ctc(tensors, **params):
    out = evaluate(tensors, [{"name": "ctc", "params": params}])
    r = out["ctc"]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


def test_ctc_torch_agrees_with_the_float64_recursion():
    """F.ctc_loss is the service's engine; this checks it independently on small cases (repeats, blank 2)."""
    batch = ctc_batch(t=7, n=5, c=4, s=3, blank=2)
    batch["targets"][0, :3] = torch.tensor([1, 1, 3])  # a repeat needs a blank between
    got, _ = ctc(batch, blank=2, reduction="none")
    lp = batch["log_probs"].numpy()
    for i in range(5):
        ti, li = int(batch["input_lengths"][i]), int(batch["target_lengths"][i])
        assert_close(got[i], ctc_forward(lp[:ti, i], batch["targets"][i, :li].tolist(), 2), rtol=1e-12, what=f"sample {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ctc_matches_torch(dtype, reduction):
    batch = ctc_batch(dtype=dtype)
    got, out = ctc(batch, reduction=reduction)
    ref = F.ctc_loss(batch["log_probs"].double(), batch["targets"], batch["input_lengths"], batch["target_lengths"], reduction=reduction)
    assert_close(got, ref.numpy(), **tol(dtype))
    if reduction == "mean":
        assert (out["ctc"].denominator, out["ctc"].denominator_kind) == (4, "samples")


def test_ctc_concatenated_targets_blank_and_logits_input():
    batch = ctc_batch(n=5, c=7, blank=6)
    lengths = batch["target_lengths"]
    flat = torch.cat([batch["targets"][i, : int(lengths[i])] for i in range(5)])
    ref = F.ctc_loss(batch["log_probs"], batch["targets"], batch["input_lengths"], lengths, blank=6)
    got, _ = ctc({**batch, "targets": flat}, blank=6)
    assert_close(got, ref.item(), rtol=1e-12)
    logits = batch["log_probs"] * 1.0 + 5.0  # unnormalized: log-softmax restores the log-probabilities
    got, _ = ctc(
        {"logits": logits, "targets": flat, "input_lengths": batch["input_lengths"], "target_lengths": lengths},
        blank=6,
        input_kind="logits",
    )
    assert_close(got, ref.item(), rtol=1e-12)


def test_ctc_infeasible_samples_are_reported_and_zero_infinity():
    batch = ctc_batch(t=6, n=4, c=5, s=4)
    batch["targets"][1] = torch.tensor([1, 1, 1, 1])  # 4 labels + 3 repeats need 7 steps
    batch["target_lengths"] = torch.tensor([2, 4, 4, 3])
    batch["input_lengths"] = torch.tensor([6, 6, 3, 6])
    got, out = ctc(batch, reduction="none")
    assert math.isinf(got[1]) and math.isinf(got[2]) and math.isfinite(got[0])
    message = next(d.message for d in out.diagnostics if d.code == "ctc_infeasible")
    assert "sample indices 1, 2;" in message
    got, out = ctc(batch, zero_infinity=True)
    ref = F.ctc_loss(batch["log_probs"], batch["targets"], batch["input_lengths"], batch["target_lengths"], zero_infinity=True)
    assert_close(got, ref.item(), rtol=1e-12)
    assert "ctc_infeasible" in codes(out)


def test_ctc_empty_target_and_feasible_repeats_are_not_reported():
    batch = ctc_batch(t=7, n=2, c=4, s=3)
    batch["targets"][0] = torch.tensor([2, 2, 3])
    batch["target_lengths"] = torch.tensor([3, 0])
    batch["input_lengths"] = torch.tensor([4, 5])  # 3 labels + 1 repeat fit in 4 steps exactly
    got, out = ctc(batch)
    ref = F.ctc_loss(batch["log_probs"], batch["targets"], batch["input_lengths"], batch["target_lengths"])
    assert_close(got, ref.item(), rtol=1e-12)
    assert "ctc_infeasible" not in codes(out)
    empty = {**batch, "targets": torch.zeros(2, 0, dtype=torch.int64), "target_lengths": torch.tensor([0, 0])}  # S = 0: blanks only
    got, _ = ctc(empty, reduction="none")
    assert_close(
        got,
        F.ctc_loss(batch["log_probs"], empty["targets"], batch["input_lengths"], empty["target_lengths"], reduction="none").numpy(),
        rtol=1e-12,
    )


def test_ctc_merges_over_batches_split_on_n():
    batch = ctc_batch(n=9)
    whole, _ = ctc(batch)
    acc = Accumulator(["ctc"])
    for part in (slice(0, 2), slice(2, 7), slice(7, 9)):
        acc.add({"log_probs": batch["log_probs"][:, part], **{k: batch[k][part] for k in ("targets", "input_lengths", "target_lengths")}})
    assert_close(acc.result()["ctc"].value, whole, rtol=1e-12)


_CTC = ctc_batch(t=5, n=2, c=4, s=3)


@pytest.mark.parametrize(
    "change, params, field, match",
    [
        ({"targets": torch.tensor([[1, 0, 2], [1, 2, 3]])}, {}, "tensors.targets", "other than blank=0"),
        ({"targets": torch.tensor([[1, 4, 2], [1, 2, 3]])}, {}, "tensors.targets", r"in \[0, 4\)"),
        ({"input_lengths": torch.tensor([6, 2])}, {}, "tensors.input_lengths", "at most 5"),
        ({"target_lengths": torch.tensor([4, 1])}, {}, "tensors.target_lengths", "at most 3"),
        ({"target_lengths": torch.tensor([-1, 1])}, {}, "tensors.target_lengths", "non-negative"),
        ({"input_lengths": torch.tensor([5, 5, 5])}, {}, "tensors.input_lengths", r"expected shape \[2\]"),
        ({"targets": torch.tensor([1, 2, 3])}, {}, "tensors.targets", "Σ target_lengths"),
        ({"log_probs": torch.randn(5, 4)}, {}, "tensors.log_probs", r"\[T, N, C\]"),
        ({}, {"blank": 4}, "functions[0].params.blank", r"\[0, 4\)"),
        ({}, {"input_kind": "logits"}, "tensors.logits", "set input_kind='log_probs'"),
    ],
)
def test_ctc_errors_name_the_field(change, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        ctc({**_CTC, "target_lengths": torch.tensor([3, 2]), **change}, **params)
    assert info.value.violations[0].field == field
