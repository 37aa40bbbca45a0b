"""Speed of compact-ref: a COMPACT training step, the one-pass S_MI probe, transformers + PEFT.

    python bench.py [--json] [--threads 2] [--compile]   # default CPU shape: a table (or one JSON line)
    python bench.py --device cuda --shape qwen2.5-1.5b --no-naive --no-hf

All synthetic: a Qwen2-shaped model with random weights (default "small": hidden 512, 8 layers, 8/2
heads, intermediate 1408, vocab 32000, tied, 40M: issue 15's shape, where lm_head is 42% of the
linear weights) and random ids laid out by data.collate (SPEC §9): a 32-token prompt, K rationales
(branch 0 fills T, the others are up to 10% shorter) with a thinking mark on ~1 token in 32, then
cue (4) ⊕ y (4) ⊕ close ⊕ eot. LoRA r=16, alpha=32, dropout 0 on all 7 projections; AdamW. A step
is train.train_step (forward, backward, clipping, AdamW, stats sync) at compact.py's default
CompactConfig (--mi-budget overrides its budget); "sft" is uniform weights without L_MCon, the
plain LoRA SFT step set against transformers + PEFT (same weights, batch, dtype, optimizer and
clipping; its loss shifts labels over full logits). --compile adds torch.compile'd blocks of both
(model.compile_blocks; the layers of the PEFT model likewise) and reports the first two calls' time less two warm calls (compile, then a recompile: the first
block's input needs no grad, the others' do).
Timing: a warmup call of each configuration, then --repeats rounds running each --steps times in
turn (load from other processes falls on all alike); the median round, and ratios as the median
[min, max] of per-round ratios; cuda.synchronize around each. Peak memory per configuration: the
most tensor memory one call holds above what was allocated before it (CUDA: the allocator's peak;
CPU: the running sum of the profiler's allocation events, one extra untimed call). CUDA differs
only in synchronize, the bf16 base and bf16 autocast (as train.py).
MFU = model FLOPs of the LoRA training pass / step time / peak dense bf16 (989e12 H100/H200, 312e12
A100), per real token 4·N_frozen + 6·N_lora (no weight gradients for the frozen base) + 12·L·T·C
(attention, PaLM's term); N = linear weights incl. lm_head. The probe pass is not counted.
Left out: multi-GPU, data loading and tokenisation, generation.
"""
import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from compact import CompactConfig, adaptability_scores, probe_log_likelihood, probe_plan, rationale_view, token_nll
from data import ANSWER, CLOSE, CUE, EOT, PROMPT, RATIONALE, EncodedInstance, Instance, add_config_args, collate, \
    config_from_args
from lora import TARGETS, apply_lora
from model import ModelArgs, Transformer, compile_blocks
from train import TrainConfig, train_step

ROOT = os.path.dirname(os.path.abspath(__file__))

SIZE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")  # Qwen2, tied embeddings
SHAPES = {"small": (512, 8, 8, 2, 1408, 32000), "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, FLOP/s
PROMPT_LEN, CUE_LEN, ANSWER_LEN = 32, 4, 4


@dataclass
class BenchConfig:
    device: str = "cpu"  # cpu or cuda
    dtype: str = ""  # float32 or bfloat16 for the frozen base; "" = bfloat16 on cuda, float32 on cpu
    shape: str = "small"  # a SHAPES preset; the six size flags below override it (0 = the preset's)
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    batch: int = 1  # instances per step (B)
    branches: int = 4  # teacher rationales per instance (K)
    seq: int = 256  # tokens of the longest branch (T)
    steps: int = 1  # calls per configuration per round
    repeats: int = 3  # timed rounds after one warmup; the median is reported
    lora_rank: int = 16  # alpha = 2 * rank
    mi_budget: int = CompactConfig.mi_budget  # COMPACT's S_MI probes per branch, in the step and in mi_agreement
    mi_questions: int = 8  # mi_agreement: instances (GSM8K questions), 4 rationales each
    mi_long_words: int = 380  # words of each long thinking-dense rationale (600+ tokens)
    mi_keys: int = 16  # sampled estimates per instance (rng keys); 4 read tau 0.73 where 16 read 0.78
    mi_train_steps: int = 200  # plain LM steps for the agreement student (60 left ΔI_t at noise level, std 0.025)
    mi_vocab: int = 1024  # its BPE tokenizer, trained on the bench's own texts
    no_mi: bool = False  # skip mi_agreement
    grad_checkpointing: bool = False  # recompute each layer in backward (ours and HF's)
    compile: bool = False  # also time torch.compile'd blocks (ours and HF's) against each other
    no_naive: bool = False  # skip the per-prefix probe loop (big shapes)
    no_hf: bool = False  # skip transformers + PEFT
    json: bool = False  # print one JSON line instead of the table
    threads: int = 0  # torch.set_num_threads (0 = torch's default); 1 is steadier on a loaded machine
    seed: int = 0

    def __post_init__(self):
        if self.device not in ("cpu", "cuda") or self.dtype not in ("", "float32", "bfloat16") or self.shape not in SHAPES:
            raise ValueError(f"--device is cpu or cuda, --dtype float32 or bfloat16, --shape one of {', '.join(SHAPES)}")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        for name, value in zip(SIZE_FIELDS, SHAPES[self.shape]):
            setattr(self, name, getattr(self, name) or value)
        if min(self.batch, self.branches, self.steps, self.repeats, self.lora_rank, self.mi_questions, self.mi_keys) < 1:
            raise ValueError("--batch, --branches, --steps, --repeats, --lora-rank, --mi-questions, --mi-keys must be >= 1")
        if self.seq < PROMPT_LEN + CUE_LEN + ANSWER_LEN + 12:
            raise ValueError(f"--seq must be >= {PROMPT_LEN + CUE_LEN + ANSWER_LEN + 12} (prompt, rationale, answer block)")


def hf_config(c: BenchConfig) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu",
            "hidden_size": c.hidden, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads, "intermediate_size": c.intermediate, "vocab_size": c.vocab,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
            "use_sliding_window": False, "sliding_window": None, "torch_dtype": c.dtype}


def synth_batch(c: BenchConfig, seed=0) -> dict:
    """A SPEC §9 batch of random ids through data.collate: B instances × K branches, longest = T."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, c.vocab - 1, (n,), generator=g).tolist()
    instances = []
    for b in range(c.batch):
        prompt, cue, y = rand(PROMPT_LEN), rand(CUE_LEN), rand(ANSWER_LEN)
        tail = [(cue, CUE), (y, ANSWER), (rand(1), CLOSE), ([c.vocab - 1], EOT)]
        branches = []
        for k in range(c.branches):
            n = c.seq - PROMPT_LEN - CUE_LEN - ANSWER_LEN - 2
            n -= int(torch.randint(0, c.seq // 10 + 1, (1,), generator=g)) if k else 0
            segments = [(prompt, PROMPT), (rand(n), RATIONALE)] + tail
            think = [False] * PROMPT_LEN + (torch.rand(n, generator=g) < 1 / 32).tolist() + [False] * (CUE_LEN + ANSWER_LEN + 2)
            branches.append(([i for ids, _ in segments for i in ids], [s for ids, s in segments for _ in ids], think))
        instances.append(EncodedInstance(f"bench-{b}", branches, list(range(c.branches)), cue + y,
                                         [False] * CUE_LEN + [True] * ANSWER_LEN))
    return collate(instances, pad_id=0)


def build_model(c: BenchConfig, device, save_dir=None):
    """Random Qwen2 → base dtype → (saved for transformers) → LoRA (fp32) → device, as train.build_model."""
    cfg = hf_config(c)
    torch.manual_seed(c.seed)
    with device:  # initialise on the device: a 1.5B fp32 init on a CPU takes minutes
        model = Transformer(ModelArgs.from_hf_config(cfg), cfg).to(getattr(torch, c.dtype))
    if save_dir:
        model.save_pretrained(save_dir)
    apply_lora(model, rank=c.lora_rank, alpha=2 * c.lora_rank, dropout=0.0)
    model.gradient_checkpointing = c.grad_checkpointing
    return model.to(device).train()


def build_hf_peft(c: BenchConfig, path, device):
    """The same weights as transformers' Qwen2ForCausalLM + PEFT LoRA of the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()  # stderr noise around the table
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, c.dtype), attn_implementation="sdpa").to(device)
    if c.grad_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=c.lora_rank, lora_alpha=2 * c.lora_rank, target_modules=list(TARGETS), lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    return get_peft_model(hf, lora).train()  # adapters fp32 (PEFT's autocast_adapter_dtype), like ours


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns, c: BenchConfig, device, peaks=None):
    """Median seconds per call of each fn (see the file docstring), and the per-round times under
    the key "rounds"; peaks: name -> CUDA peak bytes."""
    times = {name: [] for name in fns}
    for r in range(c.repeats + 1):  # round 0 is the warmup
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(c.steps if r else 1):
                fn()
            sync(device)
            times[name] += [(time.perf_counter() - t0) / c.steps] if r else []
            if peaks is not None and device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    return {**{name: statistics.median(t) for name, t in times.items()}, "rounds": times}


def ratio(rounds, a, b):
    """time(a) / time(b): the median of the per-round ratios and their [min, max]."""
    r = [x / y for x, y in zip(rounds[a], rounds[b])]
    return statistics.median(r), [min(r), max(r)]


def step_peak_bytes(fn, device):
    """The most tensor memory one call of fn holds above what was allocated before it."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def our_step(model, batch, ccfg, device, autocast):
    """One train.train_step (one micro-batch) under CompactConfig ccfg."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tcfg = TrainConfig(model="random", data="synthetic", max_grad_norm=1.0)
    B, K, _ = batch["input_ids"].shape
    return lambda: train_step(model, opt, [batch], 1e-4, B, K, tcfg, ccfg, device, autocast)


def hf_step(hf, batch, autocast, loss0=True):
    """(step, loss before training or None): plain SFT cross-entropy over the [B·K, T] tokens, labels
    masked as our sft_mask, the same optimizer and clipping as train_step."""
    B, K, T = batch["input_ids"].shape
    ids, attn = batch["input_ids"].view(B * K, T), batch["attention_mask"].view(B * K, T)
    labels = torch.where((batch["sft_mask"] & batch["branch_mask"][..., None]).view(B * K, T), ids, -100)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    def step():
        with autocast():
            loss = hf(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # the host sync train_step's stats make too
    if not loss0:  # a compiled model would compile its no-grad graphs too
        return step, None
    with torch.no_grad(), autocast():
        return step, hf(input_ids=ids, attention_mask=attn, labels=labels).loss.item()


def token_mean_nll(model, batch):
    """Our mean NLL over the supervised tokens (the number transformers' loss reports); no grad."""
    B, K, T = batch["input_ids"].shape
    ids = batch["input_ids"].view(B * K, T)
    sel = (batch["sft_mask"] & batch["branch_mask"][..., None]).view(B * K, T)[:, 1:]
    h = model(ids, return_hidden=True)
    return token_nll(model.lm_head, h[:, :-1][sel], ids[:, 1:][sel]).mean().item()


def probe_fns(model, batch):
    """The exact (stride 1) I_t of branch 0 three ways: one pass with its own main forward, the probe
    pass alone from given K/V, and the obvious loop: one forward of prompt ⊕ r_≤t ⊕ cue ⊕ y per
    prefix, one at a time (logits only where y is read, so the loop is not charged the full vocab)."""
    one = {k: batch[k][0, :1] for k in ("input_ids", "attention_mask", "rationale_mask", "think_mask", "sft_mask")}
    probe_ids, probe_mask = batch["probe_ids"][:1], batch["probe_answer_mask"][:1]
    n_rat, think, start = rationale_view(one["rationale_mask"], one["think_mask"])
    plan = probe_plan(n_rat, think, CompactConfig(mi_budget=0))
    pos, valid = start[:, None] - 1 + plan.prefix, plan.valid
    scored = probe_mask[0].nonzero().flatten()  # probe index j of each y token, read at j − 1
    with torch.no_grad():
        _, kv_aux = model(one["input_ids"], return_hidden=True, return_aux=True)
    def probe_only(kv=kv_aux.kv):
        return probe_log_likelihood(model, kv, one["attention_mask"], pos, valid, probe_ids, probe_mask)[0]
    def one_pass():
        _, aux = model(one["input_ids"], return_hidden=True, return_aux=True)
        return probe_only(aux.kv)
    def naive():
        out = []
        for p in pos[0].tolist():
            seq = torch.cat([one["input_ids"][0, :p + 1], probe_ids[0]])  # (p + 1 + P,)
            h = model(seq[None], return_hidden=True)[0]  # (p + 1 + P, C)
            out.append(-token_nll(model.lm_head, h[p + scored], probe_ids[0, scored]).sum())
        return torch.stack(out)
    return {"one_pass_probe": one_pass, "probe_given_kv": probe_only, "naive_probe": naive}


def flops_per_step(model, batch, c: BenchConfig):
    """Model FLOPs of one LoRA training pass (file docstring): real tokens × per-token FLOPs."""
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and p.dim() == 2)  # tied: once
    if not model.args.tie_word_embeddings:  # an untied embedding is a lookup, not a matmul
        n_frozen -= model.model.embed_tokens.weight.numel()
    T = batch["input_ids"].shape[-1]
    per_token = 4 * n_frozen + 6 * n_lora + 12 * c.layers * T * c.heads * model.args.head_dim
    return int(batch["attention_mask"].sum()) * per_token


def hf_layers(hf):
    return hf.get_base_model().model.layers


# --- S_MI agreement: the default estimate against exact Eq. 3 on long thinking-dense rationales ---

BENCHMARKS = os.path.join(ROOT, "..", "shared", "benchmarks")
MUSING_WORDS = ("Wait", "Hmm", "So", "But", "Let", "Maybe", "Okay", "Now", "Then", "Alternatively")


def _gsm8k_solution(text):
    """A GSM8K solution without its <<calculator>> notes and the '#### answer' line; (text, answer)."""
    body, _, answer = text.partition("####")
    return re.sub(r"<<[^>]*>>", "", body).strip(), answer.strip().replace(",", "")


def mi_instances(c: BenchConfig):
    """(instances, source): per question 3 short rationales (the GSM8K solution as written, with a
    check, with a restatement) and one long thinking-dense one of about c.mi_long_words words (600+
    tokens), the shape of the issue's measurement: the solution's sentences spread among musings, a
    thinking word and 2-4 prose words of MATH500 solutions each (about one thinking word in seven
    tokens). Without the benchmark files: synthesised text, and the source says so."""
    gsm, mth = os.path.join(BENCHMARKS, "gsm8k_test.jsonl"), os.path.join(BENCHMARKS, "math500_test.jsonl")
    rng = random.Random(c.seed)
    if os.path.exists(gsm) and os.path.exists(mth):
        rows = [json.loads(line) for line in open(gsm, encoding="utf-8")][:c.mi_questions]
        qa = [(r["question"], *_gsm8k_solution(r["answer"])) for r in rows]
        filler = [w for line in open(mth, encoding="utf-8") for w in json.loads(line)["solution"].split()
                  if re.fullmatch(r"[A-Za-z]+[,.]?", w)]  # its prose words: LaTeX would dilute the thinking words
        source = "GSM8K test solutions + MATH500 solution text"
    else:
        qa = [(f"Tom has {a} apples and buys {b} more. How many apples?", f"He has {a} + {b} = {a + b} apples.",
               str(a + b)) for a, b in ((rng.randint(2, 50), rng.randint(2, 50)) for _ in range(c.mi_questions))]
        filler = ("we could count the pieces again and check each total against the sums above " * 50).split()
        source = "synthesised text (no benchmark files found)"
    instances = []
    for i, (q, sol, ans) in enumerate(qa):
        sentences = re.split(r"(?<=[.\n])\s+", sol)
        def long_trace():  # the solution's sentences in order, spread among musings
            musings = []
            while sum(len(x.split()) for x in musings) + len(sol.split()) < c.mi_long_words:
                j = rng.randrange(len(filler) - 8)
                musings.append(f"{rng.choice(MUSING_WORDS)}, {' '.join(filler[j:j + rng.randint(2, 4)]).rstrip(',.')}.")
            every = max(1, len(musings) // len(sentences))
            return " ".join(m for i, x in enumerate(musings) for m in ([sentences[i // every]] if i % every == 0
                            and i // every < len(sentences) else []) + [x]) + " " + sentences[-1]
        rationales = [("short", sol), ("short-check", f"{sol} Check: that gives {ans}."),
                      ("short-restated", f"We need the total asked for. {sol}"), ("long", long_trace())]
        instances.append(Instance(f"mi-{i}", q, ans, "gsm8k", rationales))
    return instances, source


def train_student(model, batches, steps, lr=3e-3):
    """A few AdamW steps of plain next-token loss on the bench's own branches, so that I_t responds to
    the rationale (a random student's I_t is nearly flat and its gains are noise)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for s in range(steps):
        b = batches[s % len(batches)]
        ids, sel = b["input_ids"][0], (b["sft_mask"] & b["branch_mask"][..., None])[0][:, 1:]
        h = model(ids, return_hidden=True)
        token_nll(model.lm_head, h[:, :-1][sel], ids[:, 1:][sel]).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def kendall_tau(a, b):
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum(math.copysign(1, (a[i] - a[j]) * (b[i] - b[j])) if (a[i] - a[j]) * (b[i] - b[j]) else 0
               for i, j in pairs) / len(pairs)


def mi_agreement(c: BenchConfig) -> dict:
    """Default S_MI vs exact Eq. 3 on mi_instances with a briefly trained student: mean Kendall tau over each
    instance's branches, mean relative error (all branches; the long one, the last), top-1 agreement, mean
    probes per branch, probe-pass seconds summed over instances (the default's averaged over its keys)."""
    from data import encode_dataset
    from tokenizer import Tokenizer, write_tokenizer
    instances, source = mi_instances(c)
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        texts = [i.question for i in instances] + [t for i in instances for _, t in i.rationales]
        tok = Tokenizer.from_pretrained(write_tokenizer(tmp, texts, vocab_size=c.mi_vocab))
    encoded, _ = encode_dataset(instances, tok, max_len=10**6)
    batches = [collate([e], tok.pad_id) for e in encoded]
    cfg = hf_config(BenchConfig(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=tok.vocab_size))
    torch.manual_seed(c.seed)
    model = train_student(Transformer(ModelArgs.from_hf_config(cfg), cfg), batches, c.mi_train_steps)
    default, exact_cfg = CompactConfig(mi_budget=c.mi_budget), CompactConfig(mi_budget=0)
    pairs, probes, secs, long_tokens, think_density = [], {"default": [], "exact": []}, {"default": 0.0, "exact": 0.0}, [], []
    with torch.no_grad():
        for batch in batches:
            B, K, T = batch["input_ids"].shape
            flat = {k: batch[k].view(K, T) for k in ("input_ids", "rationale_mask", "think_mask")}
            _, aux = model(flat["input_ids"], return_hidden=True, return_aux=True)
            t0 = time.perf_counter()
            exact = adaptability_scores(model, aux.kv, batch, exact_cfg)[0].tolist()
            secs["exact"] += time.perf_counter() - t0
            n_rat, think, _ = rationale_view(flat["rationale_mask"], flat["think_mask"])
            probes["exact"] += (n_rat + 1).tolist()
            for key in range(c.mi_keys):
                t0 = time.perf_counter()
                pairs.append((exact, adaptability_scores(model, aux.kv, batch, default, rng_key=(key,))[0].tolist()))
                secs["default"] += (time.perf_counter() - t0) / c.mi_keys
                probes["default"] += probe_plan(n_rat, think, default, (key,), [0] * K).valid.sum(-1).tolist()
            for n, th in zip(n_rat.tolist(), think.tolist()):
                if n >= 2 * c.mi_budget:
                    long_tokens.append(n)
                    think_density.append(sum(th[:n]) / n)
    r = {"mi_source": source, "mi_instances": len(batches), "mi_long_rationale_tokens": statistics.mean(long_tokens) if long_tokens else None,
         "mi_long_think_density": statistics.mean(think_density) if think_density else None,
         "mi_tau_default": statistics.mean(kendall_tau(e, s) for e, s in pairs),
         "mi_rel_err_default": statistics.mean(abs(s_ - e_) / e_ for e, s in pairs for e_, s_ in zip(e, s) if e_ > 0),
         "mi_rel_err_long_default": statistics.mean(abs(s[-1] - e[-1]) / e[-1] for e, s in pairs if e[-1] > 0),
         "mi_top1_default": statistics.mean(max(range(len(e)), key=e.__getitem__) == max(range(len(s)), key=s.__getitem__)
                                            for e, s in pairs)}
    r.update({f"mi_probes_{name}": statistics.mean(n) for name, n in probes.items()})
    r.update({f"mi_probe_s_{k}": v for k, v in secs.items()})
    return r


def run_bench(c: BenchConfig) -> dict:
    """Every measurement as one dict (the --json line); times in seconds per call."""
    device = torch.device(c.device)
    if c.threads:
        torch.set_num_threads(c.threads)
    cuda_bf16 = device.type == "cuda" and c.dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda_bf16 else contextlib.nullcontext
    hf_ok = not c.no_hf and all(importlib.util.find_spec(m) for m in ("transformers", "peft"))
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        model = build_model(c, device, tmp if hf_ok else None)
        batch = {k: v.to(device) for k, v in synth_batch(c, c.seed).items()}
        with torch.no_grad(), autocast():
            our_loss0 = token_mean_nll(model, batch)  # LoRA B = 0: the base model's loss
        stride = {"mi_budget": c.mi_budget}
        configs = {"compact": CompactConfig(**stride), "compact_no_mi": CompactConfig(**stride, alpha=0.0),
                   "uniform": CompactConfig(weighting="uniform"), "sft": CompactConfig(weighting="uniform", mcon_lambda=0.0)}
        peaks = {}
        times = interleaved({n: our_step(model, batch, cc, device, autocast) for n, cc in configs.items()}, c, device, peaks)
        rounds = times.pop("rounds")
        sup_tokens = int((batch["sft_mask"] & batch["branch_mask"][..., None]).sum())
        cu, cu_range = ratio(rounds, "compact", "uniform")
        r = {"tokens_per_s": sup_tokens / times["compact"], "compact_over_uniform": cu, "compact_over_uniform_range": cu_range,
             "probe_share": 1 - times["compact_no_mi"] / times["compact"],  # alpha = 0 skips only the probe pass
             "probe_speedup": None, "probe_max_abs_diff": None, "vs_hf_peft": None, "vs_hf_peft_range": None,
             "vs_hf_peft_compiled": None, "vs_hf_peft_compiled_range": None, "compile_s": None, "hf_loss_abs_diff": None,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux; before HF
             "peak_mem_mb": peaks["compact"] / 2**20 if peaks else None, "mfu": None, "step_peak_mb": {}}
        if not c.no_naive:
            fns = probe_fns(model, batch)
            with torch.no_grad(), autocast():
                times.update(interleaved({k: fns[k] for k in ("one_pass_probe", "probe_given_kv")}, c, device))
                times.pop("rounds")
                sync(device)  # the loop is timed once: it is itself 1 + |R| forwards
                t0 = time.perf_counter()
                naive = fns["naive_probe"]()
                sync(device)
                times["naive_probe"] = time.perf_counter() - t0
                r["probe_max_abs_diff"] = (fns["one_pass_probe"]() - naive).abs().max().item()
            r.update(probe_speedup=times["naive_probe"] / times["one_pass_probe"], probe_prefixes=len(naive))
        pair = {"sft_vs_hf": our_step(model, batch, configs["sft"], device, autocast)}
        if c.compile:
            compiled = compile_blocks(build_model(c, device))  # the same seed: the same weights
            pair["sft_compiled"] = our_step(compiled, batch, configs["sft"], device, autocast)
        if hf_ok:
            hf = build_hf_peft(c, tmp, device)
            pair["hf_peft"], loss0 = hf_step(hf, batch, autocast)
            r["hf_loss_abs_diff"] = abs(loss0 - our_loss0)
            if c.compile:
                hf_c = build_hf_peft(c, tmp, device)
                # Its layers' wrapper (GradientCheckpointingLayer) recompiles per layer instance: let
                # all of them compile rather than run eager past dynamo's default limit of 8.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * c.layers)
                for layer in hf_layers(hf_c):
                    layer.compile()
                pair["hf_peft_compiled"], _ = hf_step(hf_c, batch, autocast, loss0=False)
        first = {}
        for name in [k for k in pair if k.endswith("compiled")]:  # compiles, then recompiles for the first
            sync(device)                                            # block's input (no grad) vs the others'
            t0 = time.perf_counter()
            pair[name]()
            pair[name]()
            sync(device)
            first[name] = time.perf_counter() - t0
        times.update(interleaved(pair, c, device))
        rounds = times.pop("rounds")
        if hf_ok:
            r["vs_hf_peft"], r["vs_hf_peft_range"] = ratio(rounds, "hf_peft", "sft_vs_hf")
        if c.compile:
            r["compile_s"] = {k: t - 2 * times[k] for k, t in first.items()}  # two first calls less two warm ones
            if hf_ok:
                r["vs_hf_peft_compiled"], r["vs_hf_peft_compiled_range"] = ratio(rounds, "hf_peft_compiled", "sft_compiled")
        for name, fn in pair.items():
            r["step_peak_mb"][name] = step_peak_bytes(fn, device) / 2**20
        r["step_peak_mb"]["compact"] = step_peak_bytes(our_step(model, batch, configs["compact"], device, autocast), device) / 2**20
        del pair
    if device.type == "cuda":
        r["device_name"] = name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if cuda_bf16 and peak:
            r["mfu"] = flops_per_step(model, batch, c) / times["compact"] / peak
            r["mfu_sft"] = flops_per_step(model, batch, c) / times["sft_vs_hf"] / peak
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    if not c.no_mi:
        r.update(mi_agreement(c))
    r.update(times_s=times, supervised_tokens=sup_tokens, params_m=n_params / 1e6, config=asdict(c),
             torch=torch.__version__, threads=torch.get_num_threads(), loadavg=_loadavg())
    return r


def _loadavg():
    """The 1-minute load average at the end (Linux/macOS), so a reader knows how busy the machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def print_table(r: dict):
    c = r["config"]
    print(f"{c['shape']} ({c['hidden']}x{c['layers']}, vocab {c['vocab']}, {r['params_m']:.1f}M) on {c['device']} {c['dtype']}, "
          f"B={c['batch']} K={c['branches']} T={c['seq']}, {r['supervised_tokens']} supervised tokens, {r['threads']} threads"
          + (f", load average {r['loadavg']:.1f}" if r["loadavg"] is not None else ""))
    fmt = lambda v: "null" if v is None else f"{v:,.4g}"
    span = lambda k: f"  [{r[k + '_range'][0]:.3f}, {r[k + '_range'][1]:.3f}]" if r.get(k + "_range") else ""
    rows = [(f"{name} (s/call)", f"{t:.4f}") for name, t in r["times_s"].items()]
    rows += [(k, fmt(r[k]) + span(k)) for k in ("tokens_per_s", "compact_over_uniform", "probe_share", "probe_speedup",
             "probe_max_abs_diff", "vs_hf_peft", "vs_hf_peft_compiled", "hf_loss_abs_diff", "peak_rss_mb", "peak_mem_mb", "mfu")]
    rows += [(f"compile {k} (s)", f"{v:.1f}") for k, v in (r["compile_s"] or {}).items()]
    rows += [(f"step peak {k} (MB)", f"{v:,.0f}") for k, v in r["step_peak_mb"].items()]
    rows += [(k, v if isinstance(v, str) else fmt(v)) for k, v in r.items() if k.startswith("mi_") and v is not None]
    for k, v in rows:
        print(f"{k:<28} {v:>10}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, BenchConfig)
    try:
        c = config_from_args(BenchConfig, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    r = run_bench(c)
    print(json.dumps(r)) if c.json else print_table(r)


if __name__ == "__main__":
    main()
