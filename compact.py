"""COMPACT: compatibility-aware multi-teacher chain-of-thought distillation (arXiv 2601.13992).

SPEC.md §2-§4 top to bottom: three scores of each teacher's rationale read from the student
itself (adaptability S_MI, consensus S_G, difficulty S_D), fused into per-instance weights, and
the weighted loss Σ_k w_k (L_SFT,k + λ L_MCon,k), whose one backward is Σ_k w_k τ_k (Eq. 1 = 11).

    loss, stats = compact_loss(model, batch, CompactConfig())  # batch: data.collate's packed row
    loss, stats = compact_objective(branches, q_proj, k_proj, head_dim, info_fn, cfg)  # any model

compact_objective is the method on plain padded [B, K, T] tensors (docs/porting.md); compact_loss
runs this project's model over a packed row and hands it the same tensors. One training forward
serves S_D, S_G, L_SFT and L_MCon; S_MI costs one no-grad pass of short probe blocks over the
training pass's K/V. After the method come its two approximations: S_MI under a probe budget,
and the NLL without [M, V] logits. Left out: the optimizer step.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import derive_seed
from model import KVCache, Segment


@dataclass
class CompactConfig:
    """The method's settings (SPEC §3-§4); train.py makes a flag of each field.

    S_MI is exact Eq. 3 with mi_budget = 0, else an unbiased estimate from probe_budget(|R|) =
    min(256, max(96, ⌈0.4 |R|⌉)) probes per branch, exact below 96 tokens: the cheapest law
    measured that met Kendall tau 0.8 and 15% error on the long branch against exact Eq. 3
    (bench.py mi_agreement, docs/speed.md). mi_norm "none" (the sum; SPEC writes 1/|R|) caught
    flaws best on both sets of analysis.py readings (docs/readings.md).
    """
    weighting: str = "compact"  # "compact" (Eq. 7) or "uniform" (w_k = 1/K_valid, "Direct Avg.")
    alpha: float = 1.0  # weight of Z(S_MI); 0 switches it off and skips the probe pass (--no-mi)
    beta: float = 1.0  # weight of Z(S_G); 0 switches it off (--no-consensus)
    gamma: float = 1.0  # weight of Z(S_D); 0 switches it off (--no-difficulty)
    temperature: float = 1.0  # T of the softmax in Eq. 7
    mcon_lambda: float = 0.1  # λ of Eq. 10; 0 drops the consistency loss and its logits
    mcon_detach: bool = False  # BKL treats the other branch as a fixed target
    mi_budget: int = 96  # S_MI probes per branch at least (probe_budget); 0 = exact Eq. 3
    mi_budget_frac: float = 0.4  # and this share of |R| for a longer rationale
    mi_budget_cap: int = 256  # but at most this many (0 = no cap)
    mi_think_share: float = 0.5  # at most this share of the budget goes to thinking-token pairs
    z_floor: float = 0.01  # Z's std is floored at z_floor · mean|s| (SPEC §3.4); 0 = plain z
    think_weight: float = 1.0  # m_t for a token that starts a thinking word
    other_weight: float = 0.1  # m_t for every other rationale token
    mi_norm: str = "none"  # S_MI the plain sum of Eq. 3, or "length": divided by |R| (SPEC §3.1)
    sg_feature: str = "eot"  # S_G's e_k: the "eot" state, the "last" rationale token's, or "mean"
    sg_self_loops: bool = False  # S_G's graph keeps i -> i edges (SPEC §3.2 removes them)
    sg_heads: str = "mean"  # A = the "mean" of per-head attentions, or one "joint" attention
    sg_similarity: str = "qk"  # q·κ through W_Q, W_K (Eq. 4), or "cosine" of e: beyond the paper

    def __post_init__(self):
        choices = dict(weighting="compact uniform", mi_norm="length none",
                       sg_feature="eot last mean", sg_heads="mean joint",
                       sg_similarity="qk cosine")
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed.split():
                raise ValueError(f"{name} must be one of: {allowed}; got {value!r}")
        nonnegative = ("alpha beta gamma mcon_lambda think_weight other_weight mi_budget "
                       "mi_budget_frac z_floor")
        for name in nonnegative.split():
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.mi_think_share <= 1:
            raise ValueError(f"mi_think_share must be in [0, 1], got {self.mi_think_share}")
        if 0 < self.mi_budget < MIN_BUDGET or 0 < self.mi_budget_cap < self.mi_budget:
            raise ValueError(f"mi_budget must be 0 (exact) or >= {MIN_BUDGET}, "
                             "and mi_budget_cap 0 or >= it")


# --- the three scores (SPEC §3), computed under no_grad ---

def difficulty_scores(nll, rationale_mask):
    """S_D (SPEC §3.3, Eq. 6): mean NLL of each branch's rationale tokens, [B, K].

    nll [B, K, T]: each token's loss (read from the logits one position earlier), detached;
    rationale_mask [B, K, T]: R_k. An empty rationale scores 0.
    """
    total = torch.where(rationale_mask, nll, 0.0).sum(-1)
    return total / rationale_mask.sum(-1).clamp(min=1)


def consensus_scores(e, branch_mask, q_proj, k_proj, head_dim, self_loops=False,
                     heads="mean", sim="qk"):
    """S_G (SPEC §3.2, Eq. 4-5): incoming attention of each branch in the graph of branches.

    e [B, K, C]: each branch's path vector (graph_features); q = W_Q e + b, κ = W_K e + b, KV
    heads repeated, no RoPE. Per head A_ij = softmax_j(q_i·κ_j/√D) over valid j ≠ i (Decision:
    no self-loops; self_loops lets j = i vote), A = mean over heads ("joint": one softmax of
    Σ_h q_i·κ_j/√(HD)), S_G,k = Σ_i A_ik -> [B, K]. sim "cosine" (beyond the paper): q = κ =
    e / rms(e), one head, so the logit is √C·cos(e_i, e_j).
    """
    B, K, C = e.shape
    q = q_proj(e).float().view(B, K, -1, head_dim)  # (B, K, H, D)
    kappa = k_proj(e).float().view(B, K, -1, head_dim)  # (B, K, G, D)
    kappa = kappa.repeat_interleave(q.shape[2] // kappa.shape[2], dim=2)  # (B, K, H, D)
    if sim == "cosine":  # no learned projection: a symmetric similarity
        q = kappa = F.rms_norm(e.float(), (C,))[:, :, None]  # (B, K, 1, C)
    elif heads == "joint":
        q = q.flatten(2)[:, :, None]  # (B, K, 1, HD): one head
        kappa = kappa.flatten(2)[:, :, None]
    with full_precision(e):  # logits (B, H, K, K)
        logits = torch.einsum("bihd,bjhd->bhij", q, kappa) / math.sqrt(q.shape[-1])
    eye = torch.eye(K, dtype=torch.bool, device=e.device)
    both = branch_mask[:, :, None] & branch_mask[:, None, :]
    edge = both & (~eye | self_loops)  # (B, K, K): i sees j
    attn = torch.softmax(logits.masked_fill(~edge[:, None], float("-inf")), dim=-1)
    attn = torch.where(edge[:, None], attn, 0.0).mean(1)  # (B, K, K); all-masked rows (NaN) -> 0
    return attn.sum(1)  # column sums: the weight flowing into k


def at_last(x, mask):
    """x [B, K, T, C] at the last True of mask [B, K, T] (index 0 where none) -> [B, K, C]."""
    t = torch.where(mask, torch.arange(mask.shape[-1], device=mask.device), 0).amax(-1)  # (B, K)
    return x.gather(2, t[:, :, None, None].expand(*t.shape, 1, x.shape[-1]))[:, :, 0]


def graph_features(x, sft_mask, rationale_mask, feature="eot"):
    """e_k [B, K, C] from the final attention input x [B, K, T, C]: at each branch's eot (its last
    supervised token, SPEC §3.2), or (readings of Eq. 4) at its last rationale token, or the mean
    over its rationale; an empty rationale uses the eot."""
    eot = at_last(x, sft_mask)
    if feature == "eot":
        return eot
    n = rationale_mask.sum(-1)[..., None]  # (B, K, 1)
    if feature == "last":
        e = at_last(x, rationale_mask)
    else:
        e = torch.where(rationale_mask[..., None], x, 0.0).sum(2) / n.clamp(min=1)
    return torch.where(n > 0, e, eot)


def adaptability_scores(info_fn, n_rat, think, cfg, rng_key=(), instance=None):
    """S_MI (SPEC §3.1, Eq. 2-3): Σ_t m_t max(I_t − I_{t−1}, 0) per branch ("length": / |R_k|).

    n_rat [N], think [N, R]: rationale lengths and think flags in order (rationale_flags).
    probe_plan says which prefixes I_t to read: all, or past the budget an unbiased sample drawn
    per instance (instance [N]) from rng_key (train.py: seed, step, rank, micro-batch), shared
    by its branches. info_fn(plan) -> I [N, Q] at plan.prefix where plan.valid. -> [N]
    """
    plan = probe_plan(n_rat, think, cfg, rng_key, instance)
    if plan.prefix.shape[1] == 0:  # no rationale anywhere: nothing to probe (Q = 0, no host sync)
        return torch.zeros(len(n_rat), device=n_rat.device)
    info = torch.where(plan.valid, info_fn(plan).float(), 0.0)
    s = mi_estimate(info, plan)
    return s / n_rat.clamp(min=1) if cfg.mi_norm == "length" else s


# --- the exact S_MI probe: every prefix, one pass ---

class Plan(NamedTuple):
    """The prefixes I_t the probe reads, in order, [N, Q], and what each counts for."""
    prefix: torch.Tensor  # long: rationale tokens seen (0 = I_0, before the rationale)
    valid: torch.Tensor  # bool
    lin: torch.Tensor  # coefficient of d_q = I_q − I_{q−1} (0 unless prefix[q−1] = prefix[q] − 1)
    half_abs: torch.Tensor  # coefficient of |d_q|
    level: torch.Tensor  # coefficient of I_q itself


def positions(mask):
    """Indices [N, M] of the True entries of each row of mask [N, T], in order, −1 after them."""
    T = mask.shape[-1]
    t = torch.arange(T, device=mask.device)
    M = int(mask.sum(-1).max()) if mask.numel() else 0
    index = torch.where(mask, t, T + t).sort(-1).values[..., :M]  # True entries first, in order
    return torch.where(index < T, index, -1)


def rationale_flags(rationale_mask, think_mask):
    """|R| [N] and the think flags of each branch's rationale tokens in order [N, max |R|], from
    [N, T] masks."""
    rows = positions(rationale_mask)
    think = think_mask.gather(-1, rows.clamp(min=0)) & (rows >= 0)
    return rationale_mask.sum(-1), think


def rationale_view(batch):
    """rationale_flags of a packed row (data.collate's), for callers that probe it directly."""
    rows = batch["rationale_rows"]
    return rationale_flags(rows >= 0, batch["think_mask"][rows.clamp(min=0)])


def exact_plan(n_rat, think, cfg):
    """Every prefix 0..|R|: Eq. 3 exactly, as max(d, 0) = (d + |d|)/2 gives lin = half_abs = m_t/2.
    Per-prefix tensors [N, 1 + R]: (probed, lin, half_abs, level); token t's terms at prefix t."""
    m = F.pad(torch.where(think, cfg.think_weight, cfg.other_weight), (1, 0)) / 2
    return torch.ones_like(m, dtype=torch.bool), m, m, torch.zeros_like(m)


def probe_plan(n_rat, think, cfg, rng_key=(), instance=None):
    """Plan for branches of n_rat [N] rationale tokens with think flags [N, R] (SPEC §3.1):
    exact_plan where |R| + 1 <= probe_budget (or mi_budget = 0), sampled_plan's elsewhere."""
    plan = exact_plan(n_rat, think, cfg)
    over = (n_rat + 1 > probe_budget(n_rat, cfg)) & (cfg.mi_budget > 0)
    if bool(over.any()):
        keys = sample_keys(rng_key, instance or range(len(n_rat)), n_rat, think)
        sampled = sampled_plan(n_rat, think, cfg, *keys)
        plan = [torch.where(over[:, None], s, e) for s, e in zip(sampled, plan)]
    t = torch.arange(plan[0].shape[1], device=n_rat.device)
    probed = plan[0] & (t <= n_rat[:, None]) & (n_rat[:, None] > 0)
    prefix = positions(probed)  # (N, Q): the probed prefixes in order, −1 after them
    valid = prefix >= 0
    prefix = prefix.clamp(min=0)

    def pick(x):
        return torch.where(valid, x.gather(1, prefix), 0.0)
    return Plan(prefix, valid, *map(pick, plan[1:]))


def mi_estimate(info, plan):
    """Σ_t m_t max(ΔI_t, 0), exact or estimated, from the probed I [N, Q] -> [N]:
    Σ_q lin_q d_q + half_abs_q |d_q| + level_q I_q, with d_q = I_q − I_{q−1} (q >= 1)."""
    d = info[:, 1:] - info[:, :-1]
    gains = plan.lin[:, 1:] * d + plan.half_abs[:, 1:] * d.abs()
    return gains.sum(-1) + (plan.level * info).sum(-1)


#   The probe pass: a block of cue ⊕ y after each planned prefix t, every branch's blocks packed
#   into one row after the training row's cached K/V. A segment of one branch's blocks sees its
#   prompt p, the branch's first t tokens and, block-causally, itself; position ids continue from
#   the prefix. Here p = 2 tokens, branch r1 r2 r3, prefixes t = 0 and 2, blocks c1 c2 (the last
#   probe token, y_last, predicts nothing, so it is never fed):
#
#                       cache: p  p  r1 r2 r3 | block 0 | block 1
#                                             | c1 c2   | c1 c2
#   block 0, t=0   c1@2        x  x  .  .  .  | x  .    | .  .
#                  c2@3        x  x  .  .  .  | x  x    | .  .
#   block 1, t=2   c1@4        x  x  x  x  .  | .  .    | x  .
#                  c2@5        x  x  x  x  .  | .  .    | x  x
#
#   c2's output predicts y1, so I = Σ log p(y_j) is read one token early, as everywhere.

PROBE_QUERIES = 1024  # probe tokens per segment at most: bounds the mask of an exact long trace


def probe_block_mask(prefixes, L, M, P, device):
    """Bool [n·P, L + M + n·P] of the diagram: block i (prefix t_i) sees the prompt (L tokens),
    the branch's first t_i of its M tokens, and its own earlier tokens; n blocks of P tokens."""
    t = torch.tensor(prefixes, device=device)
    see_main = torch.arange(L + M, device=device) < L + t[:, None]  # (n, L + M)
    see_main = see_main.repeat_interleave(P, 0)  # (nP, L + M)
    i = torch.arange(len(prefixes) * P, device=device)
    see_own = (i[:, None] // P == i[None] // P) & (i[None] % P <= i[:, None] % P)  # (nP, nP)
    return torch.cat([see_main, see_own], 1)


def probe_information(raw, kv, batch, plan):
    """I [N, Q] = log p(y | x, r_≤t) at every planned prefix, one no-grad pass (Eq. 2).

    kv: the packed training row's per-layer (k, v) [1, G, S, D]. Unplanned entries are 0. The
    LM head runs in fp32 under bf16 autocast: max(ΔI, 0) would turn rounding noise into gain.
    """
    lay = batch["layout"]
    dev = plan.prefix.device
    S = len(batch["input_ids"])
    instance = (batch["slot"] // batch["branch_mask"].shape[1]).tolist()
    counts = plan.valid.sum(-1).tolist()
    ids, pos, segments, rows, targets, where = [], [], [], [], [], []
    branches = zip(plan.prefix.tolist(), lay["branches"], instance)
    for n, (prefixes, (c0, c1), b) in enumerate(branches):
        p0, p1 = lay["prompts"][b]
        probe, scored = lay["probes"][b]
        if scored[0]:
            raise ValueError("the probe's first token must be the cue, not an answer token")
        P = len(probe) - 1
        ts = prefixes[:counts[n]]
        L = p1 - p0
        per = max(1, min(PROBE_QUERIES, L + c1 - c0) // P)  # own keys <= main keys: little waste
        for i in range(0, len(ts), per):
            chunk = ts[i:i + per]
            s0 = len(ids)
            for q, t in enumerate(chunk, i):
                # token j predicts token j + 1
                rows += [len(ids) + j for j in range(P) if scored[j + 1]]
                targets += [probe[j + 1] for j in range(P) if scored[j + 1]]
                where += [(n, q)] * sum(scored[1:])
                ids += probe[:P]  # in place: the row grows across every branch
                pos += range(L + t, L + t + P)
            # prompt, branch (cached), these blocks
            kv_spans = ((p0, p1), (c0, c1), (S + s0, S + len(ids)))
            mask = probe_block_mask(chunk, L, c1 - c0, P, dev)
            segments.append(Segment(((s0, len(ids)),), kv_spans, mask, len(ids) - s0))
    cache = [KVCache.from_kv(k, v, len(ids)) for k, v in kv]

    def tensor(x):
        return torch.tensor(x, device=dev)
    h = raw(tensor(ids)[None], position_ids=tensor(pos)[None], cache=cache, segments=segments,
            return_hidden=True)[0]
    logp = -token_nll(raw.lm_head, h[tensor(rows)], tensor(targets), fp32=True)
    n, q = tensor(where).view(-1, 2).T
    info = torch.zeros(plan.prefix.shape, device=dev)
    return info.index_put_((n, q), logp, accumulate=True)


# --- fusion (SPEC §3.4) and the consistency loss (SPEC §4) ---

def fuse_weights(s_mi, s_g, s_d, branch_mask, cfg):
    """w [B, K] (SPEC §3.4, Eq. 7): softmax((α Z(S_MI) + β Z(S_G) − γ Z(S_D)) / T) per instance.

    Z(s) = (s − mean) / max(std, z_floor · mean|s|, 1e-6) over the instance's valid branches
    (population std). Padding branches get weight 0; uniform weighting gives exactly 1/K_valid.
    """
    m = branch_mask.float()
    n = branch_mask.sum(-1, keepdim=True).clamp(min=1)
    if cfg.weighting == "uniform":
        return m / n

    def z(s):
        s = torch.where(branch_mask, s.float(), 0.0)
        mean = s.sum(-1, keepdim=True) / n
        std = (((s - mean) ** 2 * m).sum(-1, keepdim=True) / n).sqrt()
        floor = (cfg.z_floor * s.abs().sum(-1, keepdim=True) / n).clamp(min=1e-6)
        return torch.where(branch_mask, (s - mean) / torch.maximum(std, floor), 0.0)
    logit = cfg.alpha * z(s_mi) + cfg.beta * z(s_g) - cfg.gamma * z(s_d)
    logit = logit / cfg.temperature
    w = torch.softmax(logit.masked_fill(~branch_mask, float("-inf")), dim=-1)
    return torch.where(branch_mask, w, 0.0)  # an all-padding instance (NaN row) weighs nothing


def mcon_loss(logp, answer_valid, branch_mask, detach=False):
    """L_MCon [B, K] (SPEC §4, Eq. 9): mean over valid i ≠ k of BKL(k, i), as in MCC-KD.

    logp [B, K, J, V]: log P_k^j at the position predicting answer token j; answer_valid
    [B, K, J]. BKL(k,i) = mean_j ½[KL(P_k‖P_i) + KL(P_i‖P_k)], from Σ_v P log P and cross terms:
    no [K, K, V] tensor. detach: the other side is a fixed target. 0 with no valid partner.
    """
    K = logp.shape[1]
    p = logp.exp()
    p_o, logp_o = (p.detach(), logp.detach()) if detach else (p, logp)
    neg_ent = (p * logp).sum(-1)  # (B, K, J)
    neg_ent_o = (p_o * logp_o).sum(-1)
    with full_precision(logp):  # BKL is a small difference of large sums over V
        cross_ki = torch.einsum("bkjv,bijv->bkij", p, logp_o)  # Σ_v P_k log P_i
        cross_ik = torch.einsum("bijv,bkjv->bkij", p_o, logp)  # Σ_v P_i log P_k
    bkl = 0.5 * (neg_ent[:, :, None] - cross_ki + neg_ent_o[:, None] - cross_ik)  # (B, K, K, J)
    both = answer_valid[:, :, None] & answer_valid[:, None]
    bkl = torch.where(both, bkl, 0.0).sum(-1) / both.sum(-1).clamp(min=1)  # (B, K, K)
    eye = torch.eye(K, dtype=torch.bool, device=p.device)
    edge = branch_mask[:, :, None] & branch_mask[:, None] & ~eye
    return torch.where(edge, bkl, 0.0).sum(-1) / edge.sum(-1).clamp(min=1)


def answer_logprobs(lm_head, hidden, prev, answer_rows):
    """log P^j [N, J, V] and its validity [N, J]: each branch's answer tokens in order
    (answer_rows; −1), read at the row that predicts each (prev), so answers align by index j."""
    logits = lm_head(hidden[prev[answer_rows.clamp(min=0)]]).float()
    return torch.log_softmax(logits, -1), answer_rows >= 0


# --- the objective (SPEC §2, §4) ---

class Branches(NamedTuple):
    """A micro-batch as plain padded tensors: branch k of instance b at [b, k], its tokens along
    T in order (padding on either side: every mask is False there). compact_objective's input."""
    nll: torch.Tensor  # [B, K, T] float with grad: −log p(token t | tokens < t), logits at t − 1
    sft_mask: torch.Tensor  # [B, K, T] bool: S_k, every token after the prompt; the last: eot
    rationale_mask: torch.Tensor  # [B, K, T] bool: R_k
    think_mask: torch.Tensor  # [B, K, T] bool: rationale tokens that start a thinking word
    attn_input: torch.Tensor  # [B, K, T, C]: entering the final layer's attention, after its norm
    answer_logp: torch.Tensor | None  # [B, K, J, V] with grad: log P^j at the row predicting y_j
    answer_valid: torch.Tensor | None  # [B, K, J] bool; both None when mcon_lambda = 0
    branch_mask: torch.Tensor  # [B, K] bool: instance b has a k-th branch


def compact_objective(br, q_proj, k_proj, head_dim, info_fn, cfg, n_instances=None, rng_key=()):
    """(loss, stats) of compact_loss from plain tensors (Eq. 8-11), for any model.

    br: Branches. q_proj, k_proj, head_dim: the final layer's W_Q, W_K (LoRA included) and D, for
    S_G. info_fn(plan) -> I [N, Q]: log p(y | x, r_≤t) at t = plan.prefix where plan.valid, for
    the N branches of branch_mask in row-major order (S_MI; not called when alpha = 0). rng_key
    and the row b of each branch seed the sample past the probe budget. Returns as compact_loss.
    """
    bm = br.branch_mask
    B, K = bm.shape
    n_instances = B if n_instances is None else n_instances
    sft = br.sft_mask & bm[..., None]
    l_sft = torch.where(sft, br.nll, 0.0).sum(-1) / sft.sum(-1).clamp(min=1)  # (B, K)
    l_mcon = torch.zeros(B, K, device=bm.device)
    if cfg.mcon_lambda > 0:  # no answer tokens: J = 0 and the loss is 0
        l_mcon = mcon_loss(br.answer_logp, br.answer_valid, bm, cfg.mcon_detach)

    with torch.no_grad():
        rat = br.rationale_mask & bm[..., None]
        s_d = difficulty_scores(br.nll.detach(), rat)
        e = graph_features(br.attn_input.detach(), sft, rat, cfg.sg_feature)  # (B, K, C)
        s_g = consensus_scores(e, bm, q_proj, k_proj, head_dim, cfg.sg_self_loops,
                               cfg.sg_heads, cfg.sg_similarity)
        s_mi = torch.zeros(B, K, device=bm.device)
        if cfg.weighting == "compact" and cfg.alpha > 0:  # the only score that costs a pass
            n_rat, think = rationale_flags(rat[bm], br.think_mask[bm])
            instance = bm.nonzero()[:, 0].tolist()
            s_mi[bm] = adaptability_scores(info_fn, n_rat, think, cfg, rng_key, instance)
        w = fuse_weights(s_mi, s_g, s_d, bm, cfg)

    loss = (w * (l_sft + cfg.mcon_lambda * l_mcon)).sum() / n_instances
    stats = dict(s_mi=s_mi, s_g=s_g, s_d=s_d, weight=w, l_sft=l_sft.detach(),
                 l_mcon=l_mcon.detach(), loss=loss.detach(), tokens=sft.sum(),
                 sft=(w * l_sft).sum().detach() / n_instances,
                 mcon=(w * l_mcon).sum().detach() / n_instances,
                 weight_entropy=-torch.special.xlogy(w, w).sum() / n_instances)
    return loss, stats


def packed_forward(model, batch, **kw):
    """The model over a collate row (model.py's packed layout): hidden [S, C] with return_hidden
    (and Aux with return_aux)."""
    out = model(batch["input_ids"][None], position_ids=batch["position_ids"][None],
                segments=batch["layout"]["segments"], **kw)
    return (out[0][0], out[1]) if kw.get("return_aux") else out[0]


def packed_branches(batch, nll, x, answers=None):
    """Branches of a collate row from per-row nll [S] and x [S, C] and answer_logprobs' pair;
    T = the longest branch after its prompt (the prompt is never supervised)."""
    B, K = batch["branch_mask"].shape
    start, end = torch.tensor(batch["layout"]["branches"], device=nll.device).view(-1, 2).T
    t = torch.arange(int((end - start).max()), device=nll.device)

    def table(v):  # per branch [N, ...] -> [B, K, ...], 0 where instance b has no k-th branch
        out = v.new_zeros(B * K, *v.shape[1:]).index_copy(0, batch["slot"], v)
        return out.view(B, K, *v.shape[1:])
    real = table(t < (end - start)[:, None])
    rows = torch.where(real, table(start[:, None] + t), 0)  # (B, K, T): each branch token's row

    def mask(key):
        return batch[key][rows] & real
    answer = [table(a) for a in answers] if answers else [None, None]
    return Branches(torch.where(real, nll[rows], 0.0), mask("sft_mask"), mask("rationale_mask"),
                    mask("think_mask"), x[rows], *answer, batch["branch_mask"])


def compact_loss(model, batch, cfg, n_instances=None, rng_key=()):
    """(loss, stats) for one collate row: loss = Σ_b Σ_k w_bk L_bk / n_instances (Eq. 8-11).

    L_k = L_SFT,k + λ L_MCon,k; w from the scores under no_grad, detached, so one backward gives
    Σ_k w_k ∇L_k. n_instances: instances of the whole optimizer step, all micro-batches and ranks
    (default B). stats: [B, K] s_mi s_g s_d weight l_sft l_mcon; scalars loss, sft, mcon,
    weight_entropy, tokens. Decision: scores are read in the model's current mode (LoRA dropout
    on while training, as in the K/V the probe reuses). The method itself: compact_objective.
    """
    raw = getattr(model, "module", model)  # DDP: train through the wrapper, score with the module
    hidden, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)  # (S, C)
    sel = batch["sft_mask"]
    prev = batch["prev"]
    token = token_nll(raw.lm_head, hidden[prev[sel]], batch["input_ids"][sel])  # read at prev
    nll = torch.zeros(len(sel), device=hidden.device).masked_scatter(sel, token)
    answers = None
    if cfg.mcon_lambda > 0:
        answers = answer_logprobs(raw.lm_head, hidden, prev, batch["answer_rows"])
    x = aux.final_attn_input.detach()[0]  # (S, C)
    kv = [(k.detach(), v.detach()) for k, v in aux.kv]
    attn = raw.model.layers[-1].self_attn
    return compact_objective(packed_branches(batch, nll, x, answers), attn.q_proj, attn.k_proj,
                             raw.args.head_dim, partial(probe_information, raw, kv, batch), cfg,
                             n_instances, rng_key)


TEACHER_STATS = ("weight", "s_mi", "s_g", "s_d")  # per-teacher summaries of compact_loss's stats


def teacher_sums(stats, teacher, branch_mask, n_teachers):
    """[n_teachers, |TEACHER_STATS| + 1]: each teacher's sums of the [B, K] stats over its real
    branches, then its branch count. Sums add across micro-batches and ranks; divide at the end."""
    t = teacher[branch_mask]
    cols = [stats[key][branch_mask].float() for key in TEACHER_STATS]
    cols.append(torch.ones_like(t).float())
    totals = torch.zeros(n_teachers, len(cols), device=t.device)
    return totals.index_add_(0, t, torch.stack(cols, 1))


def teacher_means(sums, names):
    """{teacher: {stat: mean, "n": branches}} from teacher_sums' totals, teachers with branches
    only."""
    rows = zip(names, sums.tolist())  # one host copy
    return {name: dict(zip(TEACHER_STATS, [v / row[-1] for v in row[:-1]]), n=int(row[-1]))
            for name, row in rows if row[-1] > 0}


# --- S_MI under a probe budget (SPEC §3.1, Revised) ---

MI_RUN = 4  # tokens per run of the other stratum: MI_RUN + 1 probes give MI_RUN gains
MIN_BUDGET = MI_RUN + 6  # I_0, I_|R|, one thinking pair and one run


def probe_budget(n_rat, cfg):
    """Probes per branch [N] for n_rat [N] rationale tokens: max(mi_budget, ⌈frac |R|⌉), capped."""
    floor = torch.full_like(n_rat, cfg.mi_budget)
    budget = torch.maximum(floor, (cfg.mi_budget_frac * n_rat).ceil().long())
    return budget.clamp(max=cfg.mi_budget_cap) if cfg.mi_budget_cap else budget


def sampled_plan(n_rat, think, cfg, u_think, u_run):
    """Per-prefix (probed, lin, half_abs, level) [N, 1 + R] of an unbiased estimate of Eq. 3's
    sum. With θ = think_weight, o = other_weight and Σ_t ΔI_t = I_|R| − I_0 (a control variate
    from two probes):

        Σ_t m_t max(ΔI_t, 0) = o/2 (I_|R| − I_0) + Σ_think [(θ − o)/2 ΔI_t + θ/2 |ΔI_t|]
                               + Σ_other o/2 |ΔI_t|

    Each stratum is Horvitz-Thompson scaled from its sample: n_T of the N_T thinking tokens (2
    probes each; at most mi_think_share of the budget, at least 1, room left for a run) and n_C
    of the N_C runs of MI_RUN tokens that hold another token (MI_RUN + 1 probes each). u_think
    [N, R], u_run [N, ⌈R/MI_RUN⌉]: the keys.
    """
    N, R = think.shape
    theta, o = cfg.think_weight, cfg.other_weight  # m_t of a thinking and of another token
    dev = think.device
    rat = torch.arange(R, device=dev) < n_rat[:, None]  # (N, R): token r + 1 exists
    think = think & rat
    other = rat & ~think
    run = torch.arange(R, device=dev) // MI_RUN  # (R,): each token's run
    has_other = torch.zeros(N, u_run.shape[1], device=dev).index_add_(1, run, other.float()) > 0
    budget = probe_budget(n_rat, cfg)
    share = ((cfg.mi_think_share * budget.double()).long() // 2).clamp(min=1)
    room = (budget - 3 - MI_RUN) // 2  # pairs that leave I_0, I_|R| and one run
    n_t = torch.minimum(think.sum(-1), torch.minimum(share, room))
    n_c = torch.minimum(has_other.sum(-1), (budget - 2 - 2 * n_t) // (MI_RUN + 1))
    pick_t = sample_without_replacement(u_think, think, n_t)
    pick_c = sample_without_replacement(u_run, has_other, n_c)[:, run] & other  # picked runs
    s_t = (think.sum(-1) / n_t.clamp(min=1))[:, None]
    s_c = (has_other.sum(-1) / n_c.clamp(min=1))[:, None]

    def at(x):  # token r + 1's terms sit at prefix r + 1
        return F.pad(x.float(), (1, 0))
    t = torch.arange(R + 1, device=dev)
    counted = at(pick_t | pick_c).bool()
    ends = (t == 0) | (t == n_rat[:, None])
    probed = counted | F.pad(counted[:, 1:], (0, 1)) | ends  # t − 1 and t
    lin = at(pick_t) * (theta - o) / 2 * s_t
    half_abs = at(pick_t) * theta / 2 * s_t + at(pick_c) * o / 2 * s_c
    level = o / 2 * ((t == n_rat[:, None]).float() - (t == 0).float())
    return probed, lin, half_abs, level


def sample_keys(rng_key, instance, n_rat, think):
    """u_think [N, R], u_run [N, ⌈R/MI_RUN⌉] uniform: drawn per instance from a generator seeded
    by (rng_key, instance), so a pure function of those and of the instance's longest rationale,
    whatever the padding, and shared by its branches by rationale index (common random numbers)."""
    N, R = think.shape
    u_think = torch.ones(N, R)
    u_run = torch.ones(N, -(-R // MI_RUN))
    lengths = n_rat.tolist()
    for b in sorted(set(instance)):
        rows = [n for n, i in enumerate(instance) if i == b]
        L = max(lengths[n] for n in rows)
        g = torch.Generator().manual_seed(derive_seed(*rng_key, b))
        u_think[rows, :L] = torch.rand(L, generator=g)
        u_run[rows, :-(-L // MI_RUN)] = torch.rand(-(-L // MI_RUN), generator=g)
    return u_think.to(think.device), u_run.to(think.device)


def sample_without_replacement(u, eligible, n):
    """Bool [N, M]: the n[i] eligible entries of row i with the smallest keys u (all when n >=
    count)."""
    rank = torch.where(eligible, u, 2.0).argsort(-1).argsort(-1)  # rank of each entry's key
    return eligible & (rank < n[:, None])


# --- NLL without [M, V] logits ---

def full_precision(x):
    """Switch autocast off around score and divergence arithmetic (autocast runs einsum in bf16)."""
    return torch.autocast(x.device.type, enabled=False)


class LinearNLL(torch.autograd.Function):
    """nll [M] fp32 = −log softmax(h Wᵀ)[targets], a chunk of rows at a time, never [M, V] logits.

    A frozen W: each chunk computes d nll_i / d h_i = (softmax_i − onehot_i) W in the forward, so
    backward only scales rows by the upstream grad (no recompute). A trainable W: forward keeps
    the logsumexp and backward recomputes each chunk's logits for both gradients. Matmuls in
    `dtype`, softmax in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, rows, dtype):
        need_h, need_w = ctx.needs_input_grad[:2]
        w = weight.to(dtype)
        nll, lse_all = h.new_empty(2, h.shape[0], dtype=torch.float32)
        grad_h = h.new_empty(h.shape, dtype=dtype) if need_h and not need_w else None
        for s in range(0, h.shape[0], rows):
            hc, y = h[s:s + rows].to(dtype), targets[s:s + rows]  # a chunk and its targets
            logits = (hc @ w.T).float()  # (m, V)
            lse = torch.logsumexp(logits, dim=-1)
            nll[s:s + rows] = lse - logits.gather(1, y[:, None]).squeeze(1)
            lse_all[s:s + rows] = lse
            if grad_h is not None:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                p[torch.arange(len(y), device=p.device), y] -= 1
                grad_h[s:s + rows] = p.to(dtype) @ w
        ctx.rows = rows
        ctx.dtype = dtype
        ctx.h_dtype = h.dtype
        ctx.grad_h = grad_h
        if need_w:
            ctx.save_for_backward(h, weight, targets, lse_all)
        return nll

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_h is not None:  # frozen W: d nll_i / d h_i is already there
            return (ctx.grad_h * g[:, None]).to(ctx.h_dtype), None, None, None, None
        h, weight, targets, lse_all = ctx.saved_tensors
        rows = ctx.rows
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, h.shape[0], rows):
            hc, y = h[s:s + rows].to(ctx.dtype), targets[s:s + rows]
            p = (hc @ w.T).float().sub_(lse_all[s:s + rows, None]).exp_()  # (m, V) softmax
            p[torch.arange(len(y), device=p.device), y] -= 1
            p = p.mul_(g[s:s + rows, None]).to(ctx.dtype)
            grad_h[s:s + rows] = p @ w
            grad_w += (p.T @ hc).float()
        return grad_h, grad_w.to(weight.dtype), None, None, None


def token_nll(lm_head, h, targets, rows=None, fp32=False):
    """−log p(targets | h) row by row: h [M, C], targets [M] -> [M] fp32 (LinearNLL).

    Chunks of 2^23 logits (at least 128 rows, so a 152k vocabulary still feeds a GPU matmul of
    useful height). fp32: the matmul too runs in fp32, so bf16 rounding of the logits does not
    reach the result.
    """
    w = lm_head.weight
    rows = rows or max(128, 2**23 // w.shape[0])  # w: (V, C)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype
    dtype = torch.float32 if fp32 else dtype
    with full_precision(h):  # the matmuls run in `dtype`, chosen above, not in autocast's
        return LinearNLL.apply(h, w, targets, rows, dtype)
