"""COMPACT: compatibility-aware multi-teacher chain-of-thought distillation (arXiv 2601.13992).

SPEC.md §2-§4 top to bottom: three scores of each teacher's rationale read from the student
itself (adaptability S_MI, consensus S_G, difficulty S_D), fused into per-instance weights, and
the weighted loss Σ_k w_k (L_SFT,k + λ L_MCon,k), whose one backward is Σ_k w_k τ_k (Eq. 1 = 11).

    loss, stats = compact_loss(model, batch, CompactConfig())   # batch: data.collate (SPEC §9)

One training forward serves S_D, S_G, L_SFT and L_MCon; S_MI costs one no-grad pass of short
probe blocks over the training pass's K/V. After the method come its two approximations: S_MI
under a probe budget, and the NLL without [M, V] logits. Left out: the optimizer step.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from data import derive_seed
from model import KVCache


@dataclass
class CompactConfig:
    """The method's settings (SPEC §3-§4); train.py makes a flag of each field.

    S_MI is exact Eq. 3 with mi_budget = 0, else an unbiased estimate from at most mi_budget probes per
    branch (sampled_plan), exact whenever |R| + 1 <= mi_budget; 48 is the smallest budget that met Kendall
    tau 0.8 and 15% error against exact Eq. 3 on bench.py's agreement students (README, S_MI).
    """
    weighting: str = "compact"  # "compact" (Eq. 7) or "uniform" (w_k = 1/K_valid, "Direct Avg.")
    alpha: float = 1.0  # weight of Z(S_MI); 0 switches it off and skips the probe pass (--no-mi)
    beta: float = 1.0  # weight of Z(S_G); 0 switches it off (--no-consensus)
    gamma: float = 1.0  # weight of Z(S_D); 0 switches it off (--no-difficulty)
    temperature: float = 1.0  # T of the softmax in Eq. 7
    mcon_lambda: float = 0.1  # λ of Eq. 10; 0 drops the consistency loss and its logits
    mcon_detach: bool = False  # BKL treats the other branch as a fixed target
    mi_budget: int = 48  # S_MI probes per branch (sampled_plan); 0 = exact Eq. 3 (every rationale position)
    mi_think_share: float = 0.5  # at most this share of mi_budget goes to thinking-token pairs
    z_floor: float = 0.01  # Z's std is floored at z_floor · mean|s| (SPEC §3.4); 0 = the plain z-score
    think_weight: float = 1.0  # m_t for a token that starts a thinking word
    other_weight: float = 0.1  # m_t for every other rationale token

    def __post_init__(self):
        if self.weighting not in ("compact", "uniform"):
            raise ValueError(f"weighting must be 'compact' or 'uniform', got {self.weighting!r}")
        if min(self.alpha, self.beta, self.gamma, self.mcon_lambda, self.think_weight, self.other_weight) < 0:
            raise ValueError("alpha, beta, gamma, mcon_lambda, think_weight and other_weight must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mi_budget < 0 or self.z_floor < 0 or not 0 <= self.mi_think_share <= 1:
            raise ValueError("mi_budget and z_floor must be >= 0, mi_think_share in [0, 1]")
        if 0 < self.mi_budget < MIN_BUDGET:
            raise ValueError(f"mi_budget must be 0 (exact) or >= {MIN_BUDGET}")


# --- the three scores (SPEC §3), each [B, K], computed under no_grad ---

def difficulty_scores(nll, rationale_mask):
    """S_D (SPEC §3.3, Eq. 6): mean NLL of the rationale tokens, [B, K, T] -> [B, K].

    nll[..., t] is token t's loss from the training pass (read at t−1), detached. An empty rationale scores 0.
    """
    m = rationale_mask.float()
    return (nll * m).sum(-1) / m.sum(-1).clamp(min=1)


def consensus_scores(e, branch_mask, q_proj, k_proj, head_dim):
    """S_G (SPEC §3.2, Eq. 4-5): incoming attention of each branch in the graph of branches.

    e [B, K, C]: the final layer's attention input at each branch's last real token (its eot).
    q = W_Q e + b, κ = W_K e + b, KV heads repeated for GQA, no RoPE. Per head A_ij = softmax_j(q_i·κ_j/√D)
    over valid j ≠ i (Decision: no self-loops), A = mean over heads, S_G,k = Σ_{i≠k} A_ik.
    """
    B, K, _ = e.shape
    q = q_proj(e).float().view(B, K, -1, head_dim)  # (B, K, H, D)
    kappa = k_proj(e).float().view(B, K, -1, head_dim)  # (B, K, G, D)
    kappa = kappa.repeat_interleave(q.shape[2] // kappa.shape[2], dim=2)  # (B, K, H, D)
    with full_precision(e):
        logits = torch.einsum("bihd,bjhd->bhij", q, kappa) / math.sqrt(head_dim)  # (B, H, K, K)
    eye = torch.eye(K, dtype=torch.bool, device=e.device)
    edge = branch_mask[:, :, None] & branch_mask[:, None, :] & ~eye  # (B, K, K): i may attend to j
    attn = torch.softmax(logits.masked_fill(~edge[:, None], float("-inf")), dim=-1)
    attn = torch.where(edge[:, None], attn, 0.0).mean(1)  # (B, K, K); all-masked rows (NaN) -> 0
    return attn.sum(1)  # column sums: the weight flowing into k


def adaptability_scores(raw, kv, batch, cfg, rng_key=()):
    """S_MI (SPEC §3.1, Eq. 2-3): (1/|R_k|) Σ_t m_t max(I_t − I_{t−1}, 0), [B, K].

    probe_plan says which prefixes I_t to read and what each counts for: all of them, or past the
    budget an unbiased sample drawn per instance from rng_key (train.py: seed, step, rank,
    micro-batch) and shared by its branches. kv: the training pass's per-layer K/V, detached.
    """
    B, K, T = batch["input_ids"].shape
    flat = {k: batch[k].reshape(B * K, T) for k in ("attention_mask", "rationale_mask", "think_mask")}
    n_rat, think, start = rationale_view(flat["rationale_mask"], flat["think_mask"])
    plan = probe_plan(n_rat, think, cfg, rng_key, instance=[n // K for n in range(B * K)])
    if not bool(plan.valid.any()):  # no rationale anywhere: nothing to probe
        return torch.zeros(B, K, device=n_rat.device)
    pos = start[:, None] - 1 + plan.prefix  # the probe block of prefix t sits after main token start + t − 1
    probe = batch["probe_ids"].repeat_interleave(K, 0), batch["probe_answer_mask"].repeat_interleave(K, 0)
    info = probe_log_likelihood(raw, kv, flat["attention_mask"], pos, plan.valid, *probe)  # (N, Q)
    return (mi_estimate(info, plan) / n_rat.clamp(min=1)).view(B, K)


# --- the exact S_MI probe: every prefix, one pass ---

class Plan(NamedTuple):
    """The prefixes I_t the probe reads, in order, [N, Q], and what each counts for in mi_estimate."""
    prefix: torch.Tensor  # long: rationale tokens seen (0 = I_0, before the rationale)
    valid: torch.Tensor  # bool
    lin: torch.Tensor  # coefficient of d_q = I_q − I_{q−1} (0 unless prefix[q−1] = prefix[q] − 1)
    half_abs: torch.Tensor  # coefficient of |d_q|
    level: torch.Tensor  # coefficient of I_q itself


def rationale_view(rationale_mask, think_mask):
    """Masks [N, T] -> |R| [N], think flags in rationale order [N, max |R|], first rationale position [N]."""
    N, T = rationale_mask.shape
    idx = torch.arange(T, device=rationale_mask.device)
    n_rat = rationale_mask.sum(-1)
    pos = torch.where(rationale_mask, idx, T + idx).sort(-1).values[:, :int(n_rat.max())]
    think = think_mask.gather(1, pos.clamp(max=T - 1)) & (pos < T)
    return n_rat, think, pos[:, 0] if pos.shape[1] else torch.full((N,), T, device=idx.device)


def exact_plan(n_rat, think, cfg):
    """Every prefix 0..|R|: Eq. 3 exactly, since max(d, 0) = (d + |d|)/2 gives lin = half_abs = m_t/2.
    Per-prefix tensors [N, 1 + max |R|]: (probed, lin, half_abs, level); token t's terms sit at prefix t."""
    m = F.pad(torch.where(think, cfg.think_weight, cfg.other_weight), (1, 0)) / 2
    return torch.ones_like(m, dtype=torch.bool), m, m, torch.zeros_like(m)


def probe_plan(n_rat, think, cfg, rng_key=(), instance=None):
    """Plan for branches with n_rat [N] rationale tokens and their think flags [N, R] (SPEC §3.1):
    exact_plan where |R| + 1 <= mi_budget (or mi_budget = 0), sampled_plan's estimate elsewhere."""
    plan = exact_plan(n_rat, think, cfg)
    over = n_rat + 1 > cfg.mi_budget if cfg.mi_budget else torch.zeros_like(n_rat, dtype=torch.bool)
    if bool(over.any()):
        sampled = sampled_plan(n_rat, think, cfg, *sample_keys(rng_key, instance or range(len(n_rat)), n_rat, think))
        plan = tuple(torch.where(over[:, None], s, e) for s, e in zip(sampled, plan))
    probed, lin, half_abs, level = plan
    t = torch.arange(probed.shape[1], device=probed.device)
    probed = probed & (t <= n_rat[:, None]) & (n_rat[:, None] > 0)
    Q = int(probed.sum(-1).max())
    prefix = torch.where(probed, t, t.numel() + t).sort(-1).values[:, :Q]  # probed prefixes first, in order
    valid = prefix < t.numel()
    prefix = torch.where(valid, prefix, 0)
    pick = lambda x: torch.where(valid, x.gather(1, prefix), 0.0)
    return Plan(prefix, valid, pick(lin), pick(half_abs), pick(level))


def mi_estimate(info, plan):
    """Σ_t m_t max(ΔI_t, 0), exact or estimated, from probed I [N, Q]: Σ_q lin_q d_q + half_abs_q |d_q|
    + level_q I_q with d_q = I_q − I_{q−1} (q >= 1) -> [N]."""
    d = info[:, 1:] - info[:, :-1]
    return (plan.lin[:, 1:] * d + plan.half_abs[:, 1:] * d.abs()).sum(-1) + (plan.level * info).sum(-1)


#   The probe pass: one block of cue ⊕ y per probed position, up to PROBE_ROW blocks to a row.
#   Block b sees the cached main tokens <= pos_b (real ones only) and its own earlier tokens;
#   its position ids continue from pos_b + 1. Here pos = (2, 4), probe = c1 c2 y1 (y1 is the last
#   probe token: its output predicts nothing, so it is never fed):
#
#                    main tokens (cache)  block 0  block 1
#                    0  1  2  3  4  5  6 | c1 c2  | c1 c2
#   block 0   c1@3   x  x  x  .  .  .  . | x  .   | .  .
#   pos=2     c2@4   x  x  x  .  .  .  . | x  x   | .  .
#   block 1   c1@5   x  x  x  x  x  .  . | .  .   | x  .
#   pos=4     c2@6   x  x  x  x  x  .  . | .  .   | x  x
#
#   c2's output predicts y1, so I = Σ log p(y_j) is read one token early, as everywhere.

PROBE_ROW = 4  # blocks per row: short rows pad less and each query scans T + 4·P keys, not T + Q·P


def probe_block_mask(pos, valid, attention_mask, P):
    """Bool [R, n·P, T + n·P]: who each probe token may see, R rows of n blocks (the diagram above).

    pos, valid [R, n]; attention_mask [R, T]. Main part: key s <= the block's pos, if s is a real
    token and the block valid. Probe part: same block, key j' <= query j (block-causal)."""
    R, n = pos.shape
    T = attention_mask.shape[1]
    see_main = (torch.arange(T, device=pos.device) <= pos[:, :, None]) & attention_mask[:, None] & valid[:, :, None]
    see_main = see_main[:, :, None].expand(R, n, P, T).reshape(R, n * P, T)  # (R, nP, T)
    i = torch.arange(n * P, device=pos.device)
    blk, j = i // P, i % P
    see_probe = (blk[:, None] == blk[None, :]) & (j[None, :] <= j[:, None])  # (nP, nP)
    return torch.cat([see_main, see_probe.expand(R, -1, -1)], dim=-1)  # (R, nP, T + nP)


def probe_log_likelihood(raw, kv, attention_mask, pos, valid, probe_ids, probe_answer_mask):
    """I [N, Q] = log p(y | x, r_<=pos) for every probed position, in one no-grad pass (Eq. 2).

    kv: the training pass's per-layer (k, v) [N, G, T, D]; probe_ids, probe_answer_mask [N, P] (cue ⊕ y,
    then padding). Blocks go PROBE_ROW to a row, rows with no valid block are skipped, invalid blocks score
    0. The LM head runs in fp32 under bf16 autocast: max(ΔI, 0) would turn rounding noise into gain.
    """
    N, T = attention_mask.shape
    Q, P = pos.shape[1], probe_ids.shape[1] - 1  # the last probe token predicts nothing: not fed
    if bool(probe_answer_mask[:, 0].any()):
        raise ValueError("the probe's first token must be the cue, not an answer token")
    dev = pos.device
    per_row = min(PROBE_ROW, Q)
    n_rows = -(-Q // per_row)
    pos_r = F.pad(pos, (0, n_rows * per_row - Q)).view(N * n_rows, per_row)  # (N·rows, per_row)
    valid_r = F.pad(valid, (0, n_rows * per_row - Q)).view(N * n_rows, per_row)
    keep = valid_r.any(-1)
    src = torch.arange(N, device=dev).repeat_interleave(n_rows)[keep]  # (R,): each row's branch
    pos_r, valid_r = pos_r[keep], valid_r[keep]
    R = src.numel()
    ids = probe_ids[src, None, :-1].expand(R, per_row, P).reshape(R, per_row * P)
    position_ids = (pos_r[:, :, None] + 1 + torch.arange(P, device=dev)).reshape(R, per_row * P)
    mask = probe_block_mask(pos_r, valid_r, attention_mask[src], P)
    cache = [KVCache.from_kv(k[src], v[src], per_row * P) for k, v in kv]
    h = raw(ids, position_ids=position_ids, mask=mask, cache=cache, return_hidden=True).view(R, per_row, P, -1)
    scored = probe_answer_mask[src, None, 1:] & valid_r[:, :, None]  # (R, per_row, P): token j predicts j+1
    targets = probe_ids[src, None, 1:].expand(R, per_row, P)
    logp = -token_nll(raw.lm_head, h[scored], targets[scored], fp32=True)
    info = torch.zeros(N * n_rows, per_row, device=dev)
    info[keep] = torch.zeros(scored.shape, device=dev).masked_scatter(scored, logp).sum(-1)
    return info.view(N, n_rows * per_row)[:, :Q]


# --- fusion (SPEC §3.4) and the consistency loss (SPEC §4) ---

def fuse_weights(s_mi, s_g, s_d, branch_mask, cfg):
    """w [B, K] (SPEC §3.4, Eq. 7): softmax((α Z(S_MI) + β Z(S_G) − γ Z(S_D)) / T) per instance.

    Z(s) = (s − mean) / max(std, z_floor · mean|s|, 1e-6) over the instance's valid branches (population
    std). Padding branches get weight 0; uniform weighting gives exactly 1/K_valid.
    """
    m = branch_mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1)
    if cfg.weighting == "uniform":
        return m / n
    def z(s):
        s = torch.where(branch_mask, s.float(), 0.0)
        mean = s.sum(-1, keepdim=True) / n
        std = (((s - mean) ** 2 * m).sum(-1, keepdim=True) / n).sqrt()
        floor = (cfg.z_floor * s.abs().sum(-1, keepdim=True) / n).clamp(min=1e-6)
        return torch.where(branch_mask, (s - mean) / torch.maximum(std, floor), 0.0)
    logit = (cfg.alpha * z(s_mi) + cfg.beta * z(s_g) - cfg.gamma * z(s_d)) / cfg.temperature
    w = torch.softmax(logit.masked_fill(~branch_mask, float("-inf")), dim=-1)
    return torch.where(branch_mask, w, 0.0)  # an all-padding instance (NaN row) weighs nothing


def mcon_loss(logp, answer_valid, branch_mask, detach=False):
    """L_MCon [B, K] (SPEC §4, Eq. 9): mean over valid i ≠ k of BKL(k, i), as in MCC-KD.

    logp [B, K, J, V]: log P_k^j at the position predicting answer token j; answer_valid [B, K, J].
    BKL(k,i) = mean_j ½[KL(P_k‖P_i) + KL(P_i‖P_k)] = ½ Σ_v (P_k log P_k + P_i log P_i − P_k log P_i − P_i
    log P_k): no [K, K, V] tensor. detach: the other side is a fixed target. 0 with no valid partner.
    """
    K = logp.shape[1]
    p = logp.exp()
    p_o, logp_o = (p.detach(), logp.detach()) if detach else (p, logp)
    neg_ent, neg_ent_o = (p * logp).sum(-1), (p_o * logp_o).sum(-1)  # (B, K, J)
    with full_precision(logp):  # BKL is a small difference of large sums over V
        cross_ki = torch.einsum("bkjv,bijv->bkij", p, logp_o)  # Σ_v P_k log P_i
        cross_ik = torch.einsum("bijv,bkjv->bkij", p_o, logp)  # Σ_v P_i log P_k
    bkl = 0.5 * (neg_ent[:, :, None] - cross_ki + neg_ent_o[:, None] - cross_ik)  # (B, K, K, J)
    both = answer_valid[:, :, None] & answer_valid[:, None]
    bkl = torch.where(both, bkl, 0.0).sum(-1) / both.sum(-1).clamp(min=1)  # (B, K, K)
    eye = torch.eye(K, dtype=torch.bool, device=logp.device)
    edge = branch_mask[:, :, None] & branch_mask[:, None] & ~eye
    return torch.where(edge, bkl, 0.0).sum(-1) / edge.sum(-1).clamp(min=1)


def answer_logprobs(lm_head, hidden, answer_mask):
    """log P_k^j [N, J, V] and its validity [N, J]: the answer tokens in order, each read at the
    position that predicts it (one before the token), so answers align by index j across branches."""
    N, T, C = hidden.shape
    J = int(answer_mask.sum(-1).max())
    idx = torch.arange(T, device=hidden.device)
    pos = torch.where(answer_mask, idx, T + idx).sort(-1).values[:, :J]  # (N, J) answer positions
    valid = pos < T
    before = torch.where(valid, pos - 1, 0).clamp(min=0)
    h = hidden.gather(1, before[:, :, None].expand(N, J, C))  # (N, J, C)
    return torch.log_softmax(lm_head(h).float(), dim=-1), valid


# --- the objective (SPEC §2, §4) ---

def compact_loss(model, batch, cfg, n_instances=None, rng_key=()):
    """(loss, stats) for one batch (SPEC §9 dict): loss = Σ_b Σ_k w_bk L_bk / n_instances (Eq. 8-11).

    L_k = L_SFT,k + λ L_MCon,k; w from the scores under no_grad, detached, so one backward gives Σ_k w_k ∇L_k.
    n_instances: instances of the whole optimizer step, all micro-batches and ranks (default B). stats:
    [B, K] s_mi s_g s_d weight l_sft l_mcon; scalars loss, sft, mcon, weight_entropy, tokens. Decision:
    scores are read in the model's current mode (LoRA dropout on while training, as in the K/V the probe reuses).
    """
    raw = getattr(model, "module", model)  # DDP: train through the wrapper, score with the module
    ids, bm = batch["input_ids"], batch["branch_mask"]
    B, K, T = ids.shape
    n_instances = B if n_instances is None else n_instances
    flat = lambda x: x.reshape(B * K, *x.shape[2:])
    # Right padding + the default causal mask: real tokens never see padding.
    hidden, aux = model(flat(ids), return_hidden=True, return_aux=True)  # (BK, T, C)

    sft = flat(batch["sft_mask"]) & flat(bm[:, :, None].expand(B, K, T))
    sel = sft[:, 1:]  # token t is read from the logits at t−1
    nll = token_nll(raw.lm_head, hidden[:, :-1][sel], flat(ids)[:, 1:][sel])
    nll = F.pad(torch.zeros(sel.shape, device=ids.device).masked_scatter(sel, nll), (1, 0)).view(B, K, T)
    l_sft = nll.sum(-1) / sft.view(B, K, T).sum(-1).clamp(min=1)
    l_mcon = torch.zeros(B, K, device=ids.device)
    if cfg.mcon_lambda > 0:  # no answer tokens: J = 0 and the loss is 0
        logp, valid = answer_logprobs(raw.lm_head, hidden, flat(batch["answer_mask"]))
        l_mcon = mcon_loss(logp.view(B, K, *logp.shape[1:]), valid.view(B, K, -1), bm, cfg.mcon_detach)

    with torch.no_grad():
        s_d = difficulty_scores(nll.detach(), batch["rationale_mask"])
        last = (flat(batch["attention_mask"]).sum(-1) - 1).clamp(min=0)  # the eot of each branch
        e = aux.final_attn_input.detach()[torch.arange(B * K, device=ids.device), last].view(B, K, -1)
        attn = raw.model.layers[-1].self_attn
        s_g = consensus_scores(e, bm, attn.q_proj, attn.k_proj, raw.args.head_dim)
        s_mi = torch.zeros(B, K, device=ids.device)
        if cfg.weighting == "compact" and cfg.alpha > 0:  # the only score that costs a pass
            s_mi = adaptability_scores(raw, [(k.detach(), v.detach()) for k, v in aux.kv], batch, cfg, rng_key)
        w = fuse_weights(s_mi, s_g, s_d, bm, cfg)

    per_branch = l_sft + cfg.mcon_lambda * l_mcon
    loss = (w * per_branch).sum() / n_instances
    stats = dict(s_mi=s_mi, s_g=s_g, s_d=s_d, weight=w, l_sft=l_sft.detach(), l_mcon=l_mcon.detach(),
                 loss=loss.detach(), sft=(w * l_sft).sum().detach() / n_instances,
                 mcon=(w * l_mcon).sum().detach() / n_instances, tokens=sft.sum(),
                 weight_entropy=-torch.special.xlogy(w, w).sum() / n_instances)
    return loss, stats


TEACHER_STATS = ("weight", "s_mi", "s_g", "s_d")  # per-teacher summaries of compact_loss's stats


def teacher_sums(stats, teacher, branch_mask, n_teachers):
    """[n_teachers, |TEACHER_STATS| + 1]: each teacher's sums of the [B, K] stats over its real
    branches, then its branch count. Sums add across micro-batches and ranks; divide at the end."""
    t = teacher[branch_mask]
    cols = [stats[key][branch_mask].float() for key in TEACHER_STATS] + [torch.ones_like(t, dtype=torch.float)]
    return torch.zeros(n_teachers, len(cols), device=t.device).index_add_(0, t, torch.stack(cols, 1))


def teacher_means(sums, names):
    """{teacher: {stat: mean, "n": branches}} from teacher_sums' totals, teachers with branches only."""
    return {name: {**{k: row[j].item() / row[-1].item() for j, k in enumerate(TEACHER_STATS)}, "n": int(row[-1])}
            for name, row in zip(names, sums) if row[-1] > 0}


# --- S_MI under a probe budget (SPEC §3.1, Revised) ---

MI_RUN = 4  # other-stratum runs: MI_RUN consecutive rationale tokens, MI_RUN + 1 probes, MI_RUN gains
MIN_BUDGET = MI_RUN + 6  # I_0, I_|R|, one thinking pair and one run


def sampled_plan(n_rat, think, cfg, u_think, u_run):
    """Per-prefix (probed, lin, half_abs, level) [N, 1 + R] of an unbiased estimate of Eq. 3's sum. With
    θ = think_weight, o = other_weight and Σ_t ΔI_t = I_|R| − I_0 (a control variate from two probes):

        Σ_t m_t max(ΔI_t, 0) = o/2 (I_|R| − I_0) + Σ_think [(θ − o)/2 ΔI_t + θ/2 |ΔI_t|] + Σ_other o/2 |ΔI_t|

    Each stratum is Horvitz-Thompson scaled from its sample: n_T of the N_T thinking tokens (2 probes each;
    at most mi_think_share of the budget, at least 1, room left for a run), and n_C of the N_C runs of
    MI_RUN tokens that hold another token (MI_RUN + 1 probes each). u_think [N, R], u_run [N, ⌈R/MI_RUN⌉].
    """
    N, R = think.shape
    theta, o = cfg.think_weight, cfg.other_weight
    rat = torch.arange(R, device=think.device) < n_rat[:, None]  # (N, R): token r + 1 exists
    think = think & rat
    other = rat & ~think
    run = torch.arange(R, device=think.device) // MI_RUN  # (R,): each token's run
    has_other = torch.zeros(N, u_run.shape[1], device=think.device).index_add_(1, run, other.float()) > 0
    budget = torch.full_like(n_rat, cfg.mi_budget)
    cap_t = torch.minimum(((cfg.mi_think_share * budget.double()).long() // 2).clamp(min=1),
                          (budget - 3 - MI_RUN) // 2)  # room left for I_0, I_|R| and one run
    N_T, N_C = think.sum(-1), has_other.sum(-1)
    n_t = torch.minimum(N_T, cap_t)
    n_c = torch.minimum(N_C, (budget - 2 - 2 * n_t) // (MI_RUN + 1))
    pick_t = sample_without_replacement(u_think, think, n_t)
    pick_c = sample_without_replacement(u_run, has_other, n_c)[:, run] & other  # (N, R): picked runs' others
    s_t, s_c = ((N_T / n_t.clamp(min=1))[:, None], (N_C / n_c.clamp(min=1))[:, None])
    at = lambda x: F.pad(x.float(), (1, 0))  # token r + 1's terms sit at prefix r + 1
    t = torch.arange(R + 1, device=think.device)
    level = o / 2 * ((t == n_rat[:, None]).float() - (t == 0).float())
    counted = at(pick_t | pick_c).bool()
    probed = counted | F.pad(counted[:, 1:], (0, 1)) | (t == 0) | (t == n_rat[:, None])  # t − 1 and t
    return probed, at(pick_t) * (theta - o) / 2 * s_t, at(pick_t) * theta / 2 * s_t + at(pick_c) * o / 2 * s_c, level


def sample_keys(rng_key, instance, n_rat, think):
    """u_think [N, R], u_run [N, ⌈R/MI_RUN⌉] uniform: drawn per instance from a generator seeded by
    (rng_key, instance), so a pure function of those and of the instance's longest rationale, whatever
    the padding, and shared by its branches by rationale index (common random numbers)."""
    N, R = think.shape
    u_think, u_run = torch.ones(N, R), torch.ones(N, -(-R // MI_RUN))
    lengths = n_rat.tolist()
    for b in sorted(set(instance)):
        rows = [n for n, i in enumerate(instance) if i == b]
        L = max(lengths[n] for n in rows)
        g = torch.Generator().manual_seed(derive_seed(*rng_key, b))
        u_think[rows, :L], u_run[rows, :-(-L // MI_RUN)] = torch.rand(L, generator=g), torch.rand(-(-L // MI_RUN), generator=g)
    return u_think.to(think.device), u_run.to(think.device)


def sample_without_replacement(u, eligible, n):
    """Bool [N, M]: the n[i] eligible entries of row i with the smallest keys u (all when n >= count)."""
    order = torch.where(eligible, u, 2.0).argsort(-1)
    rank = order.argsort(-1)  # rank of each entry's key in its row
    return eligible & (rank < n[:, None])


# --- NLL without [M, V] logits ---

def full_precision(x):
    """Switch autocast off around score and divergence arithmetic (autocast runs einsum in bf16)."""
    return torch.autocast(x.device.type, enabled=False)


class LinearNLL(torch.autograd.Function):
    """nll [M] fp32 = −log softmax(h Wᵀ)[targets], a chunk of rows at a time, never [M, V] logits.

    A frozen W: each chunk computes d nll_i / d h_i = (softmax_i − onehot_i) W in the forward, so backward
    only scales rows by the upstream grad (no recompute). A trainable W: forward keeps the logsumexp and
    backward recomputes each chunk's logits for both gradients. Matmuls in `dtype`, softmax in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, rows, dtype):
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(dtype)
        nll = h.new_empty(h.shape[0], dtype=torch.float32)
        lse_all = h.new_empty(h.shape[0], dtype=torch.float32)
        grad_h = h.new_empty(h.shape, dtype=dtype) if need_h and not need_w else None
        for s in range(0, h.shape[0], rows):
            hc, y = h[s:s + rows].to(dtype), targets[s:s + rows]
            logits = (hc @ w.T).float()  # (m, V)
            lse = torch.logsumexp(logits, dim=-1)
            nll[s:s + rows] = lse - logits.gather(1, y[:, None]).squeeze(1)
            lse_all[s:s + rows] = lse
            if grad_h is not None:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(len(y), device=p.device), y] -= 1
                grad_h[s:s + rows] = p.to(dtype) @ w
        ctx.rows, ctx.dtype, ctx.h_dtype, ctx.grad_h = rows, dtype, h.dtype, grad_h
        if need_w:
            ctx.save_for_backward(h, weight, targets, lse_all)
        return nll

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_h is not None:  # frozen W: d nll_i / d h_i is already there
            return (ctx.grad_h * g[:, None]).to(ctx.h_dtype), None, None, None, None
        h, weight, targets, lse_all = ctx.saved_tensors
        dtype, rows = ctx.dtype, ctx.rows
        w = weight.to(dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, h.shape[0], rows):
            hc, y = h[s:s + rows].to(dtype), targets[s:s + rows]
            p = (hc @ w.T).float().sub_(lse_all[s:s + rows, None]).exp_()  # (m, V) softmax
            p[torch.arange(len(y), device=p.device), y] -= 1
            p = p.mul_(g[s:s + rows, None]).to(dtype)
            grad_h[s:s + rows] = p @ w
            grad_w += (p.T @ hc).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def token_nll(lm_head, h, targets, rows=None, fp32=False):
    """−log p(targets | h) row by row: h [M, C], targets [M] -> [M] fp32 (LinearNLL).

    Chunks of 2^23 logits (at least 128 rows, so a 152k vocabulary still feeds a GPU matmul of useful
    height). fp32: the matmul too runs in fp32, so bf16 rounding of the logits does not reach the result.
    """
    V = lm_head.weight.shape[0]
    rows = rows or max(128, 2**23 // V)
    dev = h.device.type
    dtype = torch.float32 if fp32 else \
        torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm_head.weight.dtype
    with full_precision(h):  # the matmuls run in `dtype`, chosen above, not in autocast's
        return LinearNLL.apply(h, lm_head.weight, targets, rows, dtype)
