"""Language-model and sequence losses: token cross-entropy over [B, T, V] logits, and CTC.

``lm_cross_entropy`` is built for LLM vocabularies (V = 128256): it never
makes a second tensor of the size of the logits.  The shift (position t
predicts label t + 1) moves the *labels*, not the logits: the per-row
logsumexp comes from the request's shared row statistics over the contiguous
[B·T, V] view, and each position then gathers one score.  The last position
of each sequence, which has no next label, is simply masked out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lossd.kernels.budget import ctc_lattice
from lossd.kernels.declarations import Example, FunctionDef, Output, Result, Role, no_valid_element
from lossd.kernels.dtypes import compute_dtype
from lossd.kernels.examples import Arrays, T, V, log_softmax, normal
from lossd.kernels.params import IGNORE_INDEX, Param
from lossd.kernels.reduce import Terms, mean_loss
from lossd.kernels.state import MergeOp
from lossd.kernels.view import View

__all__ = ["FUNCTIONS", "lm_token_losses", "shifted_labels", "ctc_repeats"]

# Σ over tokens and over sequences: exact under merging for both normalizations,
# provided batches are split along B (a sequence is never cut in two).
LM_FIELDS = {
    "total": MergeOp.SUM,  # Σ loss over valid tokens (label smoothing included)
    "nll": MergeOp.SUM,  # Σ −log p(label) over valid tokens (for perplexity)
    "tokens": MergeOp.SUM,  # number of valid tokens
    "sequence_total": MergeOp.SUM,  # Σ over non-empty sequences of the sequence's token mean
    "sequences": MergeOp.SUM,  # number of sequences with at least one valid token
    "empty_sequences": MergeOp.SUM,  # number of sequences with none
}


def shifted_labels(view: View, labels: torch.Tensor, vocab: int, ignore_index: int, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(target of each position [B, T] with ignored set to 0, valid mask [B, T]).

    With ``shift``, position t is scored against labels[:, t + 1] and the last
    position has no target; labels[:, 0] is never read, so it is not checked."""
    used = labels
    if shift and labels.shape[1]:
        used = labels.clone()
        used[:, 0] = ignore_index
    valid = view.check_labels("labels", used, vocab, ignore_index)
    target = used
    if shift:
        target = torch.roll(used, -1, dims=1)
        valid = torch.roll(valid, -1, dims=1)
        valid[:, -1:] = False
    return torch.where(valid, target, torch.zeros_like(target)), valid


def lm_token_losses(view: View, p: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position (loss, nll, valid) [B, T] of logits [B, T, V] against labels [B, T]; 0 where not valid.

    ``p`` holds ignore_index, shift and label_smoothing (torch's uniform
    smoothing: q_y = 1 − ε + ε/V, ε/V elsewhere)."""
    z = view.scores("logits")
    view.expect_ndim("logits", z, (3,), "[B, T, V]")
    labels = view.index_labels("labels")
    view.expect_shape("labels", labels, z.shape[:2], "[B, T] of logits [B, T, V]")
    vocab, dtype = z.shape[2], compute_dtype(z.dtype)
    target, valid = shifted_labels(view, labels, vocab, p["ignore_index"], p["shift"])
    stats = view.row_stats("logits", 2)
    nll = stats.lse - z.gather(2, target.unsqueeze(2)).squeeze(2).to(dtype)
    eps = p.get("label_smoothing", 0.0)
    # Σ_k (ε/V)(lse − z_k) = ε (lse − Σz / V): the smoothing term needs only the shared row sums.
    loss = (1 - eps) * nll + eps * (stats.lse - stats.sum / vocab) if eps else nll
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(valid, loss, zero), torch.where(valid, nll, zero), valid


def _lm_update(view: View, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    loss, nll, valid = lm_token_losses(view, p)
    per_sequence = loss.to(torch.float64).sum(1)
    counts = valid.sum(1).to(torch.float64)
    nonempty = counts > 0
    return {
        "total": per_sequence.sum().cpu(),
        "nll": nll.to(torch.float64).sum().cpu(),
        "tokens": counts.sum().cpu(),
        "sequence_total": (per_sequence[nonempty] / counts[nonempty]).sum().cpu(),
        "sequences": nonempty.sum().to(torch.float64).cpu(),
        "empty_sequences": (~nonempty).sum().to(torch.float64).cpu(),
    }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num) / float(den) if float(den) else float("nan")


def _lm_finalize(fields: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Result:
    tokens, sequences = float(fields["tokens"]), float(fields["sequences"])
    perplexity = float(torch.exp(torch.tensor(_ratio(fields["nll"], fields["tokens"]), dtype=torch.float64)))
    values = {"perplexity": perplexity, "tokens": tokens, "sequences": sequences}
    if p["normalization"] == "token":
        total = float(fields["total"])
        return Result(
            {"value": _ratio(fields["total"], fields["tokens"]), **values},
            denominator=tokens,
            denominator_kind="valid_tokens",
            numerator=total,
        )
    # Sequence normalization: the mean over sequences of per-sequence means, additive in (Σ means, #sequences).
    sequence_total = float(fields["sequence_total"])
    return Result(
        {"value": _ratio(fields["sequence_total"], fields["sequences"]), **values},
        denominator=sequences,
        denominator_kind="sequences",
        numerator=sequence_total,
    )


def _lm_diagnostics(fields: Mapping[str, Any], p: Mapping[str, Any]) -> list[tuple[str, str]]:
    found = no_valid_element(
        float(fields["tokens"]),
        "no position had a valid target (all labels ignored, or T = 1 with shift); the value is NaN with denominator 0",
    )
    empty = int(fields["empty_sequences"])
    if p["normalization"] == "sequence" and empty:
        total = empty + int(fields["sequences"])
        found.append(("empty_sequences", f"{empty} of {total} sequences had no valid token and were left out of the mean over sequences"))
    return found


_LM_EXAMPLE = Example(lambda rng, n: {"logits": normal(rng, n, T, V), "labels": rng.integers(0, V, (n, T))})


lm_cross_entropy = FunctionDef(
    name="lm_cross_entropy",
    family="sequence",
    summary="causal-LM token cross-entropy over [B, T, V] with shift, ignore_index, label smoothing, token or sequence normalization",
    roles=(
        Role("logits", "[B, T, V]", "float", "next-token logits"),
        Role("labels", "[B, T]", "index", "token ids in [0, V) or ignore_index (with shift, labels[:, t+1] is the target of position t)"),
    ),
    params=(
        IGNORE_INDEX,
        Param(
            "shift",
            "bool",
            True,
            "logits[:, :-1] predict labels[:, 1:] (labels are the input ids); false: logits[:, t] predict labels[:, t]",
        ),
        Param(
            "normalization",
            "str",
            "token",
            "token: Σ loss / Σ valid tokens; sequence: mean over sequences of each sequence's token mean (empty sequences skipped)",
            choices=("token", "sequence"),
        ),
        Param("label_smoothing", "float", 0.0, "ε (torch's uniform smoothing: q_y = 1 − ε + ε/V)", minimum=0.0, maximum=1.0),
    ),
    outputs=(
        Output("value", "the normalized loss"),
        Output("perplexity", "exp(token mean of −log p(label)), without label smoothing, whatever the normalization"),
        Output("tokens", "number of valid (scored) tokens"),
        Output("sequences", "number of sequences with at least one valid token"),
    ),
    fields=LM_FIELDS,
    update=_lm_update,
    finalize=_lm_finalize,
    reference="torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index)",
    finalize_diagnostics=_lm_diagnostics,
    example=_LM_EXAMPLE,
)


# -- CTC ---------------------------------------------------------------------


def _lengths(view: View, role: str, n: int, maximum: int | None = None, what: str = "") -> torch.Tensor:
    t = view.index_labels(role)
    view.expect_shape(role, t, (n,), "one length per sample")
    if bool((t < 0).any()):
        raise view.error(role, f"expected non-negative lengths, got {int(t.min())}")
    if maximum is not None and bool((t > maximum).any()):
        i = int(torch.nonzero(t > maximum)[0][0])
        raise view.error(role, f"expected lengths of at most {maximum} ({what}), got {int(t[i])} for sample {i}")
    return t


def ctc_repeats(targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Per sample, the number of adjacent equal labels in its target (each needs a blank between them).

    ``targets`` is [N, S] padded or the 1-D concatenation of the targets."""
    n = target_lengths.shape[0]
    if targets.ndim == 2:
        inside = torch.arange(1, max(1, targets.shape[1]), device=targets.device) < target_lengths[:, None]
        return ((targets[:, 1:] == targets[:, :-1]) & inside).sum(1)
    sample = torch.repeat_interleave(torch.arange(n, device=targets.device), target_lengths)
    same = (targets[1:] == targets[:-1]) & (sample[1:] == sample[:-1])
    return torch.zeros(n, dtype=torch.int64, device=targets.device).index_add_(0, sample[1:], same.to(torch.int64))


def _ctc_targets(view: View, n: int, classes: int, blank: int, target_lengths: torch.Tensor) -> torch.Tensor:
    """The targets checked: within each length, labels in [0, C) other than blank (padding is not read)."""
    targets = view.index_labels("targets")
    if targets.ndim == 2:
        if targets.shape[0] != n:
            raise view.error("targets", f"expected padded targets [N={n}, S], got {list(targets.shape)}")
        _lengths(view, "target_lengths", n, targets.shape[1], f"the padded width S of targets {list(targets.shape)}")
        labels = targets[torch.arange(targets.shape[1], device=targets.device) < target_lengths[:, None]]
    elif targets.ndim == 1:
        if int(target_lengths.sum()) != targets.shape[0]:
            raise view.error(
                "targets", f"concatenated targets must hold Σ target_lengths = {int(target_lengths.sum())} labels, got {targets.shape[0]}"
            )
        labels = targets
    else:
        raise view.error("targets", f"expected [N, S] padded or 1-D concatenated targets, got shape {list(targets.shape)}")
    bad = (labels < 0) | (labels >= classes) | (labels == blank)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise view.error(
            "targets", f"expected target labels in [0, {classes}) other than blank={blank}, got {value} ({int(bad.sum())} such labels)"
        )
    return targets


def _report_infeasible(
    view: View, input_lengths: torch.Tensor, target_lengths: torch.Tensor, repeats: torch.Tensor, zero_infinity: bool
) -> None:
    needed = target_lengths + repeats
    infeasible = torch.nonzero(input_lengths < needed).reshape(-1).tolist()
    if infeasible:
        shown = ", ".join(str(i) for i in infeasible[:20]) + (f" and {len(infeasible) - 20} more" if len(infeasible) > 20 else "")
        i = infeasible[0]
        view.diag(
            "ctc_infeasible",
            f"{len(infeasible)} sample(s) with an input too short for the target and its repeats (loss infinite"
            f"{', counted as 0 by zero_infinity' if zero_infinity else ''}): "
            f"sample indices {shown}; e.g. sample {i}: input length {int(input_lengths[i])} < target length {int(target_lengths[i])} "
            f"+ {int(repeats[i])} repeats",
        )


def _ctc_terms(view: View, p: Mapping[str, Any]) -> Terms:
    role = "logits" if p["input_kind"] == "logits" else "log_probs"
    other = "log_probs" if role == "logits" else "logits"
    if not view.has(role) and view.has(other):
        raise view.error(role, f"input_kind={p['input_kind']!r} reads role {role!r}, but only {other!r} was sent; set input_kind={other!r}")
    x = view.scores(role)
    view.expect_ndim(role, x, (3,), "[T, N, C]")
    steps, n, classes = x.shape
    blank = p["blank"]
    if blank >= classes:
        raise view.param_error("blank", f"expected a class index in [0, {classes}), got {blank}")
    input_lengths = _lengths(view, "input_lengths", n, steps, f"T of {role} {list(x.shape)}")
    target_lengths = _lengths(view, "target_lengths", n)
    targets = _ctc_targets(view, n, classes, blank, target_lengths)
    _report_infeasible(view, input_lengths, target_lengths, ctc_repeats(targets, target_lengths), p["zero_infinity"])
    dtype = compute_dtype(x.dtype)
    log_probs = torch.log_softmax(x.to(dtype), 2) if role == "logits" else x.to(dtype)
    losses = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank, reduction="none", zero_infinity=p["zero_infinity"])
    if p["reduction"] == "mean":  # torch: the mean of loss_i / target_length_i (lengths of 0 count as 1)
        losses = losses / target_lengths.clamp_min(1).to(losses.dtype)
    return Terms(losses)


def _ctc_example(rng: np.random.Generator, n: int) -> Arrays:
    """Feasible samples: 10 steps for at most 4 labels (with repeats, at most 7 steps are needed)."""
    target_lengths = rng.integers(1, 5, n)
    targets = rng.integers(1, 5, (n, 4))
    return {
        "log_probs": log_softmax(normal(rng, 10, n, 5)),
        "targets": np.where(np.arange(4) < target_lengths[:, None], targets, 0),
        "input_lengths": np.full(n, 10),
        "target_lengths": target_lengths,
    }


# Samples lie on dim 1 of log_probs [T, N, C]: batches do not concatenate on dim 0.
_CTC_EXAMPLE = Example(_ctc_example, rows=False)


ctc = mean_loss(
    name="ctc",
    family="sequence",
    summary="connectionist temporal classification loss; mean is the mean over samples of loss_i / target_length_i (torch)",
    roles=(
        Role(
            "log_probs",
            "[T, N, C]",
            "float",
            "log-probabilities over C classes (blank included) per time step",
            optional=True,
            one_of="scores",
        ),
        Role(
            "logits",
            "[T, N, C]",
            "float",
            "unnormalized scores, read with input_kind='logits' (log-softmax over C)",
            optional=True,
            one_of="scores",
        ),
        Role("targets", "[N, S] padded or [Σ target_lengths] concatenated", "index", "label sequences, no blanks"),
        Role("input_lengths", "[N]", "index", "valid time steps per sample (<= T)"),
        Role("target_lengths", "[N]", "index", "target length per sample"),
    ),
    params=(
        Param("blank", "int", 0, "index of the blank class", minimum=0),
        Param("zero_infinity", "bool", False, "infinite losses (infeasible samples) count as 0 (torch)"),
        Param(
            "input_kind",
            "str",
            "log_probs",
            "log_probs: role 'log_probs' as given; logits: role 'logits', log-softmax over classes",
            choices=("log_probs", "logits"),
        ),
    ),
    terms=_ctc_terms,
    reference="torch.nn.functional.ctc_loss; a float64 forward recursion in the tests",
    sample_weights=False,
    # The batch axis is dim 1 of log_probs [T, N, C]: a generic dim-0 splitter would cut time, not
    # samples.  Whole batches of a stream still merge exactly (Σ loss_i / L_i, N).
    splittable=False,
    example=_CTC_EXAMPLE,
)

ctc = replace(ctc, memory=ctc_lattice)  # budget (lossd.kernels.budget): the N × T × (2S + 1) lattice

FUNCTIONS = (
    lm_cross_entropy,
    ctc,
)
