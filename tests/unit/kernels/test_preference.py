"""Preference and RL losses against float64 ports of TRL, CleanRL and transformers formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, assert_close, assert_merge_exact
from lossd.kernels import Accumulator, InvalidInput, evaluate, get_function

# The family computes in float64 whatever the input dtype: compare tightly against
# the formula on the same (rounded) values read as float64.
TIGHT = dict(rtol=1e-9, atol=1e-12)


def run(name, tensors, **params):
    out = evaluate(tensors, [{"name": name, "params": params}])
    r = out[name]
    return (r.tensors["value"] if params.get("reduction") == "none" else r.value), out


def low(shape, dtype, scale=1.0, shift=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)
    return x, x.double()


def reduce(x, reduction, w=None):
    w = torch.ones_like(x) if w is None else w
    if reduction == "none":
        return (w * x).numpy()
    return ((w * x).sum() / (w.sum() if reduction == "mean" else 1)).item()


# -- pairwise_logistic --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_pairwise_logistic_matches_formula(dtype, n, reduction, margin):
    (c, c64), (r, r64) = low((n,), dtype, 3), low((n,), dtype, 3)
    got, _ = run("pairwise_logistic", {"chosen_scores": c, "rejected_scores": r}, margin=margin, reduction=reduction)
    ref = -F.logsigmoid(c64 - r64 - margin)
    assert_close(got, reduce(ref, reduction), **TIGHT)


def test_bradley_terry_alias_weights_and_extremes():
    c = torch.tensor([1e4, -1e4, 0.5, 2.0], dtype=torch.float64)
    r = torch.tensor([-1e4, 1e4, 0.5, 1.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    got, out = run("bradley_terry", {"chosen_scores": c, "rejected_scores": r, "weights": w})
    assert out["bradley_terry"].function == "pairwise_logistic"
    ref = -F.logsigmoid(c - r)
    assert_close(got, reduce(ref, "mean", w), **TIGHT)
    assert_close(ref[1].item(), 2e4, rtol=1e-12)  # no overflow: −log σ(−2e4) = 2e4


def test_pairwise_logistic_merge_is_exact():
    t = {"chosen_scores": torch.randn(101), "rejected_scores": torch.randn(101), "weights": torch.rand(101)}
    assert_merge_exact(t, {"name": "pairwise_logistic", "params": {"margin": 0.2}}, parts=5)


# -- dpo ------------------------------------------------------------------------------------------------
def trl_dpo(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """TRL DPOTrainer.dpo_loss for sigmoid / ipo / hinge, and its reward metrics, in float64."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * logits)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "reward_accuracy": (chosen > rejected).double().mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
    }
    return losses, metrics


def dpo_inputs(n, dtype=torch.float64, t=None):
    shape = (n,) if t is None else (n, t)
    base = -40.0 if t is None else -2.0
    pairs = [low(shape, dtype, 3.0, base) for _ in range(4)]
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    return {k: v for k, (v, _) in zip(names, pairs)}, [v64 for _, v64 in pairs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 257])
@pytest.mark.parametrize(
    "params",
    [{}, {"beta": 0.5, "label_smoothing": 0.2}, {"loss_type": "ipo", "beta": 0.3}, {"loss_type": "hinge", "beta": 2.0}],
)
def test_dpo_matches_trl(dtype, n, params):
    tensors, ref_inputs = dpo_inputs(n, dtype)
    got, out = run("dpo", tensors, **params)
    losses, metrics = trl_dpo(*ref_inputs, **params)
    assert_close(got, losses.mean().item(), **TIGHT)
    for key, value in metrics.items():
        assert_close(out["dpo"].values[key], value, **TIGHT, what=key)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dpo_reductions_and_weights(reduction):
    tensors, ref_inputs = dpo_inputs(9)
    w = torch.rand(9, dtype=torch.float64)
    got, out = run("dpo", {**tensors, "weights": w}, reduction=reduction)
    losses, _ = trl_dpo(*ref_inputs)
    assert_close(got, reduce(losses, reduction, w), **TIGHT)
    mean_w, out = run("dpo", {**tensors, "weights": w})
    assert_close(mean_w, reduce(losses, "mean", w), **TIGHT)
    assert out["dpo"].denominator_kind == "weights" and out["dpo"].denominator == pytest.approx(w.sum().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_dpo_per_token_matches_trl(dtype, score):
    n, tc, tr = 5, 7, 4
    (pc, pc64), (rc, rc64) = low((n, tc), dtype, 1, -2), low((n, tc), dtype, 1, -2)
    (pr, pr64), (rr, rr64) = low((n, tr), dtype, 1, -2), low((n, tr), dtype, 1, -2)
    cm = (torch.rand(n, tc) < 0.7).long()
    rm = (torch.rand(n, tr) < 0.7).long()
    cm[:, 0] = rm[:, 0] = 1
    pc[cm == 0] = float("nan")  # padding may hold anything: it must not reach the result
    tensors = {
        "policy_chosen_logps": pc,
        "reference_chosen_logps": rc,
        "policy_rejected_logps": pr,
        "reference_rejected_logps": rr,
        "chosen_mask": cm,
        "rejected_mask": rm,
    }
    got, out = run("dpo", tensors, score=score, beta=0.2)

    def seq(logps, mask):  # TRL _get_batch_logps(average_log_prob=score == "mean")
        s = (torch.nan_to_num(logps) * mask).sum(-1)
        return s / mask.sum(-1) if score == "mean" else s

    losses, metrics = trl_dpo(seq(pc64, cm), seq(pr64, rm), seq(rc64, cm), seq(rr64, rm), beta=0.2)
    assert_close(got, losses.mean().item(), **TIGHT)
    assert_close(out["dpo"].values["reward_accuracy"], metrics["reward_accuracy"], **TIGHT)


def test_dpo_extreme_log_probs():
    tensors = {
        "policy_chosen_logps": torch.tensor([0.0, -1e4]),
        "policy_rejected_logps": torch.tensor([-1e4, 0.0]),
        "reference_chosen_logps": torch.tensor([0.0, 0.0]),
        "reference_rejected_logps": torch.tensor([0.0, 0.0]),
    }
    got, _ = run("dpo", tensors, beta=1.0)
    losses, _ = trl_dpo(
        *(
            tensors[k].double()
            for k in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
        ),
        beta=1.0,
    )
    assert_close(got, losses.mean().item(), **TIGHT)
    assert math.isfinite(got)


def test_dpo_merge_is_exact():
    tensors, _ = dpo_inputs(64, torch.float32)
    assert_merge_exact({**tensors, "weights": torch.rand(64)}, {"name": "dpo", "params": {"label_smoothing": 0.1}}, parts=4)
    tensors, _ = dpo_inputs(40, torch.float32, t=6)
    tensors["chosen_mask"] = torch.ones(40, 6)
    tensors["rejected_mask"] = (torch.rand(40, 6) < 0.8).float()
    tensors["rejected_mask"][:, 0] = 1
    assert_merge_exact(tensors, {"name": "dpo", "params": {"score": "mean", "loss_type": "ipo"}}, parts=3)


# -- ppo_clip -----------------------------------------------------------------------------------------------
def ppo_reference(new, old, adv, mask, ref=None, eps=0.2, kl_coef=0.0, estimator="k3", normalize=False):
    """CleanRL/TRL PPO: clipped surrogate, clip fraction, Schulman KL estimators, masked token means."""
    valid = mask.bool()

    def mmean(x):
        return x[valid].mean().item()

    if normalize:
        a = adv[valid]
        adv = (adv - a.mean()) / (a.std() + 1e-8)

    def est(lr):
        return {"k1": -lr, "k2": 0.5 * lr**2, "k3": torch.exp(lr) - 1 - lr}[estimator]

    log_ratio = new - old
    ratio = torch.exp(log_ratio)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - eps, 1 + eps)
    pg = torch.maximum(pg1, pg2)
    out = {"policy_loss": mmean(pg), "clip_fraction": mmean((pg2 > pg1).double()), "approx_kl": mmean(est(log_ratio))}
    loss = pg
    if ref is not None:
        kl = est(ref - new)
        out["kl"] = mmean(kl)
        loss = pg + kl_coef * kl
    out["value"] = mmean(loss)
    return out


def ppo_inputs(shape, dtype=torch.float64, with_ref=False):
    (new, new64), (adv, adv64) = low(shape, dtype, 0.3, -1.0), low(shape, dtype)
    old64 = (new64 + 0.3 * torch.randn(shape, dtype=torch.float64)).to(dtype).double()
    tensors = {"logp_new": new, "logp_old": old64.to(dtype), "advantages": adv}
    ref64 = None
    if with_ref:
        ref = (new64 + 0.2 * torch.randn(shape, dtype=torch.float64)).to(dtype)
        tensors["logp_ref"], ref64 = ref, ref.double()
    return tensors, (new64, old64, adv64, ref64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (257,), (6, 9)])
@pytest.mark.parametrize(
    "params",
    [{}, {"clip_epsilon": 0.1, "kl_estimator": "k1"}, {"kl_coef": 0.05, "kl_estimator": "k2"}, {"kl_coef": 0.5, "clip_epsilon": 0.3}],
)
def test_ppo_clip_matches_formula(dtype, shape, params):
    with_ref = "kl_coef" in params
    tensors, (new, old, adv, ref) = ppo_inputs(shape, dtype, with_ref)
    mask = torch.ones(shape)
    if len(shape) == 2:
        mask = (torch.rand(shape) < 0.7).double()
        mask[0, 0] = 1
        tensors["mask"] = mask
    _, out = run("ppo_clip", tensors, **params)
    ref_values = ppo_reference(
        new,
        old,
        adv,
        mask,
        ref,
        eps=params.get("clip_epsilon", 0.2),
        kl_coef=params.get("kl_coef", 0.0),
        estimator=params.get("kl_estimator", "k3"),
    )
    assert set(out["ppo_clip"].values) == set(ref_values)
    for key, value in ref_values.items():
        assert_close(out["ppo_clip"].values[key], value, **TIGHT, what=key)
    assert out["ppo_clip"].denominator == float(mask.sum()) and out["ppo_clip"].denominator_kind == "valid_tokens"


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_ppo_clip_normalized_advantages(estimator):
    tensors, (new, old, adv, ref) = ppo_inputs((5, 8), with_ref=True)
    mask = (torch.rand(5, 8) < 0.6).double()
    mask[:, 0] = 1
    tensors["advantages"][mask == 0] = 1e6  # padding must not move the batch statistics
    adv = tensors["advantages"].double()
    _, out = run("ppo_clip", {**tensors, "mask": mask}, normalize_advantages=True, kl_estimator=estimator, kl_coef=0.1)
    ref_values = ppo_reference(new, old, adv, mask, ref, kl_coef=0.1, estimator=estimator, normalize=True)
    for key, value in ref_values.items():
        assert_close(out["ppo_clip"].values[key], value, **TIGHT, what=key)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_ppo_clip_reductions(reduction):
    tensors, (new, old, adv, _) = ppo_inputs((4, 5))
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    got, _ = run("ppo_clip", {**tensors, "mask": mask}, reduction=reduction)
    ratio = torch.exp(new - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    assert_close(got, reduce(pg, reduction, mask.double()), **TIGHT)


def test_ppo_clip_all_masked_is_nan_with_diagnostic():
    tensors, _ = ppo_inputs((2, 3))
    got, out = run("ppo_clip", {**tensors, "mask": torch.zeros(2, 3)})
    assert math.isnan(got) and out["ppo_clip"].denominator == 0
    assert "all_ignored" in [d.code for d in out.diagnostics]


def test_ppo_clip_merge_is_exact_and_kl_covers_tokens_with_a_reference():
    tensors, _ = ppo_inputs((60, 7), torch.float32, with_ref=True)
    tensors["mask"] = (torch.rand(60, 7) < 0.8).float()
    assert_merge_exact(tensors, {"name": "ppo_clip", "params": {"kl_coef": 0.1}}, parts=4)
    # A stream where only the first batch carries logp_ref: kl averages that batch's tokens.
    with_ref, _ = ppo_inputs((3, 4), with_ref=True)
    without = {k: v for k, v in ppo_inputs((5, 4))[0].items()}
    acc = Accumulator(["ppo_clip"])
    acc.add(with_ref)
    acc.add(without)
    merged = acc.result()["ppo_clip"].values
    assert_close(merged["kl"], evaluate(with_ref, ["ppo_clip"])["ppo_clip"].values["kl"], **TIGHT)
    assert "kl" not in evaluate(without, ["ppo_clip"])["ppo_clip"].values


def test_ppo_clip_with_normalized_advantages_refuses_a_split_batch():
    tensors, _ = ppo_inputs((8, 3))
    part1 = {k: v[:4] for k, v in tensors.items()}
    part2 = {k: v[4:] for k, v in tensors.items()}
    spec = {"name": "ppo_clip", "params": {"normalize_advantages": True}}
    assert get_function("ppo_clip").is_splittable({"normalize_advantages": False})
    assert not get_function("ppo_clip").is_splittable({"normalize_advantages": True})
    acc = Accumulator([spec])
    acc.add(part1, batch_id="b")
    with pytest.raises(InvalidInput, match="ppo_clip is not splittable") as info:
        acc.add(part2, batch_id="b")
    assert info.value.violations[0].field == "functions[0].name"
    plain = Accumulator(["ppo_clip"])  # without normalization the parts merge exactly
    plain.add(part1, batch_id="b")
    plain.add(part2, batch_id="b")
    assert_close(plain.result()["ppo_clip"].value, evaluate(tensors, ["ppo_clip"])["ppo_clip"].value, rtol=1e-12)


# -- moe_load_balancing --------------------------------------------------------------------------------------
def transformers_load_balancing(gate_logits, num_experts, top_k=2, attention_mask=None):
    """transformers' Mixtral load_balancing_loss_func, in float64."""
    concatenated = torch.cat([g.double() for g in gate_logits], dim=0)
    routing_weights = F.softmax(concatenated, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts)
    if attention_mask is None:
        tokens_per_expert = torch.mean(expert_mask.double(), dim=0)
        router_prob_per_expert = torch.mean(routing_weights, dim=0)
    else:
        b, s = attention_mask.shape
        layers = concatenated.shape[0] // (b * s)
        expert_attention_mask = (
            attention_mask[None, :, :, None, None].expand((layers, b, s, top_k, num_experts)).reshape(-1, top_k, num_experts).double()
        )
        tokens_per_expert = torch.sum(expert_mask.double() * expert_attention_mask, dim=0) / torch.sum(expert_attention_mask, dim=0)
        router_mask = attention_mask[None, :, :, None].expand((layers, b, s, num_experts)).reshape(-1, num_experts).double()
        router_prob_per_expert = torch.sum(routing_weights * router_mask, dim=0) / torch.sum(router_mask, dim=0)
    return (
        (torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts).item(),
        tokens_per_expert,
        router_prob_per_expert,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts, top_k", [(1, 1), (3, 2), (8, 2), (8, 8), (5, 1)])
def test_moe_matches_transformers(dtype, experts, top_k):
    z, z64 = low((257, experts), dtype, 2.0)
    _, out = run("moe_load_balancing", {"router_logits": z}, top_k=top_k)
    # The service picks the top-k of the softmax in float32 for low-precision input; so does the oracle here.
    value, fraction, prob = transformers_load_balancing([z.float() if dtype != torch.float64 else z64], experts, top_k)
    r = out["moe_load_balancing"]
    assert_close(r.value, value, rtol=1e-6 if dtype != torch.float64 else 1e-9)
    assert_close(r.tensors["expert_fraction"], fraction.numpy(), **TIGHT)
    assert_close(r.tensors["router_prob"], prob.numpy(), rtol=1e-6 if dtype != torch.float64 else 1e-9)


def test_moe_attention_mask_over_layers():
    layers, b, s, e = 3, 4, 6, 5
    gates = [torch.randn(b * s, e, dtype=torch.float64) for _ in range(layers)]
    attention = (torch.rand(b, s) < 0.7).long()
    attention[0, 0] = 1
    value, _, _ = transformers_load_balancing(gates, e, 2, attention)
    mask = attention.reshape(-1).repeat(layers)  # transformers' layer-major order of the concatenated logits
    got, _ = run("moe_load_balancing", {"router_logits": torch.cat(gates), "mask": mask})
    assert_close(got, value, **TIGHT)
    # [..., E] logits with a mask over their leading dims read the same tokens.
    stacked = torch.cat(gates).reshape(layers, b, s, e)
    got3d, _ = run("moe_load_balancing", {"router_logits": stacked, "mask": attention.expand(layers, b, s)})
    assert_close(got3d, value, **TIGHT)


def test_moe_merge_is_the_whole_data_value():
    z = torch.randn(333, 6)
    mask = (torch.rand(333) < 0.9).long()
    assert_merge_exact({"router_logits": z, "mask": mask}, {"name": "moe_load_balancing", "params": {"top_k": 2}}, parts=5)


def test_moe_blocks_give_the_same_value(monkeypatch):
    from lossd.kernels.losses import auxiliary

    z = torch.randn(100, 4, dtype=torch.float64)
    whole, _ = run("moe_load_balancing", {"router_logits": z})
    monkeypatch.setattr(auxiliary, "CHUNK_ELEMENTS", 4 * 7)
    assert_close(run("moe_load_balancing", {"router_logits": z})[0], whole, **TIGHT)


def test_moe_all_masked_is_nan_with_diagnostic():
    got, out = run("moe_load_balancing", {"router_logits": torch.randn(4, 3), "mask": torch.zeros(4)})
    assert math.isnan(got) and "all_ignored" in [d.code for d in out.diagnostics]


# -- uncertainty_weighting ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 257])
def test_uncertainty_weighting_matches_formula(dtype, m):
    losses = (torch.rand(m, dtype=torch.float64) * 5).to(dtype)
    log_vars, s64 = low((m,), dtype)
    l64 = losses.double()
    got, _ = run("uncertainty_weighting", {"task_losses": losses, "log_vars": log_vars})
    assert_close(got, (0.5 * torch.exp(-s64) * l64 + 0.5 * s64).sum().item(), **TIGHT)


def test_uncertainty_weighting_overflow_is_reported():
    got, out = run(
        "uncertainty_weighting",
        {"task_losses": torch.tensor([1.0, 1.0], dtype=torch.float64), "log_vars": torch.tensor([-800.0, 0.0], dtype=torch.float64)},
    )
    assert got == math.inf and "overflow" in [d.code for d in out.diagnostics]


def test_uncertainty_weighting_is_not_splittable():
    t = {"task_losses": torch.rand(4), "log_vars": torch.randn(4)}
    assert not get_function("uncertainty_weighting").splittable
    acc = Accumulator(["uncertainty_weighting"])
    acc.add({k: v[:2] for k, v in t.items()}, batch_id="step")
    with pytest.raises(InvalidInput, match="uncertainty_weighting is not splittable"):
        acc.add({k: v[2:] for k, v in t.items()}, batch_id="step")


# -- errors -----------------------------------------------------------------------------------------------------------
DPO, _ = dpo_inputs(4)
DPO_T, _ = dpo_inputs(4, t=3)
PPO, _ = ppo_inputs((4, 3))


@pytest.mark.parametrize(
    "name, tensors, params, field, match",
    [
        (
            "pairwise_logistic",
            {"chosen_scores": torch.randn(3), "rejected_scores": torch.randn(4)},
            {},
            "tensors.rejected_scores",
            r"expected the shape of chosen_scores \[3\]",
        ),
        (
            "pairwise_logistic",
            {"chosen_scores": torch.randint(0, 3, (3,)), "rejected_scores": torch.randn(3)},
            {},
            "tensors.chosen_scores",
            "floating-point",
        ),
        ("dpo", DPO, {"loss_type": "ipo", "label_smoothing": 0.1}, "functions[0].params.label_smoothing", "applies to loss_type='sigmoid'"),
        ("dpo", DPO, {"loss_type": "kto"}, "functions[0].params.loss_type", "one of"),
        ("dpo", DPO, {"beta": 0.0}, "functions[0].params.beta", "> 0"),
        ("dpo", DPO, {"score": "mean"}, "functions[0].params.score", "per-token"),
        ("dpo", {**DPO, "chosen_mask": torch.ones(4)}, {}, "tensors.chosen_mask", "per-sequence"),
        ("dpo", {**DPO, "reference_rejected_logps": torch.randn(5)}, {}, "tensors.reference_rejected_logps", r"expected shape \[4\]"),
        ("dpo", {k: v for k, v in DPO.items() if k != "reference_chosen_logps"}, {}, "tensors.reference_chosen_logps", "needs role"),
        ("dpo", DPO_T, {}, "tensors.chosen_mask", "need chosen_mask"),
        (
            "dpo",
            {**DPO_T, "chosen_mask": torch.ones(4, 3), "rejected_mask": torch.full((4, 3), 2.0)},
            {},
            "tensors.rejected_mask",
            "0/1 mask",
        ),
        (
            "dpo",
            {**DPO_T, "chosen_mask": torch.ones(4, 3), "rejected_mask": torch.zeros(4, 3)},
            {"score": "mean"},
            "tensors.rejected_mask",
            "row 0 has none",
        ),
        (
            "dpo",
            {**DPO_T, "chosen_mask": torch.ones(4, 2), "rejected_mask": torch.ones(4, 3)},
            {},
            "tensors.chosen_mask",
            r"expected shape \[4, 3\]",
        ),
        ("ppo_clip", PPO, {"kl_coef": 0.1}, "tensors.logp_ref", "send its log-probs as logp_ref"),
        ("ppo_clip", PPO, {"clip_epsilon": 1.0}, "functions[0].params.clip_epsilon", r"\(0, 1\)"),
        ("ppo_clip", PPO, {"kl_estimator": "k4"}, "functions[0].params.kl_estimator", "one of"),
        ("ppo_clip", {**PPO, "advantages": torch.randn(4)}, {}, "tensors.advantages", r"expected the shape of logp_new \[4, 3\]"),
        ("ppo_clip", {**PPO, "mask": torch.ones(4)}, {}, "tensors.mask", r"expected shape \[4, 3\]"),
        (
            "ppo_clip",
            {**PPO, "mask": torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])},
            {"normalize_advantages": True},
            "functions[0].params.normalize_advantages",
            "at least 2 valid tokens",
        ),
        ("ppo_clip", {k: v[0, 0] for k, v in PPO.items()}, {}, "tensors.logp_new", r"expected shape \[N\] or \[N, T\]"),
        (
            "moe_load_balancing",
            {"router_logits": torch.randn(5, 3)},
            {"top_k": 4},
            "functions[0].params.top_k",
            "<= the number of experts 3",
        ),
        ("moe_load_balancing", {"router_logits": torch.randn(5, 3)}, {"top_k": 0}, "functions[0].params.top_k", ">= 1"),
        ("moe_load_balancing", {"router_logits": torch.randn(5)}, {}, "tensors.router_logits", r"\[tokens, E\]"),
        ("moe_load_balancing", {"router_logits": torch.randn(5, 3), "mask": torch.ones(4)}, {}, "tensors.mask", r"expected shape \[5\]"),
        ("moe_load_balancing", {"router_logits": torch.randn(5, 3), "mask": torch.full((5,), 0.5)}, {}, "tensors.mask", "0/1 mask"),
        (
            "uncertainty_weighting",
            {"task_losses": torch.rand(3), "log_vars": torch.rand(2)},
            {},
            "tensors.log_vars",
            r"expected the shape of task_losses \[3\]",
        ),
        (
            "uncertainty_weighting",
            {"task_losses": torch.rand(3, 1), "log_vars": torch.rand(3, 1)},
            {},
            "tensors.task_losses",
            r"expected shape \[M\]",
        ),
        (
            "uncertainty_weighting",
            {"task_losses": torch.rand(0), "log_vars": torch.rand(0)},
            {},
            "tensors.task_losses",
            "at least one task",
        ),
    ],
)
def test_errors_name_the_field(name, tensors, params, field, match):
    with pytest.raises(InvalidInput, match=match) as info:
        evaluate(tensors, [{"name": name, "params": params}])
    assert info.value.violations[0].field == field
