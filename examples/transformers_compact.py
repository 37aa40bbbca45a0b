"""COMPACT in a plain transformers + PEFT training loop: the porting path, runnable.

    python examples/transformers_compact.py --model DIR --data FILE --out DIR [--steps 20]

A Qwen2ForCausalLM or LlamaForCausalLM from a Hugging Face directory gets a PEFT LoRA adapter and
trains on the multi-teacher JSONL (SPEC.md §8). Each instance's K branches are right-padded rows
[N, T], as a transformers collator gives them; the model runs as usual, and compact.py's
compact_objective turns its per-token losses, the final layer's attention input, the answer
log-probabilities and a probe callable into the COMPACT weights and the weighted loss.

What comes from this project: compact.py (the method), and data.py / tokenizer.py to read the
JSONL and tokenize each branch segment by segment, so the answer's ids are the same in every
branch (docs/porting.md says what to copy). Left out: gradient accumulation, several ranks, a
schedule and checkpoints (train.py has them). The S_MI probe here is one plain forward per
rationale prefix, batched: simple, and O(|R|) forwards per branch, where compact.py's packed
probe is one pass.
"""
import argparse
import contextlib
import os
import sys
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project

from common import (DataError, add_config_args, atomic_path, check_outputs, config_from_args,
                    user_errors, write_json)
from compact import (Branches, CompactConfig, compact_objective, positions,
                     teacher_means, teacher_sums)
from data import ANSWER, PROMPT, RATIONALE, load_data
from lora import TARGETS

PROG = "transformers_compact.py"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ExampleConfig:
    model: str = ""  # Hugging Face directory of a Qwen2 or Llama causal LM, with tokenizer.json
    data: str = ""  # multi-teacher JSONL (SPEC.md §8)
    out: str = "runs/transformers-compact"  # where the PEFT adapter and settings.json go
    steps: int = 20  # optimizer steps
    lr: float = 2e-4  # AdamW learning rate (constant)
    batch_size: int = 2  # instances per step, each with its K branches
    max_len: int = 2048  # tokens per branch; a longer branch is dropped, never cut
    lora_rank: int = 16  # PEFT LoRA on q,k,v,o,gate,up,down
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    probe_batch: int = 32  # S_MI probe sequences per forward
    seed: int = 0  # data order and the S_MI probe sample
    dtype: str = "float32"  # float32 or bfloat16 weights
    device: str = "cpu"  # cpu, cuda, ...

    def __post_init__(self):
        for flag in ("steps", "batch_size", "max_len", "lora_rank", "probe_batch"):
            if getattr(self, flag) < 1:
                raise DataError(f"--{flag.replace('_', '-')} must be >= 1")
        if not self.lr > 0 or self.max_grad_norm < 0 or not 0 <= self.lora_dropout < 1:
            raise DataError("--lr must be > 0, --max-grad-norm >= 0, --lora-dropout in [0, 1)")
        if self.dtype not in DTYPES:
            raise DataError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise DataError(f"--model {self.model!r}: no config.json there")
        if not os.path.isfile(self.data):
            raise DataError(f"--data {self.data!r}: no such file")
        if os.path.isfile(self.out):
            raise DataError(f"--out {self.out}: a file, not a directory")
        check_outputs([("--out", self.out)], [("--model", self.model), ("--data", self.data)])


# --- a padded batch, as a transformers collator gives it ---

def padded_batch(encoded, pad_id):
    """B encoded instances (data.EncodedInstance) as N right-padded branch rows: input_ids,
    attention_mask and the token masks [N, T]; branch_mask and teacher [B, K] (row n = the n-th
    True of branch_mask, row-major); probes: per row (prompt ⊕ rationale ids, prompt length,
    cue ⊕ y ids, which of those are y)."""
    rows = [(e, br) for e in encoded for br in e.branches]
    T = max(len(ids) for _, (ids, _, _) in rows)

    def pad(x, value):
        return x + [value] * (T - len(x))
    codes = torch.tensor([pad(c, -1) for _, (_, c, _) in rows])  # (N, T); −1: padding
    K = max(len(e.branches) for e in encoded)
    teacher = torch.tensor([e.teacher + [-1] * (K - len(e.teacher)) for e in encoded])  # (B, K)
    probes = []
    for e, (ids, c, _) in rows:
        L = c.count(PROMPT)
        probes.append((ids[:L + c.count(RATIONALE)], L, e.probe_ids, e.probe_answer_mask))
    return dict(input_ids=torch.tensor([pad(ids, pad_id) for _, (ids, _, _) in rows]),
                attention_mask=(codes >= 0).long(), sft_mask=codes > PROMPT,
                rationale_mask=codes == RATIONALE, answer_mask=codes == ANSWER,
                think_mask=torch.tensor([pad(t, False) for _, (_, _, t) in rows]),
                branch_mask=teacher >= 0, teacher=teacher, probes=probes)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# --- the model's side: forward, final attention input, probe ---

def decoder(model):
    """The PEFT model's decoder stack (LoRA layers in place) and its LM head."""
    causal_lm = model.get_base_model()
    return causal_lm.model, causal_lm.lm_head


@contextlib.contextmanager
def captured(module):
    """A list that receives the output of module's forward (detached) while inside."""
    seen = []

    def keep(mod, args, out):
        seen.append(out.detach())
    handle = module.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def answer_information(model, probes, plan, chunk=32):
    """I [N, Q] = log p(y | x, r_≤t) at t = plan.prefix where plan.valid (SPEC §3.1, Eq. 2): one
    forward of prompt ⊕ r_≤t ⊕ cue ⊕ y per prefix, right-padded, chunk sequences at a time; the
    LM head in fp32 at the rows that predict y only."""
    body, head = decoder(model)
    dev = plan.prefix.device
    jobs = plan.valid.nonzero().tolist()
    info = torch.zeros(plan.prefix.shape, device=dev)
    for i in range(0, len(jobs), chunk):
        seqs, reads = [], []
        for n, q in jobs[i:i + chunk]:
            ids, L, probe, scored = probes[n]
            start = L + int(plan.prefix[n, q])  # the probe's first token
            seqs.append(ids[:start] + probe)
            reads += [(len(seqs) - 1, start + j - 1, probe[j], n, q) for j in range(len(probe))
                      if scored[j]]  # token j is read at the row before it
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=dev)
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=dev)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (n, T, C)
        row, col, target, n, q = torch.tensor(reads, device=dev).T
        logits = F.linear(hidden[row, col].float(), head.weight.float())  # (M, V)
        logp = -F.cross_entropy(logits, target, reduction="none")
        info.index_put_((n, q), logp, accumulate=True)
    return info


def compact_step(model, batch, cfg, rng_key=(), n_instances=None, probe_batch=32):
    """(loss, stats) of compact.compact_objective for a padded_batch and a PEFT causal LM."""
    body, _ = decoder(model)
    attn = body.layers[-1].self_attn
    with captured(body.layers[-1].input_layernorm) as seen:  # the final attention's input
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids = batch["input_ids"]
    N, T, V = logits.shape
    # token t's loss is read at row t − 1, as compact.py reads every log-probability
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1),
                          reduction="none")
    nll = F.pad(nll.view(N, T - 1), (1, 0))  # (N, T)
    answer = positions(batch["answer_mask"])  # (N, J): each branch's answer tokens, in order
    rows = (answer.clamp(min=1) - 1)[..., None].expand(-1, -1, V)
    answer_logp = logits.gather(1, rows).float().log_softmax(-1)  # (N, J, V)
    bm = batch["branch_mask"]

    def table(x):  # per row [N, ...] -> [B, K, ...]
        out = x.new_zeros(*bm.shape, *x.shape[1:])
        out[bm] = x
        return out
    branches = Branches(table(nll), table(batch["sft_mask"]), table(batch["rationale_mask"]),
                        table(batch["think_mask"]), table(seen[0]), table(answer_logp),
                        table(answer >= 0), bm)
    info = partial(answer_information, model, batch["probes"], chunk=probe_batch)
    return compact_objective(branches, attn.q_proj, attn.k_proj, attn.head_dim, info, cfg,
                             n_instances, rng_key)


# --- the loop ---

def load_model(cfg):
    """AutoModelForCausalLM from cfg.model with a fresh PEFT LoRA adapter (B = 0)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=DTYPES[cfg.dtype])
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[-1], "input_layernorm"):
        raise DataError(f"--model {cfg.model}: {type(model).__name__} is not a Llama/Qwen2-style "
                        "decoder (model.layers[i].input_layernorm, self_attn.q_proj, k_proj)")
    lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                           lora_dropout=cfg.lora_dropout, target_modules=list(TARGETS),
                           task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora).to(cfg.device)


def train(cfg, ccfg):
    """cfg.steps AdamW steps of the COMPACT loss; returns the last step's stats."""
    tok, encoded, data_stats = load_data(cfg.model, cfg.data, cfg.max_len)
    model = load_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    order = []
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:  # a fresh permutation each pass over the data
            order += torch.randperm(len(encoded), generator=g).tolist()
        picked = [encoded[i] for i in order[:cfg.batch_size]]
        order = order[cfg.batch_size:]
        batch = to_device(padded_batch(picked, tok.pad_id), cfg.device)
        loss, stats = compact_step(model, batch, ccfg, (cfg.seed, step), None, cfg.probe_batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sums = teacher_sums(stats, batch["teacher"], batch["branch_mask"],
                            len(data_stats["teachers"]))
        means = teacher_means(sums, data_stats["teachers"])
        weights = " ".join(f"{t} {m['weight']:.2f}" for t, m in means.items())
        print(f"step {step + 1}/{cfg.steps} | loss {loss.item():.4f} | w {weights}", flush=True)
    with atomic_path(cfg.out) as tmp:  # a kill leaves the old adapter or the new, never a mix
        model.save_pretrained(tmp)  # a PEFT adapter directory
        write_json(os.path.join(tmp, "settings.json"),
                   {"example": asdict(cfg), "compact": asdict(ccfg)})
    return stats


def parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_config_args(p, ExampleConfig)
    add_config_args(p, CompactConfig)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors(PROG):
        cfg = config_from_args(ExampleConfig, args)
        train(cfg, config_from_args(CompactConfig, args))


if __name__ == "__main__":
    main()
