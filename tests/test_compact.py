"""compact.py against slow, obvious references on tiny seeded models (SPEC.md §2-§4): every reference runs
each branch alone as one plain sequence (prompt ⊕ rationale ⊕ cue ⊕ y ⊕ close ⊕ eot), no packing, no probe."""
import math
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from compact import (CompactConfig, adaptability_scores, answer_logprobs, compact_loss, consensus_scores,
                     difficulty_scores, fuse_weights, mcon_loss, mi_estimate, packed_forward, probe_budget,
                     probe_information, probe_plan, rationale_view, sample_keys, sampled_plan, token_nll)
from data import ANSWER, CLOSE as CLOSE_CODE, CUE as CUE_CODE, EOT as EOT_CODE, PROMPT, RATIONALE, EncodedInstance, collate
from model import ModelArgs, Transformer, rope_cos_sin

V = 128
CUE, CLOSE, EOT = [5, 6], [7], 8


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, qkv_bias=True, initializer_range=0.15) | kw
    return Transformer(ModelArgs(**kw)).float().eval()


def branch_seq(prompt, answer, rat):
    return prompt + rat + CUE + answer + CLOSE + [EOT]


def make_batch(instances):
    """data.collate's packed row from instances: list of (prompt, answer, [(rationale, think_idx), ...])."""
    encoded = []
    for i, (prompt, answer, branches) in enumerate(instances):
        rows = []
        for rat, think in branches:
            codes = [PROMPT] * len(prompt) + [RATIONALE] * len(rat) + [CUE_CODE] * len(CUE) + [ANSWER] * len(answer)
            codes += [CLOSE_CODE, EOT_CODE]
            marks = [False] * len(codes)
            for j in think:
                marks[len(prompt) + j] = True
            rows.append((branch_seq(prompt, answer, rat), codes, marks))
        encoded.append(EncodedInstance(f"i{i}", rows, list(range(len(rows))), CUE + answer,
                                       [False] * len(CUE) + [True] * len(answer)))
    return collate(encoded)


def rand_ids(g, n):
    return torch.randint(10, V, (n,), generator=g).tolist()


def standard_instances(seed=0):
    """Three instances: 3 branches; 2 branches; 1 branch (one rationale empty)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: rand_ids(g, n)
    return [(r(4), r(3), [(r(9), [2, 5]), (r(12), [0]), (r(7), [])]),
            (r(5), r(2), [(r(10), [3]), (r(6), [])]),
            (r(3), r(2), [(r(8), [7])])]


def long_and_short(seed=0):
    """Branches of very different lengths (a long trace beside terse ones), as real teacher mixes are."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: rand_ids(g, n)
    think = lambda n: sorted(torch.randperm(n, generator=g)[:n // 6].tolist())
    return [(r(6), r(3), [(r(3), [0]), (r(90), think(90)), (r(11), think(11)), (r(40), think(40))]),
            (r(9), r(1), [(r(60), think(60)), (r(2), [])])]


# --- naive references: each branch alone, one plain forward per sequence ---

def naive_info(model, prompt, answer, rat, t):
    """I_t = log p(y | prompt ⊕ r_<=t) from one full forward of prompt ⊕ r[:t] ⊕ cue ⊕ y."""
    seq = torch.tensor(prompt + rat[:t] + CUE + answer)
    logp = torch.log_softmax(model(seq[None])[0].float(), -1)
    start = len(prompt) + t + len(CUE)  # first answer token
    return sum(logp[s - 1, seq[s]] for s in range(start, len(seq)))


def naive_s_mi(model, instances, cfg):
    """Exact Eq. 3 from one full forward per prefix, [B, K]."""
    ref = torch.zeros(len(instances), max(len(br) for *_, br in instances))
    for b, (prompt, answer, branches) in enumerate(instances):
        for k, (rat, think) in enumerate(branches):
            info = [naive_info(model, prompt, answer, rat, t) for t in range(len(rat) + 1)]
            for t in range(1, len(rat) + 1):
                m = cfg.think_weight if t - 1 in think else cfg.other_weight
                ref[b, k] += m * max(info[t] - info[t - 1], 0) / (len(rat) if cfg.mi_norm == "length" else 1)
    return ref


def slow_branch_losses(model, instances):
    """L_SFT,k and L_MCon,k from full logits, branch by branch: [B, K] each, with grad."""
    B, K = len(instances), max(len(br) for *_, br in instances)
    l_sft, l_mcon = torch.zeros(B, K), torch.zeros(B, K)
    for b, (prompt, answer, branches) in enumerate(instances):
        dist = {}
        for k, (rat, _) in enumerate(branches):
            seq = branch_seq(prompt, answer, rat)
            logp = torch.log_softmax(model(torch.tensor(seq)[None])[0].float(), -1)
            sft = range(len(prompt), len(seq))
            l_sft[b, k] = -sum(logp[t - 1, seq[t]] for t in sft) / len(sft)
            start = len(prompt) + len(rat) + len(CUE)
            dist[k] = logp[start - 1:start - 1 + len(answer)]  # (J, V): the positions predicting the answer
        kl = lambda p, q: (p.exp() * (p - q)).sum(-1)
        for k in dist:
            bkl = [(0.5 * (kl(dist[k], dist[i]) + kl(dist[i], dist[k]))).mean() for i in dist if i != k]
            l_mcon[b, k] = sum(bkl) / len(bkl) if bkl else 0.0
    return l_sft, l_mcon


def reference_scores(model, instances, feature="eot", self_loops=False, heads="mean", similarity="qk"):
    """S_D and S_G of every branch from plain calls on the branch alone: S_D from full logits, S_G from the
    blocks run one by one up to the last layer's input norm, at the eot (or the readings: the last rationale
    token, the mean over the rationale; self-loops; one joint attention over all heads; cosine similarity)."""
    B, K = len(instances), max(len(br) for *_, br in instances)
    s_d, s_g = torch.zeros(B, K), torch.zeros(B, K)
    attn, D = model.model.layers[-1].self_attn, model.args.head_dim
    H, G = attn.q_proj.out_features // D, attn.k_proj.out_features // D
    for b, (prompt, answer, branches) in enumerate(instances):
        e = {}
        for k, (rat, _) in enumerate(branches):
            ids = torch.tensor(branch_seq(prompt, answer, rat))[None]
            logp = torch.log_softmax(model(ids)[0], -1)
            r = torch.arange(len(prompt), len(prompt) + len(rat))
            s_d[b, k] = -logp[r - 1, ids[0, r]].mean() if len(rat) else 0.0
            cos, sin = rope_cos_sin(model.inv_freq, torch.arange(ids.shape[1])[None])
            x = model.model.embed_tokens(ids)
            for layer in model.model.layers[:-1]:
                x = layer(x, cos, sin)[0]
            x = model.model.layers[-1].input_layernorm(x)[0]
            e[k] = x[-1] if feature == "eot" or not len(rat) else x[r[-1]] if feature == "last" else x[r].mean(0)
        for i in e if len(e) > 1 or self_loops else []:  # one branch: S_G = 0 without self-loops
            others = [j for j in e if j != i or self_loops]
            q = attn.q_proj(e[i]).view(H, D)
            kappa = {j: attn.k_proj(e[j]).view(G, D).repeat_interleave(H // G, 0) for j in others}  # (H, D)
            if heads == "joint":  # one attention over the concatenated heads
                q, kappa = q.flatten()[None], {j: v.flatten()[None] for j, v in kappa.items()}
            if similarity == "cosine":  # logits √C cos(e_i, e_j), one head
                C = len(e[i])
                q, kappa = e[i][None] / e[i].norm() * C ** 0.5, {j: e[j][None] / e[j].norm() * C ** 0.5 for j in others}
            for h in range(len(q)):
                logits = torch.stack([q[h] @ kappa[j][h] for j in others]) / math.sqrt(q.shape[1])
                for j, a in zip(others, torch.softmax(logits, 0)):
                    s_g[b, j] += a / len(q)
    return s_d, s_g


# --- config, fusion, pure scorers ---

def test_config_validation():
    CompactConfig(weighting="uniform", alpha=0, mi_budget=0, z_floor=0)
    for bad in (dict(weighting="avg"), dict(temperature=0), dict(alpha=-1), dict(mi_budget=-1), dict(mi_budget=5),
                dict(mi_think_share=1.5), dict(z_floor=-0.1), dict(sg_similarity="dot")):
        with pytest.raises(ValueError):
            CompactConfig(**bad)


def test_fuse_weights_reference_and_padding():
    g = torch.Generator().manual_seed(0)
    s_mi, s_g, s_d = (torch.randn(4, 5, generator=g) for _ in range(3))
    bm = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    cfg = CompactConfig(alpha=0.5, beta=2.0, gamma=1.5, temperature=0.7)
    w = fuse_weights(s_mi, s_g, s_d, bm, cfg)
    ref = torch.zeros(4, 5)
    for b in range(4):
        idx = bm[b].nonzero().flatten()
        def z(s):
            x = s[b, idx]
            return (x - x.mean()) / max(x.std(unbiased=False), 0.01 * x.abs().mean(), 1e-6)
        ref[b, idx] = torch.softmax((0.5 * z(s_mi) + 2.0 * z(s_g) - 1.5 * z(s_d)) / 0.7, 0)
    assert_close(w, ref)
    assert w[2, 1] == 1.0  # one valid branch: weight 1
    junk = lambda s: torch.where(bm, s, torch.full_like(s, 1e4))  # padding scores must not matter
    assert_close(fuse_weights(junk(s_mi), junk(s_g), junk(s_d), bm, cfg), w)
    same = torch.ones(4, 5)  # zero std: uniform over valid branches, no NaN
    assert_close(fuse_weights(same, same, same, bm, cfg), bm.float() / bm.sum(-1, keepdim=True))
    uniform = fuse_weights(s_mi, s_g, s_d, bm, CompactConfig(weighting="uniform"))
    assert torch.equal(uniform, torch.where(bm, 1.0 / bm.sum(-1, keepdim=True), 0.0))


def test_fuse_weights_z_floor():
    """SPEC §3.4: std floored at z_floor · mean|s|; noise-level differences give about uniform weights."""
    bm = torch.ones(1, 2, dtype=torch.bool)
    s_d, zero = torch.tensor([[2.0, 2.00001]]), torch.zeros(1, 2)
    w = fuse_weights(zero, zero, s_d, bm, CompactConfig())
    assert_close(w, torch.full((1, 2), 0.5), atol=1e-3, rtol=0)
    plain = fuse_weights(zero, zero, s_d, bm, CompactConfig(z_floor=0))  # the plain z-score: ±1
    assert_close(plain, torch.softmax(torch.tensor([[1.0, -1.0]]), -1))
    # By hand: s = (1, 2, 6): mean 3, std sqrt(14/3) ≈ 2.16, mean|s| = 3. At z_floor 1 the floor 3
    # wins, Z = (−2/3, −1/3, 1); at z_floor 0.5 the std wins (2.16 > 1.5).
    s = torch.tensor([[1.0, 2.0, 6.0]])
    bm3 = torch.ones(1, 3, dtype=torch.bool)
    w = fuse_weights(s, torch.zeros(1, 3), torch.zeros(1, 3), bm3, CompactConfig(z_floor=1.0))
    assert_close(w, torch.softmax(torch.tensor([[-2 / 3, -1 / 3, 1.0]]), -1))
    std = math.sqrt(14 / 3)
    w = fuse_weights(s, torch.zeros(1, 3), torch.zeros(1, 3), bm3, CompactConfig(z_floor=0.5))
    assert_close(w, torch.softmax(torch.tensor([[-2 / std, -1 / std, 3 / std]]), -1))


def test_fuse_weights_directions():
    bm = torch.ones(1, 3, dtype=torch.bool)
    s, zero = torch.tensor([[0.0, 1.0, 2.0]]), torch.zeros(1, 3)
    assert (fuse_weights(s, zero, zero, bm, CompactConfig()).diff() > 0).all()  # more adaptable: heavier
    assert (fuse_weights(zero, s, zero, bm, CompactConfig()).diff() > 0).all()  # more central: heavier
    assert (fuse_weights(zero, zero, s, bm, CompactConfig()).diff() < 0).all()  # harder: lighter
    assert torch.equal(fuse_weights(s, s, s, bm, CompactConfig(alpha=0, beta=0, gamma=0)), torch.full((1, 3), 1 / 3))


def test_consensus_cosine_hand():
    """sim="cosine" (beyond the paper): logits √C cos(e_i, e_j); two equal branches outvote the orthogonal one."""
    e, never = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]]]), nn.Linear(2, 2)  # projections unused
    sigma = 1 / (1 + math.exp(-math.sqrt(2)))  # softmax([√2, 0])[0]
    want = torch.tensor([[sigma + 0.5, sigma + 0.5, 2 * (1 - sigma)]])
    assert_close(consensus_scores(e, torch.ones(1, 3, dtype=torch.bool), never, never, 1, sim="cosine"), want)


def test_difficulty_scores_hand():
    nll = torch.arange(12.0).view(1, 3, 4)
    rat = torch.tensor([[[0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)  # 2, 3, 0 tokens
    want = torch.tensor([[1.5, 17 / 3, 0.0]])
    assert_close(difficulty_scores(nll, rat), want)
    assert_close(difficulty_scores(nll.masked_fill(~rat, float("inf")), rat), want)  # others unread


def test_consensus_scores_reference():
    torch.manual_seed(0)
    H, G, D, C = 4, 2, 8, 16
    q_proj, k_proj = nn.Linear(C, H * D), nn.Linear(C, G * D)
    e = torch.randn(3, 4, C)
    bm = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        s = consensus_scores(e, bm, q_proj, k_proj, D)
        ref = torch.zeros(3, 4)
        for b in range(3):
            idx = bm[b].nonzero().flatten().tolist()
            if len(idx) < 2:
                continue
            A = torch.zeros(4, 4)
            for h in range(H):
                for i in idx:
                    q = q_proj(e[b, i]).view(H, D)[h]
                    others = [j for j in idx if j != i]
                    logits = torch.stack([q @ k_proj(e[b, j]).view(G, D)[h // (H // G)] for j in others]) / math.sqrt(D)
                    A[i, others] += torch.softmax(logits, 0) / H
            ref[b] = A.sum(0)
    assert_close(s, ref)
    assert_close(s[1], torch.tensor([1.0, 0, 1, 0]))  # two valid branches: both 1
    assert torch.equal(s[2], torch.zeros(4))


def test_consensus_prefers_the_majority():
    """Three branches repeating one path and an outlier: the outlier gets the least incoming weight."""
    C = 8
    eye = nn.Linear(C, C, bias=False)
    eye.weight.data = torch.eye(C)
    u, v = torch.zeros(C), torch.zeros(C)
    u[0], v[1] = 3.0, 3.0
    e = torch.stack([u, u + 0.1 * v, u, v])[None]
    s = consensus_scores(e, torch.ones(1, 4, dtype=torch.bool), eye, eye, 4)
    assert s[0, 3] < s[0, :3].min()
    assert_close(s.sum(), torch.tensor(4.0))  # each row of A sums to 1


def test_mcon_loss_reference_and_detach():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 11, requires_grad=True)
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    valid[1, :, 3] = False  # a shorter answer in instance 1
    bm = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1)

    def ref(logp, detach):
        out = torch.zeros(2, 3)
        for b in range(2):
            idx = bm[b].nonzero().flatten().tolist()
            J = int(valid[b, 0].sum())
            for k in idx:
                others = [i for i in idx if i != k]
                terms = []
                for i in others:
                    pk, pi = logp[b, k, :J], logp[b, i, :J]
                    pi = pi.detach() if detach else pi
                    terms.append((0.5 * (kl(pk, pi) + kl(pi, pk))).mean())
                out[b, k] = sum(terms) / len(terms)
        return out

    for detach in (False, True):
        logp = torch.log_softmax(logits, -1)
        got, want = mcon_loss(logp, valid, bm, detach), ref(torch.log_softmax(logits, -1), detach)
        assert_close(got, want)
        g_got, = torch.autograd.grad(got.sum(), logits)
        g_want, = torch.autograd.grad(want.sum(), logits)
        assert_close(g_got, g_want)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast must not reach the sums over V
            assert_close(mcon_loss(logp, valid, bm, detach), want)
    one = mcon_loss(logp, valid, torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    assert torch.equal(one, torch.zeros(2, 3))


# --- the probe ---

def as_columns(plan):
    return torch.stack([plan.lin[0], plan.half_abs[0], plan.level[0]], -1)


def test_probe_plan_exact_and_sampled():
    # a rationale of 20 tokens with thinking tokens at rationale index 6 and 13 (tokens t = 7 and 14)
    n_rat, think = torch.tensor([20]), torch.zeros(1, 20, dtype=torch.bool)
    think[0, [6, 13]] = True
    m = torch.where(think[0], 1.0, 0.1)
    for cfg in (CompactConfig(mi_budget=0), CompactConfig(mi_budget=21)):  # exact: every prefix 0..20
        plan = probe_plan(n_rat, think, cfg)
        assert plan.prefix.tolist() == [list(range(21))] and plan.valid.all()
        half = torch.cat([torch.zeros(1), m / 2])  # max(d, 0) = d/2 + |d|/2
        assert_close(as_columns(plan), torch.stack([half, half, torch.zeros(21)], -1))
    # Budget 12: I_0 and I_20 (o/2 = 0.05 on each, − and +), both thinking pairs (4 probes, scale 2/2:
    # (θ − o)/2 = 0.45 on d, θ/2 = 0.5 on |d|) and one run of 4 others (5 probes) out of the 5 runs,
    # scaled 5/1 (o/2 · 5 = 0.25 on |d|). The keys pick run 2 (tokens 9..12, prefixes 8..12).
    u_think, u_run = torch.rand(1, 20), torch.ones(1, 5)
    u_run[0, 2] = 0.0
    cfg = CompactConfig(mi_budget=12)
    plan = probe_plan(n_rat, think, cfg)  # exact_plan's rows are replaced by sampled_plan's where over budget
    dense = sampled_plan(n_rat, think, cfg, u_think, u_run)
    t = torch.arange(21)
    probed = dense[0][0]
    assert t[probed].tolist() == [0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 20]
    lin = [0, 0, 0.45, 0, 0, 0, 0, 0, 0, 0.45, 0]
    half_abs = [0, 0, 0.5, 0, 0.25, 0.25, 0.25, 0.25, 0, 0.5, 0]
    level = [-0.05] + [0] * 9 + [0.05]
    assert_close(torch.stack([x[0][probed] for x in dense[1:]], -1), torch.tensor([lin, half_abs, level]).T)
    assert plan.valid.sum() <= 12 and plan.prefix[0, 0] == 0 and plan.prefix[0, plan.valid[0]].max() == 20
    # Thinking share 0.3 of 12: 3 probes, so one of the two thinking pairs, scaled 2/1; then one run.
    u_think[0, 13] = -1.0
    dense = sampled_plan(n_rat, think, CompactConfig(mi_budget=12, mi_think_share=0.3), u_think, u_run)
    probed = dense[0][0]
    assert t[probed].tolist() == [0, 8, 9, 10, 11, 12, 13, 14, 20]
    assert_close(dense[1][0][probed], torch.tensor([0, 0, 0, 0, 0, 0, 0, 0.9, 0]))
    assert_close(dense[2][0][probed], torch.tensor([0, 0, 0.25, 0.25, 0.25, 0.25, 0, 1.0, 0]))
    # Budget 10 leaves room for one pair and one run, whatever the share: no stratum goes unsampled.
    dense = sampled_plan(n_rat, think, CompactConfig(mi_budget=10, mi_think_share=1.0), u_think, u_run)
    assert (dense[1][0] > 0).sum() == 1 and (dense[2][0] == 0.25).sum() == 4


def test_probe_budget_follows_the_rationale_length():
    """The default law: min(256, max(96, ⌈0.4 |R|⌉)); rationales below 96 tokens are probed at every prefix."""
    n = torch.tensor([1, 95, 96, 240, 241, 640, 641, 5000])
    assert probe_budget(n, CompactConfig()).tolist() == [96, 96, 96, 96, 97, 256, 256, 256]
    assert probe_budget(n, CompactConfig(mi_budget=48, mi_budget_frac=0, mi_budget_cap=0)).tolist() == [48] * 8
    assert probe_budget(n, CompactConfig(mi_budget=10, mi_budget_frac=0.5, mi_budget_cap=0))[-1] == 2500
    think = torch.zeros(len(n), int(n.max()), dtype=torch.bool)
    plan = probe_plan(n, think, CompactConfig(), (0,))
    assert plan.valid[:2].sum(-1).tolist() == [2, 96]  # exact: |R| + 1 prefixes
    assert (plan.valid.sum(-1) <= probe_budget(n, CompactConfig())).all()


def test_estimate_from_plan_is_unbiased_and_exact_in_full():
    """mi_estimate over a sampled plan, averaged over 4000 keys, equals Σ_t m_t max(ΔI_t, 0) computed
    directly, for heavy-tailed I with both strata sampled (pure tensors: the plan and the estimate
    alone); and the exact plan gives that sum to rounding."""
    g = torch.Generator().manual_seed(3)
    R, n = 70, 4000
    think = torch.rand(1, R, generator=g) < 0.2
    info = (torch.randn(R + 1, generator=g) * torch.rand(R + 1, generator=g) ** 3 * 4).cumsum(0)  # I_0..I_R
    want = (torch.where(think[0], 1.0, 0.1) * (info[1:] - info[:-1]).clamp(min=0)).sum()
    plan = probe_plan(torch.tensor([R]), think, CompactConfig(mi_budget=0))
    assert_close(mi_estimate(info[plan.prefix], plan), want[None], atol=1e-5, rtol=1e-6)
    fixed = CompactConfig(mi_budget=24, mi_budget_frac=0.0, mi_budget_cap=0)  # 24 probes, whatever |R|
    plan = probe_plan(torch.full((n,), R), think.expand(n, R), fixed, (0,), list(range(n)))
    assert plan.valid.sum(-1).max() <= 24  # the budget holds
    est = mi_estimate(info[plan.prefix], plan)
    assert est.std() > 0.05 * want  # really sampled
    assert abs(est.mean() - want) < 4 * est.std() / math.sqrt(n), (est.mean().item(), want.item())


def test_sample_is_a_function_of_the_key_and_the_instance():
    n_rat, think = torch.tensor([50, 30, 50]), torch.zeros(3, 50, dtype=torch.bool)
    u, runs = sample_keys((7, 3, 0), [0, 0, 1], n_rat, think)
    assert u.shape == (3, 50) and runs.shape == (3, 13) and 0 <= u.min() and u.max() <= 1
    assert torch.equal(u, sample_keys((7, 3, 0), [0, 0, 1], n_rat, think)[0])  # resume: the same sample
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # shared by an instance's branches
    alone = sample_keys((7, 3, 0), [1], n_rat[2:], think[2:, :50])[0]  # no dependence on other instances
    wider = sample_keys((7, 3, 0), [1], n_rat[2:], torch.zeros(1, 90, dtype=torch.bool))[0]  # nor on padding
    assert torch.equal(alone[0], u[2]) and torch.equal(wider[0, :50], u[2])
    assert not torch.equal(u, sample_keys((7, 4, 0), [0, 0, 1], n_rat, think)[0])
    assert not torch.equal(u[0, :13], runs[0])  # the two strata draw apart


@pytest.mark.parametrize("budget", [0, 10])
def test_probe_equals_naive_per_prefix_loop(budget):
    """Every planned I_t of every branch, read in one packed pass over the cached K/V, equals its own forward."""
    model, instances = tiny_model(), standard_instances()
    batch = make_batch(instances)
    branches = [(p, a, rat) for p, a, br in instances for rat, _ in br]
    with torch.no_grad():
        _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
        plan = probe_plan(*rationale_view(batch), CompactConfig(mi_budget=budget), (0,))
        info = probe_information(model, aux.kv, batch, plan)
        ref = torch.zeros_like(info)
        for n, q in plan.valid.nonzero().tolist():
            ref[n, q] = naive_info(model, *branches[n], plan.prefix[n, q].item())
    assert plan.valid.sum() > 10 and (budget == 0 or (plan.valid.sum(-1) < rationale_view(batch)[0] + 1).any())
    assert_close(info, ref, atol=1e-5, rtol=0)
    assert (info[~plan.valid] == 0).all()


def test_probe_log_likelihood_is_fp32_under_bf16_autocast():
    """The probe's LM head and log-softmax ignore autocast: max(ΔI, 0) would turn rounding into gain."""
    model = tiny_model(9)
    g = torch.Generator().manual_seed(9)
    h, y = torch.randn(6, 64, generator=g) * 3, torch.randint(0, V, (6,), generator=g)
    want = token_nll(model.lm_head, h, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(token_nll(model.lm_head, h, y, fp32=True), want, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(token_nll(model.lm_head, h, y), want, atol=1e-6, rtol=1e-6)  # the bf16 head


def packed_s_mi(model, batch, cfg, rng_key=()):
    """adaptability_scores [N] of a packed row: the probe over its K/V, branches grouped by instance."""
    _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
    instance = (batch["slot"] // batch["branch_mask"].shape[1]).tolist()
    info = partial(probe_information, model, aux.kv, batch)
    return adaptability_scores(info, *rationale_view(batch), cfg, rng_key, instance)


def test_adaptability_scores_exact_eq3():
    """mi_budget=0: S_MI = (1/|R|) Σ_t m_t max(I_t − I_{t−1}, 0), every I_t from its own forward."""
    model, instances = tiny_model(1), standard_instances(1)
    batch = make_batch(instances)
    cfg = CompactConfig(mi_budget=0, think_weight=1.0, other_weight=0.3)
    with torch.no_grad():
        s = packed_s_mi(model, batch, cfg)
    want = naive_s_mi(model, instances, cfg).flatten()[batch["slot"]]
    assert_close(s, want, atol=1e-6, rtol=1e-5)
    assert (s[:-1] > 0).all()


def test_sampled_s_mi_is_unbiased():
    """The mean of many sampled estimates (one per instance copy and key) matches exact Eq. 3 within
    4 standard errors, with both strata sampled: 12 thinking tokens and 15 runs, budget 24."""
    model = tiny_model(10)
    g = torch.Generator().manual_seed(10)
    prompt, answer, rat = rand_ids(g, 4), rand_ids(g, 2), rand_ids(g, 60)
    branch = (rat, list(range(2, 60, 5)))
    batch = make_batch([(prompt, answer, [branch])] * 60)
    cfg = CompactConfig(mi_budget=24, mi_budget_frac=0.0, mi_budget_cap=0, think_weight=1.0, other_weight=0.3)
    with torch.no_grad():
        exact = packed_s_mi(model, batch, CompactConfig(mi_budget=0, other_weight=0.3))
        est = torch.cat([packed_s_mi(model, batch, cfg, rng_key=(key,)) for key in range(5)])
    assert_close(exact, exact[:1].expand(60))  # the same branch 60 times: one exact value
    assert est.std() > 0.02 * exact[0]  # really sampled
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact[0]) < 4 * se, (est.mean().item(), exact[0].item(), se.item())
    plan = probe_plan(*rationale_view(batch), cfg, (0,))
    assert plan.valid.sum(-1).max() <= 24  # the budget holds


def test_branches_of_an_instance_share_the_sample():
    """Common random numbers: two identical branches get the identical estimate (independent
    samples would differ); the same branch in another instance gets another sample."""
    model = tiny_model(11)
    g = torch.Generator().manual_seed(11)
    prompt, answer, rat = rand_ids(g, 4), rand_ids(g, 2), rand_ids(g, 40)
    branch = (rat, list(range(1, 40, 6)))
    batch = make_batch([(prompt, answer, [branch, branch])] * 2)
    with torch.no_grad():
        s = compact_loss(model, batch, CompactConfig(mi_budget=12), rng_key=(5,))[1]["s_mi"]
    assert s[0, 0] == s[0, 1] and s[1, 0] == s[1, 1] and s[0, 0] != s[1, 0]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_packed_row_equals_each_branch_alone(family):
    """The packed step (each prompt once, no padding, per-branch attention) against each branch alone as one
    plain sequence, on branches of very different lengths: loss, gradients, S_D, S_G, exact and sampled S_MI,
    L_SFT, L_MCon, to fp32 rounding. Llama: no biases, MHA on the KV side too; Qwen2: q/k/v biases, GQA."""
    kw = dict(qkv_bias=False, num_key_value_heads=4, num_hidden_layers=3) if family == "llama" else {}
    model, instances = tiny_model(12, **kw), long_and_short(12)
    batch = make_batch(instances)
    assert len(batch["input_ids"]) == sum(len(p) + sum(len(r) + len(CUE + a) + 2 for r, _ in br) for p, a, br in instances)
    cfg = CompactConfig(mi_budget=0, mcon_lambda=0.5)
    params = list(model.parameters())
    loss, st = compact_loss(model, batch, cfg)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        s_d, s_g = reference_scores(model, instances)
        s_mi = naive_s_mi(model, instances, cfg)
    assert_close(st["s_d"], s_d)
    assert_close(st["s_g"], s_g)
    assert_close(st["s_mi"], s_mi, atol=1e-6, rtol=1e-5)
    l_sft, l_mcon = slow_branch_losses(model, instances)
    assert_close(st["l_sft"], l_sft.detach())
    assert_close(st["l_mcon"], l_mcon.detach())
    w = fuse_weights(s_mi, s_g, s_d, batch["branch_mask"], cfg)
    assert_close(st["weight"], w)
    want = (w * (l_sft + 0.5 * l_mcon)).sum() / len(instances)
    assert_close(loss, want)
    for g, r in zip(grads, torch.autograd.grad(want, params)):
        assert_close(g, r, atol=1e-6, rtol=1e-4)
    assert_close(st["weight_entropy"], -(w[w > 0] * w[w > 0].log()).sum() / len(instances))
    sampled = CompactConfig(mi_budget=12)  # the sample is a function of the key and the instance alone:
    with torch.no_grad():
        _, st_row = compact_loss(model, batch, sampled, rng_key=(3,))
        alone = [compact_loss(model, make_batch([inst]), sampled, rng_key=(3,))[1]["s_mi"][0] for inst in instances[:1]]
    assert_close(st_row["s_mi"][0], alone[0])


# --- the objective ---

@pytest.mark.parametrize("trainable", [False, True])
def test_token_nll_gradients_equal_plain_cross_entropy(trainable):
    """The chunked linear + cross-entropy (gradient in the forward chunk, or recomputed for a trained
    head) against F.cross_entropy on full logits: values, h-grad and W-grad under per-row upstream grads."""
    g = torch.Generator().manual_seed(0)
    M, C, Vb = 37, 16, 50
    head = nn.Linear(C, Vb, bias=False)
    head.weight.requires_grad_(trainable)
    h = torch.randn(M, C, generator=g, requires_grad=True)
    y, up = torch.randint(0, Vb, (M,), generator=g), torch.rand(M, generator=g)
    nll = token_nll(head, h, y, rows=8)  # 5 chunks, the last one short
    want = F.cross_entropy(head(h), y, reduction="none")
    assert_close(nll, want)
    wrt = [h, head.weight] if trainable else [h]
    assert_close(torch.autograd.grad((nll * up).sum(), wrt), torch.autograd.grad((want * up).sum(), wrt))
    with torch.no_grad():
        assert_close(token_nll(head, h, y, rows=8), want.detach())
    assert token_nll(head, h[:0], y[:0]).shape == (0,)


@pytest.mark.parametrize("trainable", [False, True])
def test_token_nll_under_bf16_autocast(trainable):
    """Matmuls in bf16, logits and softmax in fp32: within bf16 rounding of the plain autocast path."""
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(32, 64, bias=False)
    head.weight.requires_grad_(trainable)
    h = torch.randn(20, 32, generator=g, requires_grad=True)
    y, up = torch.randint(0, 64, (20,), generator=g), torch.rand(20, generator=g)
    wrt = [h, head.weight] if trainable else [h]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = token_nll(head, h, y, rows=6)
        want = F.cross_entropy(head(h).float(), y, reduction="none")
    assert nll.dtype == torch.float32
    assert_close(nll, want, atol=1e-2, rtol=1e-2)
    for got, ref in zip(torch.autograd.grad((nll * up).sum(), wrt), torch.autograd.grad((want * up).sum(), wrt)):
        assert got.dtype == ref.dtype
        assert_close(got, ref, atol=1e-2, rtol=2e-2)



READINGS = {"mi_norm": ("length", "s_mi"), "sg_feature": ("last", "s_g"), "sg_self_loops": (True, "s_g"),
            "sg_heads": ("joint", "s_g"), "sg_similarity": ("cosine", "s_g")}


@pytest.mark.parametrize("flag", list(READINGS) + ["sg_feature=mean"])
def test_each_reading_changes_its_score_and_only_that(flag):
    """Every reading of SPEC's Decisions is a flag: it changes the score it names (as the plain per-branch
    reference computes it) and leaves the others untouched."""
    flag, value = flag.split("=") if "=" in flag else (flag, READINGS[flag][0])
    score = READINGS[flag][1]
    model, instances = tiny_model(13, num_hidden_layers=3), long_and_short(13)
    batch, base = make_batch(instances), CompactConfig(mi_budget=0)
    with torch.no_grad():
        _, st = compact_loss(model, batch, base)
        _, alt = compact_loss(model, batch, replace(base, **{flag: value}))
    for key in ("s_mi", "s_g", "s_d", "l_sft", "l_mcon"):
        assert torch.equal(st[key], alt[key]) != (key == score), key
    if flag == "mi_norm":  # the sum over |R|: the per-token score
        n = torch.tensor([[len(r) for r, _ in br] + [0] * (4 - len(br)) for *_, br in instances], dtype=torch.float)
        assert_close(alt["s_mi"] * n, st["s_mi"])
    else:
        with torch.no_grad():
            want = reference_scores(model, instances, **{"feature": value} if flag == "sg_feature" else
                                    {"self_loops": True} if flag == "sg_self_loops" else
                                    {"similarity": value} if flag == "sg_similarity" else {"heads": value})[1]
        assert_close(alt["s_g"], want)


def test_gradient_is_weighted_sum_of_task_vectors():
    """Eq. 1 = Eq. 11: ∇(Σ_k w_k L_k) = Σ_k w_k ∇L_k, each L_k from full logits, branch by branch."""
    model, instances = tiny_model(2), standard_instances(2)
    cfg = CompactConfig(mi_budget=10, mcon_lambda=0.5)
    params = [p for p in model.parameters()]
    loss, st = compact_loss(model, make_batch(instances), cfg)
    grads = torch.autograd.grad(loss, params)
    l_sft, l_mcon = slow_branch_losses(model, instances)
    assert_close(st["l_sft"], l_sft.detach())
    assert_close(st["l_mcon"], l_mcon.detach())
    assert_close(st["loss"], st["sft"] + 0.5 * st["mcon"])
    ref = [torch.zeros_like(p) for p in params]
    for b, k in make_batch(instances)["branch_mask"].nonzero().tolist():
        g_k = torch.autograd.grad(l_sft[b, k] + 0.5 * l_mcon[b, k], params, retain_graph=True, allow_unused=True)
        for r, g in zip(ref, g_k):
            if g is not None:
                r += st["weight"][b, k] * g / len(instances)
    for g, r in zip(grads, ref):
        assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_mcon_reads_the_predicting_positions():
    """log P^j comes from the logits at the row before answer token j (its prev); the answer's own row differs."""
    model, instances = tiny_model(3), standard_instances(3)
    batch = make_batch(instances)
    with torch.no_grad():
        h = packed_forward(model, batch, return_hidden=True)
        logp, valid = answer_logprobs(model.lm_head, h, batch["prev"], batch["answer_rows"])
        full = torch.log_softmax(model.lm_head(h), -1)
    for n, rows in enumerate(batch["answer_rows"].tolist()):
        at = torch.tensor([r for r in rows if r >= 0])
        assert_close(logp[n, :len(at)], full[at - 1])
        assert valid[n].sum() == len(at)
        assert not torch.allclose(logp[n, :len(at)], full[at])


def test_packing_instances_together_changes_nothing():
    """A packed row of three instances gives each instance what it gets alone: no attention across
    instances or branches (per-branch losses, scores, weights; loss adds up with n_instances)."""
    model, instances = tiny_model(4), standard_instances(4)
    cfg = CompactConfig(mi_budget=0)
    loss, st = compact_loss(model, make_batch(instances), cfg)
    parts = [compact_loss(model, make_batch([inst]), cfg, n_instances=3) for inst in instances]
    assert_close(sum(p[0] for p in parts), loss)
    for b, (_, s) in enumerate(parts):
        for key in ("weight", "s_mi", "s_g", "s_d", "l_sft", "l_mcon"):
            k = s[key].shape[1]
            assert_close(st[key][b, :k], s[key][0])
            assert (st[key][b, k:] == 0).all()


def test_degenerate_batches_stay_finite():
    """One-branch instances, empty rationales, identical branches (zero std)."""
    model = tiny_model(5)
    g = torch.Generator().manual_seed(5)
    r = lambda n: rand_ids(g, n)
    same = r(6)
    batch = make_batch([
        (r(3), r(2), [([], [])]),  # one branch, empty rationale
        (r(3), r(1), [(same, [0]), (same, [0]), ([], [])]),  # identical branches: zero std
        (r(4), r(2), [(r(5), [])]),
    ])
    for cfg in (CompactConfig(mi_budget=0), CompactConfig(mi_budget=10), CompactConfig(weighting="uniform")):
        model.zero_grad()
        loss, st = compact_loss(model, batch, cfg)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(v).all() for v in st.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert_close(st["weight"].sum(-1), torch.tensor([1.0, 1, 1]))
        assert st["weight"][0, 0] == 1 and st["weight"][2, 0] == 1
        assert (st["l_mcon"][[0, 2]] == 0).all() and (st["s_mi"][0] == 0).all()
        assert_close(st["l_mcon"][1, 0], st["l_mcon"][1, 1])


def test_easier_rationale_is_less_difficult():
    """A rationale the student would write itself (greedy) has lower S_D than random tokens."""
    from model import generate

    model = tiny_model(6)
    g = torch.Generator().manual_seed(6)
    prompt, answer = rand_ids(g, 4), rand_ids(g, 2)
    greedy = generate(model, [prompt], max_new_tokens=10)[0]
    batch = make_batch([(prompt, answer, [(greedy, []), (rand_ids(g, 10), [])])])
    _, st = compact_loss(model, batch, CompactConfig(alpha=0, beta=0))
    assert st["s_d"][0, 0] < st["s_d"][0, 1]
    assert st["weight"][0, 0] > st["weight"][0, 1]


def test_instances_count_once_across_micro_batches():
    """Two halves with n_instances = B add up to the whole batch (the trainer's normalisation)."""
    model, instances = tiny_model(7), standard_instances(7)
    cfg = CompactConfig(mi_budget=10)
    whole, st = compact_loss(model, make_batch(instances), cfg)
    parts = [compact_loss(model, make_batch(instances[s]), cfg, n_instances=3)[0] for s in (slice(0, 1), slice(1, 3))]
    assert_close(parts[0] + parts[1], whole)
    assert_close(st["tokens"], make_batch(instances)["sft_mask"].sum())


def test_ddp_style_wrapper_trains_through_the_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    model, batch = tiny_model(8), make_batch(standard_instances(8))
    wrapped = Wrapper(model)
    loss, _ = compact_loss(wrapped, batch, CompactConfig(mi_budget=10))
    assert wrapped.calls == 1
    assert_close(loss, compact_loss(model, batch, CompactConfig(mi_budget=10))[0])
