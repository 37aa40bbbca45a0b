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
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F

from model import KVCache, Transformer


@dataclass
class CompactConfig:
    weighting: str = "compact"  # "compact" (Eq. 7) or "uniform" (w_k = 1/K_valid, "Direct Avg.")
    alpha: float = 1.0  # weight of Z(S_MI); 0 switches it off and skips the probe pass (--no-mi)
    beta: float = 1.0  # weight of Z(S_G); 0 switches it off (--no-consensus)
    gamma: float = 1.0  # weight of Z(S_D); 0 switches it off (--no-difficulty)
    temperature: float = 1.0  # T of the softmax in Eq. 7
    mcon_lambda: float = 0.1  # λ of Eq. 10; 0 drops the consistency loss and its logits
    mcon_detach: bool = False  # BKL treats the other branch as a fixed target
    mi_stride: int = 16  # probe every n-th rationale position; 1 = every position (exact Eq. 3)
    mi_max_probes: int = 64  # cap on probed rationale positions per branch (when mi_stride > 1)
    think_weight: float = 1.0  # m_t for a token that starts a thinking word
    other_weight: float = 0.1  # m_t for every other rationale token

    def __post_init__(self):
        if self.weighting not in ("compact", "uniform"):
            raise ValueError(f"weighting must be 'compact' or 'uniform', got {self.weighting!r}")
        if min(self.alpha, self.beta, self.gamma, self.mcon_lambda, self.think_weight, self.other_weight) < 0:
            raise ValueError("alpha, beta, gamma, mcon_lambda, think_weight and other_weight must be >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mi_stride < 1 or self.mi_max_probes < 1:
            raise ValueError("mi_stride and mi_max_probes must be >= 1")


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


def token_nll(lm_head, h, targets, rows=None):
    """−log p(targets | h) row by row: h [M, C], targets [M] -> [M] fp32 (LinearNLL).

    Logits exist one chunk of `rows` rows at a time. Default: 2^23 values (32 MB fp32; on 2 CPU
    cores 128-256 rows of a 32k vocabulary were fastest, whole [M, V] logits 20% slower), but at
    least 128 rows, so a 152k vocabulary still feeds a GPU matmul of useful height.
    """
    V = lm_head.weight.shape[0]
    rows = rows or max(128, 2**23 // V)
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm_head.weight.dtype
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


def probe_plan(rationale_mask, think_mask, sft_mask, cfg):
    """Which prefixes the S_MI probe reads (SPEC §3.1); masks [N, T] -> three [N, Q] tensors.

    pos[:, q] is the last main token the probe consumed (its block sits at pos+1..): column 0 is
    the prompt's last token (I_0), then the probed rationale positions in order. think[:, q] says
    a thinking token lies in (pos[q−1], pos[q]], the interval whose gain column q is credited.
    mi_stride=1: every rationale position, no cap. Otherwise every mi_stride-th (after each
    mi_stride tokens consumed), t−1 and t of each thinking token t, and the last position; past
    mi_max_probes an evenly spaced subset that keeps the last (Decision). I_0 is not counted.
    """
    rat = rationale_mask
    think = think_mask & rat
    N, T = rat.shape
    idx = torch.arange(T, device=rat.device)
    if cfg.mi_stride == 1:
        keep = rat
    else:
        r = rat.cumsum(-1)  # 1-based rationale index at rationale positions
        before_think = F.pad(think[:, 1:], (0, 1)) & rat
        cand = rat & ((r % cfg.mi_stride == 0) | think | before_think | (r == r[:, -1:]))
        n, rank = cand.sum(-1, keepdim=True).clamp(min=1), cand.cumsum(-1) - 1
        cap = cfg.mi_max_probes
        keep = cand & ((rank + 1) * cap // n > rank * cap // n)  # exactly min(n, cap), last one kept
    Q = int(keep.sum(-1).max())
    pos_r = torch.where(keep, idx, T + idx).sort(-1).values[:, :Q]  # kept positions first, in order
    prompt_end = (sft_mask.int().argmax(-1) - 1).clamp(min=0)  # token before the first supervised one
    pos = torch.cat([prompt_end[:, None], pos_r], 1)  # (N, 1+Q)
    valid = torch.cat([rat.any(-1, keepdim=True), pos_r < T], 1)
    pos = torch.where(valid, pos, 0)
    think_upto = think.cumsum(-1).gather(1, pos)  # thinking tokens at positions <= pos
    think_in = F.pad(think_upto[:, 1:] > think_upto[:, :-1], (1, 0))
    return pos, valid, think_in


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


def probe_log_likelihood(raw, kv, attention_mask, pos, valid, probe_ids, probe_answer_mask):
    """I [N, Q] = log p(y | x, r_<=pos) for every probed position, in one no-grad pass (Eq. 2).

    kv: the training pass's per-layer (k, v) [N, G, T, D], detached; probe_ids, probe_answer_mask
    [N, P] (cue ⊕ y, then padding). Each branch's Q blocks are cut into rows of PROBE_ROW, every
    row attending to its branch's cached K/V; rows with no valid block are skipped. Invalid
    blocks score 0.
    """
    N, T = attention_mask.shape
    Q, P = pos.shape[1], probe_ids.shape[1] - 1  # the last probe token predicts nothing: not fed
    if bool(probe_answer_mask[:, 0].any()):
        raise ValueError("the probe's first token must be the cue, not an answer token")
    dev = pos.device
    C = min(PROBE_ROW, Q)
    n_rows = -(-Q // C)
    pos_r = F.pad(pos, (0, n_rows * C - Q)).view(N * n_rows, C)  # (N·rows, C)
    valid_r = F.pad(valid, (0, n_rows * C - Q)).view(N * n_rows, C)
    keep = valid_r.any(-1)
    src = torch.arange(N, device=dev).repeat_interleave(n_rows)[keep]  # (R,): each row's branch
    pos_r, valid_r = pos_r[keep], valid_r[keep]
    R = src.numel()
    ids = probe_ids[src, None, :-1].expand(R, C, P).reshape(R, C * P)
    position_ids = (pos_r[:, :, None] + 1 + torch.arange(P, device=dev)).reshape(R, C * P)
    see_main = (torch.arange(T, device=dev) <= pos_r[:, :, None]) & attention_mask[src, None] & valid_r[:, :, None]
    see_main = see_main[:, :, None].expand(R, C, P, T).reshape(R, C * P, T)  # (R, CP, T)
    blk, j = torch.arange(C * P, device=dev) // P, torch.arange(C * P, device=dev) % P
    see_probe = (blk[:, None] == blk[None, :]) & (j[None, :] <= j[:, None])  # (CP, CP), block-causal
    mask = torch.cat([see_main, see_probe.expand(R, -1, -1)], dim=-1)  # (R, CP, T + CP)
    cache = [KVCache.from_kv(k[src], v[src], C * P) for k, v in kv]
    h = raw(ids, position_ids=position_ids, mask=mask, cache=cache, return_hidden=True).view(R, C, P, -1)
    scored = probe_answer_mask[src, None, 1:] & valid_r[:, :, None]  # (R, C, P): token j predicts j+1
    targets = probe_ids[src, None, 1:].expand(R, C, P)
    logp = -token_nll(raw.lm_head, h[scored], targets[scored])
    info = torch.zeros(N * n_rows, C, device=dev)
    info[keep] = torch.zeros(scored.shape, device=dev).masked_scatter(scored, logp).sum(-1)
    return info.view(N, n_rows * C)[:, :Q]


def adaptability_scores(raw, kv, batch, cfg):
    """S_MI (SPEC §3.1, Eq. 2-3): S_MI,k = (1/|R_k|) Σ_t m_t max(I_t − I_{t−1}, 0), [B, K].

    With mi_stride > 1 the gain between consecutive probed positions is credited to the later
    one, with m = think_weight if a thinking token lies in the interval. kv: aux.kv, detached.
    """
    B, K, T = batch["input_ids"].shape
    flat = {k: batch[k].reshape(B * K, T) for k in ("attention_mask", "rationale_mask", "think_mask", "sft_mask")}
    pos, valid, think_in = probe_plan(flat["rationale_mask"], flat["think_mask"], flat["sft_mask"], cfg)
    if not bool(valid.any()):  # no rationale anywhere: nothing to probe
        return torch.zeros(B, K, device=pos.device)
    probe = batch["probe_ids"].repeat_interleave(K, 0), batch["probe_answer_mask"].repeat_interleave(K, 0)
    info = probe_log_likelihood(raw, kv, flat["attention_mask"], pos, valid, *probe)  # (N, Q)
    gain = (info[:, 1:] - info[:, :-1]).clamp(min=0)  # ΔI credited to column q >= 1
    m = torch.where(think_in[:, 1:], cfg.think_weight, cfg.other_weight) * valid[:, 1:]
    s = (m * gain).sum(-1) / flat["rationale_mask"].sum(-1).clamp(min=1)
    return s.view(B, K)


# --- fusion (SPEC §3.4) and the consistency loss (SPEC §4) ---

def fuse_weights(s_mi, s_g, s_d, branch_mask, cfg):
    """w [B, K] (SPEC §3.4, Eq. 7): softmax((α Z(S_MI) + β Z(S_G) − γ Z(S_D)) / T) per instance.

    Z is the z-score over the instance's valid branches (population std, + 1e-6); padding
    branches get weight 0; uniform weighting gives exactly 1/K_valid.
    """
    m = branch_mask.float()
    n = m.sum(-1, keepdim=True).clamp(min=1)
    if cfg.weighting == "uniform":
        return m / n
    def z(s):
        s = torch.where(branch_mask, s.float(), 0.0)
        mean = s.sum(-1, keepdim=True) / n
        std = (((s - mean) ** 2 * m).sum(-1, keepdim=True) / n).sqrt()
        return torch.where(branch_mask, (s - mean) / (std + 1e-6), 0.0)
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

def compact_loss(model, batch, cfg, n_instances=None):
    """(loss, stats) for one batch (SPEC §9 dict): loss = Σ_b Σ_k w_bk L_bk / n_instances (Eq. 8-11).

    L_k = L_SFT,k + λ L_MCon,k; w from the scores under no_grad, detached, so one backward
    gives Σ_k w_k ∇L_k. n_instances: instances of the whole optimizer step over all
    micro-batches and ranks (default: this batch's B), so every instance counts once.
    stats, detached tensors: [B, K] s_mi s_g s_d weight l_sft l_mcon (0 for padding branches);
    scalars loss = sft + λ·mcon (the two weighted parts, same normalisation) and tokens
    (supervised tokens). Decision: scores are read in the model's current mode (LoRA dropout
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
            s_mi = adaptability_scores(raw, [(k.detach(), v.detach()) for k, v in aux.kv], batch, cfg)
        w = fuse_weights(s_mi, s_g, s_d, bm, cfg)

    per_branch = l_sft + cfg.mcon_lambda * l_mcon
    loss = (w * per_branch).sum() / n_instances
    stats = dict(s_mi=s_mi, s_g=s_g, s_d=s_d, weight=w, l_sft=l_sft.detach(), l_mcon=l_mcon.detach(),
                 loss=loss.detach(), sft=(w * l_sft).sum().detach() / n_instances,
                 mcon=(w * l_mcon).sum().detach() / n_instances, tokens=sft.sum())
    return loss, stats


# --- CLI: score a multi-teacher file with the student, no training ---

def score(a, cfg):
    """Write one JSON line per rationale with its scores and weight; return per-teacher means.

    Scores come from compact_loss itself under no_grad, so they are what training would weight
    with, less LoRA dropout (mcon_lambda is set to 0: the consistency logits are not needed)."""
    from data import Tokenizer, collate, encode_dataset, load_multi_teacher

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}: CUDA is not available on this machine")
    device = torch.device(a.device)
    tok = Tokenizer.from_pretrained(a.model)
    model = Transformer.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device=device)
    if a.adapter:
        from lora import load_adapter
        load_adapter(model, a.adapter)
    model.eval()
    instances = load_multi_teacher(a.data)[:a.limit]
    encoded, info = encode_dataset(instances, tok, max_len=a.max_len)
    if not encoded:
        raise ValueError(f"{a.data}: no instance has a rationale that fits --max-len {a.max_len}")
    if info.get("dropped_branches"):
        print(f"{info['dropped_branches']} rationale(s) longer than --max-len {a.max_len} left out", file=sys.stderr)
    teachers = info["teachers"]
    sums = {t: dict(n=0, weight=0.0, s_mi=0.0, s_g=0.0, s_d=0.0, top=0) for t in teachers}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f, torch.no_grad():
        for i in range(0, len(encoded), a.batch_size):
            chunk = encoded[i:i + a.batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, tok.pad_id).items()}
            _, st = compact_loss(model, batch, cfg)
            st = {k: st[k].float().cpu().tolist() for k in ("s_mi", "s_g", "s_d", "weight")}
            for b, enc in enumerate(chunk):
                top = max(range(len(enc.teacher)), key=lambda k: st["weight"][b][k])
                for k, t in enumerate(enc.teacher):
                    row = {key: st[key][b][k] for key in ("s_mi", "s_g", "s_d", "weight")}
                    f.write(json.dumps({"id": enc.id, "teacher": teachers[t], **row}) + "\n")
                    s = sums[teachers[t]]
                    s["n"], s["top"] = s["n"] + 1, s["top"] + (k == top)
                    for key, v in row.items():
                        s[key] += v
    return {t: {k: (v / s["n"] if k not in ("n", "top") else v) for k, v in s.items()} for t, s in sums.items() if s["n"]}


def main(argv=None):
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
    for fld in fields(CompactConfig):
        flag = "--" + fld.name.replace("_", "-")
        if fld.type in (bool, "bool"):
            s.add_argument(flag, action="store_true")
        else:
            s.add_argument(flag, type=type(fld.default), default=fld.default)
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.max_len < 1 or (a.limit is not None and a.limit < 1):
        p.error("--batch-size, --max-len and --limit must be >= 1")
    try:
        cfg = CompactConfig(**{fld.name: getattr(a, fld.name) for fld in fields(CompactConfig)})
        cfg = replace(cfg, mcon_lambda=0.0)  # scores only: no consistency logits
        summary = score(a, cfg)
    except (OSError, ValueError, KeyError) as e:  # bad directories, files or settings; DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.splitext(a.out)[0] + ".settings.json", "w") as f:
        json.dump({"score": {k: v for k, v in vars(a).items()}, "compact": asdict(cfg)}, f, indent=2)
    print(f"{'teacher':<24} {'n':>6} {'weight':>7} {'s_mi':>8} {'s_g':>7} {'s_d':>7} {'top':>6}")
    for t, r in summary.items():
        print(f"{t:<24} {r['n']:>6} {r['weight']:>7.3f} {r['s_mi']:>8.4f} {r['s_g']:>7.3f} {r['s_d']:>7.3f} {r['top']:>6}")


if __name__ == "__main__":
    main()
