"""COMPACT: compatibility-aware multi-teacher chain-of-thought distillation (arXiv 2601.13992).

The method of SPEC.md §2-§4, top to bottom: three scores of each teacher's rationale read
from the student itself (adaptability S_MI, consensus S_G, difficulty S_D), fused into
per-instance weights, and the weighted loss Σ_k w_k (L_SFT,k + λ L_MCon,k) whose single
backward pass is the weighted sum of per-teacher task vectors (Eq. 1 = Eq. 11).

    loss, stats = compact_loss(model, batch, CompactConfig())   # batch: data.collate (SPEC §9)
    python compact.py score --model DIR --data FILE.jsonl --out SCORES.jsonl

One training forward serves S_D, S_G, L_SFT and L_MCon; S_MI costs one extra no-grad
pass over short probe blocks that reuse the training pass's K/V. Left out: the optimizer
step and its normalisation across ranks (train.py passes n_instances).
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from model import KVCache


@dataclass
class CompactConfig:
    """The method's settings (SPEC §3-§4); train.py and `compact.py score` make a flag of each field.

    S_MI's default is a sampled, unbiased estimate of Eq. 3 (probe_plan): at most mi_budget = 48
    probes per branch: I_0 and I_|R| (a control variate), at most half the budget (mi_think_share =
    0.5) on thinking-token pairs, the rest on runs of MI_RUN = 4 other tokens; exact whenever
    |R| + 1 <= 48; --mi-budget 0 is exact Eq. 3. Chosen on bench.py's mi_agreement (GSM8K
    rationales next to 600-token traces with one thinking word in eight tokens, a briefly trained
    student, 16 keys each): budgets 48 / 56 / 64 gave mean Kendall tau 0.85 / 0.87 / 0.89 against
    exact Eq. 3 and relative error 11 / 10 / 9% (all branches), for 40 / 45 / 50 probes per branch
    (exact: |R| + 1, ~240 on average); the previous estimator (no control variate, a sample per
    branch) gave tau 0.76 and 12% at 64. Three more students (README) gave 0.84, 0.86, 0.81 and
    14, 10, 10% at 48, and 40 fell short (0.78, 17%). 48 is the smallest budget measured that meets
    tau 0.8 and 15% on all four; each probe is a
    block of len(cue ⊕ y) − 1 tokens, so the budget is most of COMPACT's extra cost (README, Speed).
    """
    weighting: str = "compact"  # "compact" (Eq. 7) or "uniform" (w_k = 1/K_valid, "Direct Avg.")
    alpha: float = 1.0  # weight of Z(S_MI); 0 switches it off and skips the probe pass (--no-mi)
    beta: float = 1.0  # weight of Z(S_G); 0 switches it off (--no-consensus)
    gamma: float = 1.0  # weight of Z(S_D); 0 switches it off (--no-difficulty)
    temperature: float = 1.0  # T of the softmax in Eq. 7
    mcon_lambda: float = 0.1  # λ of Eq. 10; 0 drops the consistency loss and its logits
    mcon_detach: bool = False  # BKL treats the other branch as a fixed target
    mi_budget: int = 48  # S_MI probes per branch (probe_plan); 0 = exact Eq. 3 (every rationale position)
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
        if 0 < self.mi_budget < 2 * MI_RUN + 2:  # room for I_0, I_|R|, one thinking pair and one run
            raise ValueError(f"mi_budget must be 0 (exact) or >= {2 * MI_RUN + 2}")


def full_precision(x):
    """Switch autocast off around score and divergence arithmetic (autocast runs einsum in bf16)."""
    return torch.autocast(x.device.type, enabled=False)


class LinearNLL(torch.autograd.Function):
    """nll [M] fp32 = −log softmax(h Wᵀ)[targets], row by row, never holding [M, V] logits.

    A frozen W (LoRA): each chunk of rows computes its logits once and, while they are there,
    the gradient d nll_i / d h_i = (softmax_i − onehot(y_i)) W, which does not depend on what
    comes after; backward only scales row i by its upstream grad g_i. No recompute, and the
    memory kept is one [M, C] tensor, the size of h. A trainable W (full FT, a trained tied
    embedding): W's gradient Σ_i g_i (softmax_i − onehot_i)ᵀ h_i needs the per-row g_i (compact
    weights each branch), so forward keeps only logsumexp and backward recomputes each chunk's
    logits for both gradients: the matmuls of a checkpointed chunk, without its softmax pass.
    Matmuls run in `dtype` (the autocast dtype, or W's), logits and softmax in fp32.
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

    Logits exist one chunk of `rows` rows at a time. Default: 2^23 values (32 MB fp32; on 2 CPU
    cores 128-256 rows of a 32k vocabulary were fastest, whole [M, V] logits 20% slower), but at
    least 128 rows, so a 152k vocabulary still feeds a GPU matmul of useful height. fp32: the
    matmul too runs in fp32 (an fp32 copy of a bf16 head), not only the log-softmax, so bf16
    rounding of the logits does not reach the result (the S_MI probe).
    """
    V = lm_head.weight.shape[0]
    rows = rows or max(128, 2**23 // V)
    dev = h.device.type
    dtype = torch.float32 if fp32 else \
        torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm_head.weight.dtype
    with full_precision(h):  # the matmuls run in `dtype`, chosen above, not in autocast's
        return LinearNLL.apply(h, lm_head.weight, targets, rows, dtype)


# --- the three scores (SPEC §3), each [B, K], computed under no_grad ---

def difficulty_scores(nll, rationale_mask):
    """S_D (SPEC §3.3, Eq. 6): mean NLL of the rationale tokens, [B, K, T] -> [B, K].

    nll[..., t] is token t's loss from the training pass (read at t−1), already detached.
    An empty rationale scores 0.
    """
    m = rationale_mask.float()
    return (nll * m).sum(-1) / m.sum(-1).clamp(min=1)


def consensus_scores(e, branch_mask, q_proj, k_proj, head_dim):
    """S_G (SPEC §3.2, Eq. 4-5): incoming attention of each branch in the graph of branches.

    e [B, K, C]: the final layer's attention input at each branch's last real token (its eot).
    q = W_Q e + b, κ = W_K e + b with that layer's own projections, KV heads repeated for GQA,
    no RoPE. Per head A_ij = softmax_j(q_i·κ_j/√D) over valid j ≠ i (Decision: no self-loops),
    A = mean over heads, S_G,k = Σ_{i≠k} A_ik. Two valid branches: both 1; one valid: 0.
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


# --- S_MI (SPEC §3.1): which gains to probe, the probe pass, the estimate ---

MI_RUN = 4  # other-stratum runs: MI_RUN consecutive rationale tokens, MI_RUN + 1 probes, MI_RUN gains
_M64 = (1 << 64) - 1


def _shr(x, s):
    """Logical right shift of int64 tensors (torch's >> is arithmetic on negatives)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x):
    """splitmix64's finaliser on int64 (products wrap modulo 2^64, as in C)."""
    to_i64 = lambda c: c - (1 << 64) if c >= 1 << 63 else c
    x = (x ^ _shr(x, 30)) * to_i64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * to_i64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def hash_uniform(rng_key, salt, b, j):
    """U[0, 1) as a pure function of (rng_key ints, salt, b, j), broadcast over index tensors.

    A hash rather than a generator: an instance's sample does not depend on the batch's padding or
    on other instances, and a resumed run draws the same sample (like dropout seeded by step).
    Decision: no branch index. An instance's branches share their keys by position (common random
    numbers: the prompt is the same, so position j is the same rationale index in every branch), so
    branches that begin alike are sampled at the same places and their estimates err alike; the
    ranking that the weights read is kept better than with independent samples (bench.py)."""
    seed = 0
    for v in (*rng_key, salt):
        seed = (seed * 0x9E3779B97F4A7C15 + int(v) + 1) & _M64
    x = torch.tensor(seed - (1 << 64) if seed >= 1 << 63 else seed, dtype=torch.long, device=j.device)
    for idx in (b, j):
        x = _mix(x + idx * 0x9E3779B97F4A7C1 + 1)
    return _shr(x, 11).double() / 2.0**53


def probe_keys(rng_key, b, T):
    """probe_plan's sampling keys for rows of instance index b [N, 1]: u_think [N, T] (per position)
    and u_run [N, ⌈T/MI_RUN⌉] (per run of the other stratum), two strata drawn apart by salt."""
    j = lambda n: torch.arange(n, device=b.device)
    return hash_uniform(rng_key, 0, b, j(T)), hash_uniform(rng_key, 1, b, j(-(-T // MI_RUN)))


def sample_without_replacement(u, eligible, n):
    """Bool [N, M]: the n[i] eligible entries of row i with the smallest keys u (all when n >= count)."""
    order = torch.where(eligible, u, 2.0).argsort(-1)
    rank = order.argsort(-1)  # rank of each entry's key in its row
    return eligible & (rank < n[:, None])


def probe_plan(rationale_mask, think_mask, cfg, u_think=None, u_run=None):
    """Which positions the S_MI probe reads and what each I counts for (SPEC §3.1).

    Masks [N, T] -> pos, valid [N, Q], coef [N, Q, 3]: pos holds the probed positions in order (the
    probe's block q sits after main token pos[q]). With d_q = I_q − I_{q−1} and coef[q] = (a, b, c),
    the estimate of Σ_t m_t max(ΔI_t, 0) is mi_estimate's Σ_q a_q d_q + b_q |d_q| + c_q I_q (a, b
    are 0 unless pos[q−1] = pos[q] − 1). Exact Eq. 3 (mi_budget = 0, or |R| + 1 <= mi_budget):
    every rationale token, a = b = m_t / 2, since max(d, 0) = (d + |d|) / 2; c = 0. Otherwise the
    same identity summed with Σ_t ΔI_t = I_|R| − I_0 (θ = think_weight, o = other_weight):

        Σ_t m_t max(ΔI_t, 0) = o/2 (I_|R| − I_0)
                             + Σ_think [(θ − o)/2 ΔI_t + θ/2 |ΔI_t|] + Σ_other o/2 |ΔI_t|

    The first term is exact from two probes, a control variate: only |ΔI| is left to sample for
    the other tokens, and |x|/2 varies less than max(x, 0) with the same mean (with hash_uniform's
    shared sample, at budget 64 on bench.py's agreement student: tau 0.76 -> 0.89, error 12% -> 9%).
    Each stratum sum is Horvitz-Thompson scaled, so the estimate stays unbiased: thinking tokens,
    n_T = min(N_T, ⌊mi_think_share · budget / 2⌋) sampled (2 probes each; at least 1, and room
    left for one run), scaled by N_T / n_T; the other tokens in runs of MI_RUN rationale tokens
    (the rationale cut at multiples of MI_RUN), n_C runs from the rest of the budget (MI_RUN + 1
    probes each), scaled by N_C / n_C, N_C = runs holding a non-thinking token. u_think [N, T], u_run
    [N, ⌈T/MI_RUN⌉]: the sampling keys (probe_keys), needed only when some branch is sampled.
    """
    rat = rationale_mask
    think = think_mask & rat
    N, T = rat.shape
    tw, ow, idx = cfg.think_weight, cfg.other_weight, torch.arange(T, device=rat.device)
    m = torch.where(think, tw, ow) * rat  # (N, T): m_t on R, else 0
    n_rat = rat.sum(-1)
    exact = n_rat + 1 <= cfg.mi_budget if cfg.mi_budget > 0 else torch.ones_like(n_rat, dtype=torch.bool)
    lin = half_abs = torch.where(exact[:, None], m / 2, 0.0)
    level = torch.zeros(N, T, device=rat.device)
    counted, ends = exact[:, None] & rat, torch.zeros_like(rat)
    if not bool(exact.all()):
        r = (rat.cumsum(-1) - 1).clamp(min=0)  # rationale index at rationale positions
        run = torch.where(rat, r // MI_RUN, u_run.shape[1])  # (N, T): run id; padding -> a spill bin
        n_think = think.sum(-1)
        # at least one pair and one run (when the stratum has tokens): an unsampled stratum would bias
        cap_t = min(max(1, int(cfg.mi_think_share * cfg.mi_budget) // 2), (cfg.mi_budget - 2 - MI_RUN - 1) // 2)
        n_t = n_think.clamp(max=cap_t)
        other = rat & ~think
        has_other = torch.zeros(N, u_run.shape[1] + 1, dtype=torch.long, device=rat.device)
        has_other = has_other.scatter_add(1, run, other.long())[:, :-1] > 0  # (N, runs)
        n_runs = has_other.sum(-1)
        n_c = torch.minimum(n_runs, (cfg.mi_budget - 2 - 2 * n_t) // (MI_RUN + 1))  # 2: I_0 and I_|R|
        pick_t = sample_without_replacement(u_think, think, n_t)
        pick_c = sample_without_replacement(u_run, has_other, n_c)
        pick_c = F.pad(pick_c, (0, 1)).gather(1, run) & other  # (N, T): the other tokens of picked runs
        s_t, s_c = ((total / n.clamp(min=1))[:, None] for total, n in ((n_think, n_t), (n_runs, n_c)))
        sampled = ~exact[:, None]
        lin = torch.where(sampled, pick_t * (tw - ow) / 2 * s_t, lin)
        half_abs = torch.where(sampled, pick_t * tw / 2 * s_t + pick_c * ow / 2 * s_c, half_abs)
        at_first = idx == torch.where(rat, idx, T).min(-1, keepdim=True).values - 1  # I_0: before the rationale
        at_last = idx == torch.where(rat, idx, -1).max(-1, keepdim=True).values  # I_|R|
        level = torch.where(sampled, (at_last.float() - at_first.float()) * ow / 2, level)
        ends = sampled & (at_first | at_last)
        counted = torch.where(sampled, pick_t | pick_c, counted)
    probed = counted | F.pad(counted[:, 1:], (0, 1)) | ends  # t and t − 1 of every counted token
    Q = int(probed.sum(-1).max())
    pos = torch.where(probed, idx, T + idx).sort(-1).values[:, :Q]  # probed positions first, in order
    valid = pos < T
    pos = torch.where(valid, pos, 0)
    coef = torch.stack([lin, half_abs, level], -1).gather(1, pos[:, :, None].expand(N, Q, 3))
    return pos, valid, torch.where(valid[:, :, None], coef, 0.0)


def mi_estimate(info, coef):
    """Σ_t m_t max(ΔI_t, 0), exact or estimated, from a probe_plan's coef [N, Q, 3] and the probed
    I [N, Q]: Σ_q a_q d_q + b_q |d_q| + c_q I_q with d_q = I_q − I_{q−1} (q >= 1) -> [N]."""
    d = info[:, 1:] - info[:, :-1]
    return (coef[:, 1:, 0] * d + coef[:, 1:, 1] * d.abs()).sum(-1) + (coef[..., 2] * info).sum(-1)


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


PROBE_ROW = 4  # blocks per row: short rows pad less and each query scans T + 4·P keys, not T + Q·P


def probe_log_likelihood(raw, kv, attention_mask, pos, valid, probe_ids, probe_answer_mask):
    """I [N, Q] = log p(y | x, r_<=pos) for every probed position, in one no-grad pass (Eq. 2).

    kv: the training pass's per-layer (k, v) [N, G, T, D], detached; probe_ids, probe_answer_mask
    [N, P] (cue ⊕ y, then padding). Each branch's Q blocks are cut into rows of PROBE_ROW, every
    row attending to its branch's cached K/V; rows with no valid block are skipped. Invalid
    blocks score 0. The LM head and log-softmax run in fp32 even under bf16 autocast: S_MI keeps
    only the positive part of differences of I, so rounding noise would turn into gain.
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


def adaptability_scores(raw, kv, batch, cfg, rng_key=()):
    """S_MI (SPEC §3.1, Eq. 2-3): (1/|R_k|) Σ_t m_t max(I_t − I_{t−1}, 0), [B, K], exact or estimated.

    probe_plan picks the positions and their coefficients; the estimate is unbiased for Eq. 3, its
    sample a function of (rng_key, instance b), shared by the instance's branches. kv: aux.kv, detached.
    """
    B, K, T = batch["input_ids"].shape
    flat = {k: batch[k].reshape(B * K, T) for k in ("attention_mask", "rationale_mask", "think_mask")}
    dev = batch["input_ids"].device
    b = torch.arange(B, device=dev).repeat_interleave(K)[:, None]  # (BK, 1): one sample per instance
    pos, valid, coef = probe_plan(flat["rationale_mask"], flat["think_mask"], cfg, *probe_keys(rng_key, b, T))
    if not bool(valid.any()):  # no rationale anywhere: nothing to probe
        return torch.zeros(B, K, device=dev)
    probe = batch["probe_ids"].repeat_interleave(K, 0), batch["probe_answer_mask"].repeat_interleave(K, 0)
    info = probe_log_likelihood(raw, kv, flat["attention_mask"], pos, valid, *probe)  # (N, Q)
    s = mi_estimate(info, coef) / flat["rationale_mask"].sum(-1).clamp(min=1)
    return s.view(B, K)


# --- fusion (SPEC §3.4) and the consistency loss (SPEC §4) ---

def fuse_weights(s_mi, s_g, s_d, branch_mask, cfg):
    """w [B, K] (SPEC §3.4, Eq. 7): softmax((α Z(S_MI) + β Z(S_G) − γ Z(S_D)) / T) per instance.

    Z(s) = (s − mean) / max(std, z_floor · mean|s|, 1e-6) over the instance's valid branches
    (population std): the floor keeps differences at the level of numerical noise from becoming
    ±1 z-scores. Padding branches get weight 0; uniform weighting gives exactly 1/K_valid.
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

    logp [B, K, J, V]: log P_k^j, the student's distribution at the position predicting answer
    token j; answer_valid [B, K, J]. BKL(k,i) = mean_j ½[KL(P_k‖P_i) + KL(P_i‖P_k)], written as
    Σ_v P log P − Σ_v P_k log P_i so no [K, K, V] tensor is built. detach: the other side is a
    fixed target. Zero for a branch with no valid partner.
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

    L_k = L_SFT,k + λ L_MCon,k; w from the scores under no_grad, detached, so one backward
    gives Σ_k w_k ∇L_k. n_instances: instances of the whole optimizer step over all
    micro-batches and ranks (default: this batch's B), so every instance counts once. rng_key:
    ints that fix S_MI's sample (train.py: seed, step, rank, micro-batch), like dropout's seed.
    stats, detached tensors: [B, K] s_mi s_g s_d weight l_sft l_mcon (0 for padding branches);
    scalars loss = sft + λ·mcon (the two weighted parts, same normalisation), weight_entropy
    (Σ over instances of −Σ_k w_k log w_k, same normalisation) and tokens (supervised tokens). Decision: scores are read in the model's current mode (LoRA dropout
    on while training, as in the K/V the probe reuses); padding branches run through the
    forward (right-padded, causal) and are masked afterwards.
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


# --- per-teacher summaries (train.py's metrics, compact.py score) ---

TEACHER_STATS = ("weight", "s_mi", "s_g", "s_d")


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


# --- CLI: score a multi-teacher file with the student, no training ---

def score(a, cfg):
    """Write one JSON line per rationale with its scores and weight; return (per-teacher means
    with how often each teacher was an instance's top weight, the data stats).

    Scores come from compact_loss itself under no_grad, so they are what training would weight
    with, less LoRA dropout (mcon_lambda is set to 0: the consistency logits are not needed)."""
    from data import collate, encode_dataset, load_multi_teacher, write_jsonl
    from lora import load_student

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available on this machine")
    device = torch.device(a.device)
    model, tok = load_student(a.model, a.adapter, a.dtype, device)
    encoded, info = encode_dataset(load_multi_teacher(a.data)[:a.limit], tok, max_len=a.max_len)
    if not encoded:
        raise ValueError(f"{a.data}: no instance has a rationale that fits --max-len {a.max_len}")
    if info.get("dropped_branches"):
        per = ", ".join(f"{t} {n}" for t, n in sorted(info.get("dropped_per_teacher", {}).items()))
        print(f"{info['dropped_branches']} rationale(s) longer than --max-len {a.max_len} left out ({per})", file=sys.stderr)
    teachers, rows = info["teachers"], []
    sums, top = torch.zeros(len(teachers), len(TEACHER_STATS) + 1), [0] * len(teachers)
    with torch.no_grad():
        for i in range(0, len(encoded), a.batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i:i + a.batch_size], tok.pad_id).items()}
            _, st = compact_loss(model, batch, cfg, rng_key=(i,))  # S_MI's sample: fixed per batch
            sums += teacher_sums(st, batch["teacher"], batch["branch_mask"], len(teachers)).cpu()
            st = {k: st[k].float().cpu().tolist() for k in TEACHER_STATS}
            for b, enc in enumerate(encoded[i:i + a.batch_size]):
                top[enc.teacher[max(range(len(enc.teacher)), key=lambda k: st["weight"][b][k])]] += 1
                rows += [{"id": enc.id, "teacher": teachers[t], **{key: st[key][b][k] for key in TEACHER_STATS}}
                         for k, t in enumerate(enc.teacher)]
    write_jsonl(a.out, rows)
    means, drops = teacher_means(sums, teachers), info.get("dropped_per_teacher", {})
    return {t: {**means.get(t, {"n": 0}), "top": top[j], "dropped": drops.get(t, 0)}  # every rationale dropped: n 0
            for j, t in enumerate(teachers) if t in means or drops.get(t)}, info


def main(argv=None):
    from data import add_config_args, config_from_args, write_json

    p = argparse.ArgumentParser(description="COMPACT scores and weights of every rationale, no training.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a multi-teacher file with the student")
    s.add_argument("--model", required=True, help="Hugging Face model directory (the student)")
    s.add_argument("--adapter", help="PEFT LoRA directory to load on top")
    s.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC.md §8)")
    s.add_argument("--out", required=True, help="scores JSONL, one line per rationale")
    s.add_argument("--limit", type=int, help="first N instances only")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--max-len", type=int, default=2048, help="longer branches are left out")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_config_args(s, CompactConfig)
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.max_len < 1 or (a.limit is not None and a.limit < 1):
        p.error("--batch-size, --max-len and --limit must be >= 1")
    try:
        cfg = replace(config_from_args(CompactConfig, a), mcon_lambda=0.0)  # scores only: no consistency logits
        summary, info = score(a, cfg)
    except (OSError, ValueError, KeyError) as e:  # bad directories, files or settings; DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    write_json(os.path.splitext(a.out)[0] + ".settings.json", {"score": vars(a), "compact": asdict(cfg),
                                                               "data_stats": {k: v for k, v in info.items() if k != "teachers"}})
    print(f"{'teacher':<24} {'n':>6} {'weight':>7} {'s_mi':>8} {'s_g':>7} {'s_d':>7} {'top':>6} {'dropped':>8}")
    nan = float("nan")
    for t, r in summary.items():  # dropped: rationales longer than --max-len, left out
        print(f"{t:<24} {r['n']:>6} {r.get('weight', nan):>7.3f} {r.get('s_mi', nan):>8.4f} {r.get('s_g', nan):>7.3f} "
              f"{r.get('s_d', nan):>7.3f} {r['top']:>6} {r['dropped']:>8}")


if __name__ == "__main__":
    main()
