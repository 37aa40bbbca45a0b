"""Speed of compact-ref on the shapes users have: a COMPACT training step, the one-pass S_MI probe
and its agreement with exact Eq. 3, against transformers + PEFT on the same instances.

    python bench.py [--json] [--threads 2] [--compile] [--mix long,equal] [--mi-model DIR]
    python bench.py --device cuda --shape qwen2.5-1.5b --mix long --no-naive --no-mi

Synthetic ids on a random Qwen2-shaped model ("small": hidden 512, 8 layers, 8/2 heads,
intermediate 1408, vocab 32000, tied, 40M), LoRA r=16, alpha 32, dropout 0 on all 7 projections,
AdamW. An instance is a 32-token prompt and K rationales with thinking marks, then
cue (4) ⊕ y (4) ⊕ close ⊕ eot. Mixes (MIXES): "long", four teachers, two instruct-style (about 40
and 80 tokens) and two long traces (about 400 and 700), each ±25% per question, B = 4; "equal",
K = 4 branches of --seq tokens (the others up to 10% shorter), B = 1.

Per mix: supervised tokens/s of a COMPACT step (train.train_step), the tokens of the padded
[B, K, T] layout and of the packed row, step peak memory with and without gradient checkpointing,
COMPACT/uniform and the probe's share (alpha = 0 skips only the probe), and transformers + PEFT
(the same weights, the batch padded to [B·K, T] as its users run it) over our plain LoRA SFT step.
Timing: a warmup call, then --repeats rounds running each configuration --steps times in turn; the
median round, ratios as the median [min, max] of per-round ratios. Peak memory: the most tensor
memory a call holds above what was live before it (CUDA: the allocator; CPU: the profiler). MFU:
see flops_per_step; the probe is not counted. Results and how to read them: docs/speed.md.
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
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from resource import RUSAGE_SELF, getrusage
from statistics import mean, median

import torch

from common import add_config_args, config_from_args, read_jsonl
from compact import (CompactConfig, mi_estimate, packed_forward, probe_information, probe_plan,
                     rationale_view, token_nll)
from data import (ANSWER, CLOSE, CUE, EOT, PROMPT, RATIONALE, EncodedInstance, Instance, collate,
                  encode_dataset, to_device)
from lora import TARGETS, apply_lora
from model import ModelArgs, Transformer, compile_blocks
from train import TrainConfig, train_step

ROOT = os.path.dirname(os.path.abspath(__file__))
# Qwen2 sizes, tied embeddings
SIZE_FIELDS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")
SHAPES = {"small": (512, 8, 8, 2, 1408, 32000), "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, FLOP/s
PROMPT_LEN = 32
CUE_LEN = 4
ANSWER_LEN = 4
# name: (rationale lengths, spread, B)
MIXES = {"long": ((40, 80, 400, 700), 0.25, 4), "equal": (None, 0.1, 1)}
# --mi-sweep: these laws and the default
LAWS = {"fixed 48 (the previous default)": dict(mi_budget=48, mi_budget_frac=0.0, mi_budget_cap=0),
        "fixed 96": dict(mi_budget=96, mi_budget_frac=0.0, mi_budget_cap=0),
        "max(64, 0.3 |R|), cap 192": dict(mi_budget=64, mi_budget_frac=0.3, mi_budget_cap=192)}


@dataclass
class BenchConfig:
    device: str = "cpu"  # cpu or cuda
    dtype: str = ""  # float32 or bfloat16, the frozen base's; "" = bfloat16 on cuda, float32 on cpu
    shape: str = "small"  # a SHAPES preset; the six size flags below override it (0 = the preset's)
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    mix: str = "long,equal"  # comma-separated MIXES to measure
    seq: int = 256  # tokens of the longest branch of the "equal" mix
    steps: int = 1  # calls per configuration per round
    repeats: int = 3  # timed rounds after one warmup; the median is reported
    lora_rank: int = 16  # alpha = 2 * rank
    mi_questions: int = 8  # mi_agreement: instances (GSM8K questions), 4 rationales each
    mi_long_words: int = 380  # words of each long thinking-dense rationale (600+ tokens)
    mi_keys: int = 16  # sampled estimates per instance (rng keys)
    mi_train_steps: int = 200  # plain LM steps of the agreement student (60 left ΔI_t as noise)
    mi_vocab: int = 1024  # its BPE tokenizer, trained on the bench's own texts
    mi_model: str = ""  # also a real student for mi_agreement (a Hugging Face dir, its tokenizer)
    mi_sweep: bool = False  # also every law in LAWS: mi_agreement, the long mix's COMPACT/uniform
    no_mi: bool = False  # skip mi_agreement
    compile: bool = False  # also time torch.compile'd blocks (ours and HF's) against each other
    no_naive: bool = False  # skip the per-prefix probe loop (big shapes)
    no_hf: bool = False  # skip transformers + PEFT
    json: bool = False  # print one JSON line instead of the same dict indented
    threads: int = 0  # torch.set_num_threads (0 = torch's default); 1 is steadier when loaded
    seed: int = 0

    def __post_init__(self):
        bad = self.device not in ("cpu", "cuda") or self.dtype not in ("", "float32", "bfloat16")
        if bad or self.shape not in SHAPES or not set(self.mix.split(",")) <= set(MIXES):
            raise ValueError(f"--device is cpu or cuda, --dtype float32 or bfloat16, --shape one "
                             f"of {', '.join(SHAPES)}, --mix from {', '.join(MIXES)}")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        for name, value in zip(SIZE_FIELDS, SHAPES[self.shape]):
            setattr(self, name, getattr(self, name) or value)
        if min(self.steps, self.repeats, self.lora_rank, self.mi_questions, self.mi_keys) < 1:
            raise ValueError("--steps, --repeats, --lora-rank, --mi-questions, --mi-keys "
                             "must be >= 1")
        shortest = PROMPT_LEN + CUE_LEN + ANSWER_LEN + 12
        if self.seq < shortest:
            raise ValueError(f"--seq must be >= {shortest}")


def random_qwen2(c: BenchConfig) -> Transformer:
    """Our Transformer, randomly initialised, of a Qwen2 config.json with c's sizes and dtype."""
    cfg = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
               vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.intermediate,
               num_hidden_layers=c.layers, num_attention_heads=c.heads,
               num_key_value_heads=c.kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
               max_position_embeddings=32768, tie_word_embeddings=True, use_sliding_window=False,
               sliding_window=None, torch_dtype=c.dtype)
    return Transformer(ModelArgs.from_hf_config(cfg), cfg)


def synth_instances(c: BenchConfig, mix, seed=0):
    """EncodedInstances of random ids in a MIXES shape; thinking marks on 1 token in 32 (1 in 8
    past 200 tokens)."""
    g = random.Random(seed)
    lengths, spread, B = MIXES[mix]

    def rand(n):
        return [g.randrange(c.vocab - 1) for _ in range(n)]

    tail = [CUE] * CUE_LEN + [ANSWER] * ANSWER_LEN + [CLOSE, EOT]
    answer_mask = [False] * CUE_LEN + [True] * ANSWER_LEN
    out = []
    for b in range(B):
        prompt = rand(PROMPT_LEN)
        cue = rand(CUE_LEN)
        y = rand(ANSWER_LEN)
        if lengths:
            ns = [round(m * g.uniform(1 - spread, 1 + spread)) for m in lengths]
        else:  # the first branch is the longest, --seq tokens
            free = c.seq - PROMPT_LEN - len(tail)
            ns = [free - (g.randint(0, c.seq // 10) if k else 0) for k in range(4)]
        branches = []
        for n in ns:
            ids = prompt + rand(n) + cue + y + rand(1) + [c.vocab - 1]
            codes = [PROMPT] * PROMPT_LEN + [RATIONALE] * n + tail
            rate = 1 / 8 if n > 200 else 1 / 32
            thinking = [g.random() < rate for _ in range(n)]
            branches.append((ids, codes, [False] * PROMPT_LEN + thinking + [False] * len(tail)))
        teachers = list(range(len(ns)))
        out.append(EncodedInstance(f"bench-{b}", branches, teachers, cue + y, answer_mask))
    return out


def right_pad(rows, value, device):
    """[len(rows), T] tensor of the rows right-padded with value to the longest, T."""
    T = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (T - len(row)) for row in rows], device=device)


def mix_data(c, mix, device):
    """(EncodedInstances, our packed row, the [B·K, T] batch right-padded as transformers users
    pad it)."""
    encoded = synth_instances(c, mix, c.seed)
    rows = [(ids, codes) for e in encoded for ids, codes, _ in e.branches]
    labels = [[t if s > PROMPT else -100 for t, s in zip(ids, codes)] for ids, codes in rows]
    hf = {"input_ids": right_pad([ids for ids, _ in rows], 0, device),
          "attention_mask": right_pad([[1] * len(ids) for ids, _ in rows], 0, device),
          "labels": right_pad(labels, -100, device)}
    return encoded, to_device(collate(encoded), device), hf


def build_model(c: BenchConfig, device, save_dir=None):
    """Random Qwen2 → base dtype → (saved for transformers) → LoRA (fp32) → device, as
    train.build_model."""
    torch.manual_seed(c.seed)
    with device:  # initialise on the device: a 1.5B fp32 init on a CPU takes minutes
        model = random_qwen2(c).to(getattr(torch, c.dtype))
    if save_dir:
        model.save_pretrained(save_dir)
    apply_lora(model, rank=c.lora_rank, alpha=2 * c.lora_rank, dropout=0.0)
    return model.to(device).train()


def build_hf_peft(c: BenchConfig, path, device, compiled=False):
    """The same weights as transformers' Qwen2ForCausalLM + PEFT LoRA of the same settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, logging
    logging.disable_progress_bar()  # stderr noise around the output
    dtype = getattr(torch, c.dtype)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=c.lora_rank, lora_alpha=2 * c.lora_rank, target_modules=list(TARGETS),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    # adapters in fp32 (PEFT's autocast_adapter_dtype), as ours
    hf = get_peft_model(hf.to(device), lora).train()
    if compiled:  # its layer wrapper recompiles per layer instance: let all compile, none run eager
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 4 * c.layers)
        for layer in hf.get_base_model().model.layers:
            layer.compile()
    return hf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, calls=1):
    """(seconds per call over `calls` calls of fn, the device synchronised around them; the last
    result)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / calls, out


def interleaved(fns, c: BenchConfig, device):
    """({name: median seconds per call}, {name: per-round seconds}) of each fn, rounds taken in
    turn."""
    rounds = {name: [] for name in fns}
    for r in range(c.repeats + 1):
        for name, fn in fns.items():
            t, _ = timed(fn, device, c.steps if r else 1)
            if r:  # round 0 is the warmup
                rounds[name].append(t)
    return {name: median(t) for name, t in rounds.items()}, rounds


def step_peak_mb(fn, device):
    """The most tensor memory one call of fn holds above what was allocated before it, MB."""
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed(fn, device)  # one call, the device synchronised before and after
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0)) / 2**20


def our_step(model, batch, ccfg, device, autocast):
    """One train.train_step (one micro-batch) under CompactConfig ccfg."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = TrainConfig(model="random", data="synthetic")
    B, K = batch["branch_mask"].shape
    return lambda: train_step(model, opt, [batch], 1e-4, B, K, cfg, ccfg, device, autocast)


def hf_step(hf, pad, autocast):
    """Plain SFT cross-entropy over the padded [B·K, T] batch; train_step's optimizer, clipping."""
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast():
            loss = hf(**pad).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # the host sync train_step's stats make too
    return step


def bench_mix(c, mix, encoded, batch, pad, model, hf, hf_dir, device, autocast):
    """Every step measurement of one mix (mix_data), as a dict (see the file docstring); the
    models train."""
    real = sum(len(ids) for e in encoded for ids, _, _ in e.branches)
    padded = pad["input_ids"].numel()
    r = dict(instances=len(encoded), branches=batch["branch_mask"].shape[1],
             longest=pad["input_ids"].shape[1], supervised=int(batch["sft_mask"].sum()),
             tokens_padded=padded, tokens_real=real, tokens_packed=len(batch["input_ids"]),
             padding_before=1 - real / padded)
    sweep = c.mi_sweep and mix == "long"
    laws = {"compact": {}, **{f"compact {k}": kw for k, kw in LAWS.items() if sweep}}
    configs = {"uniform": dict(weighting="uniform"), "compact_no_mi": dict(alpha=0.0),
               "sft": dict(weighting="uniform", mcon_lambda=0.0), **laws}
    fns = {}
    for name, kw in configs.items():
        fns[name] = our_step(model, batch, CompactConfig(**kw), device, autocast)
    if hf is not None:
        fns["hf_peft"] = hf_step(hf, pad, autocast)
    if c.compile:
        compiled = compile_blocks(build_model(c, device))
        sft = CompactConfig(**configs["sft"])
        fns["sft_compiled"] = our_step(compiled, batch, sft, device, autocast)
        if hf is not None:
            hf_compiled = build_hf_peft(c, hf_dir, device, True)
            fns["hf_peft_compiled"] = hf_step(hf_compiled, pad, autocast)
        # the first two calls: compile, then recompile (no-grad input); less two warm calls below
        r["compile_s"] = {k: 2 * timed(fns[k], device, 2)[0] for k in fns if k.endswith("compiled")}
    times, rounds = interleaved(fns, c, device)
    r["times_s"] = times
    r["tokens_per_s"] = r["supervised"] / times["compact"]
    r["probe_share"] = 1 - times["compact_no_mi"] / times["compact"]
    # (key, a, b): time a / time b, as the median of the per-round ratios and their [min, max]
    ratios = [(k.replace("compact", "compact_over_uniform"), k, "uniform") for k in laws]
    hf_names = [k for k in times if k.startswith("hf_peft")]
    ratios += [(f"vs_{k}", k, k.replace("hf_peft", "sft")) for k in hf_names]
    for key, a, b in ratios:
        x = [p / q for p, q in zip(rounds[a], rounds[b])]
        r[key] = median(x)
        r[key + "_range"] = [min(x), max(x)]
    if c.compile:
        r["compile_s"] = {k: t - 2 * times[k] for k, t in r["compile_s"].items()}
    r["step_peak_mb"] = {}
    for gc in (True, False):  # checkpointing off at the end: the next mix times both without it
        model.gradient_checkpointing = gc
        if hf is not None and gc:
            hf.gradient_checkpointing_enable({"use_reentrant": False})
        elif hf is not None:
            hf.gradient_checkpointing_disable()
        for name in [k for k in ("compact", "sft", "hf_peft") if k in fns]:
            r["step_peak_mb"][name + "_gc" * gc] = step_peak_mb(fns[name], device)
    if device.type == "cuda" and c.dtype == "bfloat16":
        card = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in card), None)
        flops = flops_per_step(model, encoded, r["tokens_packed"], c)
        r["mfu"] = flops / times["compact"] / peak if peak else None
    return r


def flops_per_step(model, encoded, tokens, c: BenchConfig):
    """Model FLOPs of one LoRA training pass over the packed row of `tokens` tokens: per token
    4·N_frozen + 6·N_lora (N: linear weights incl. lm_head), plus 12·L·C per (query, key) pair
    that attention computes."""
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # frozen matrices (the tied lm_head once); an untied embedding is a lookup, not a matmul
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad and p.dim() == 2)
    if not model.args.tie_word_embeddings:
        n_frozen -= model.model.embed_tokens.weight.numel()
    pairs = sum(len(ids) * (len(ids) + 1) / 2 for e in encoded for ids, _, _ in e.branches)
    attention = 12 * c.layers * c.heads * model.args.head_dim * pairs
    return tokens * (4 * n_frozen + 6 * n_lora) + attention


def probe_check(model, c, device, autocast):
    """The exact I_t of one long branch two ways, timed and compared: the one-pass probe over its
    K/V, and the obvious loop (one forward of prompt ⊕ r_≤t ⊕ cue ⊕ y per prefix)."""
    e = synth_instances(c, "long", c.seed)[0]
    # the 400-token branch alone
    one = EncodedInstance(e.id, e.branches[2:3], [0], e.probe_ids, e.probe_answer_mask)
    batch = to_device(collate([one]), device)
    plan = probe_plan(*rationale_view(batch), CompactConfig(mi_budget=0))
    L = e.branches[2][1].count(PROMPT)
    y = torch.tensor(e.probe_ids, device=device)

    def one_pass():
        _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
        return probe_information(model, aux.kv, batch, plan)[0]

    def naive():
        info = []
        for t in plan.prefix[0].tolist():
            x = torch.cat([batch["input_ids"][:L + t], y])[None]  # (1, T)
            h = model(x, return_hidden=True)[0]
            # logits only where y is read
            info.append(-token_nll(model.lm_head, h[-ANSWER_LEN - 1:-1], y[CUE_LEN:]).sum())
        return torch.stack(info)

    with torch.no_grad(), autocast():
        times, _ = interleaved({"one_pass": one_pass}, replace(c, repeats=1), device)
        t, want = timed(naive, device)
        return dict(probe_speedup=t / times["one_pass"], probe_prefixes=len(want),
                    probe_max_abs_diff=(one_pass() - want).abs().max().item())


def sft_nll(model, batch):
    """Plain LoRA SFT's loss of a collate row: the mean next-token NLL of its supervised tokens."""
    h = packed_forward(model, batch, return_hidden=True)
    sel = batch["sft_mask"]
    return token_nll(model.lm_head, h[batch["prev"][sel]], batch["input_ids"][sel]).mean()


def bf16_autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


def run_bench(c: BenchConfig) -> dict:
    """Every measurement as one dict (the --json line): per mix, the probe, S_MI agreement."""
    device = torch.device(c.device)
    torch.set_num_threads(c.threads or torch.get_num_threads())  # 0: as torch set it
    cuda = device.type == "cuda"
    autocast = bf16_autocast if cuda and c.dtype == "bfloat16" else contextlib.nullcontext
    hf_ok = not c.no_hf and all(importlib.util.find_spec(m) for m in ("transformers", "peft"))
    r = {"config": asdict(c), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        model = build_model(c, device, tmp if hf_ok else None)
        hf = build_hf_peft(c, tmp, device) if hf_ok else None
        data = {mix: mix_data(c, mix, device) for mix in c.mix.split(",")}
        # before any step (LoRA B = 0) the same weights give the same loss
        gaps = dict.fromkeys(data)
        with torch.no_grad(), autocast():
            for mix, (_, batch, pad) in data.items():
                if hf is not None:
                    gaps[mix] = abs(hf(**pad).loss.item() - sft_nll(model, batch).item())
        for mix, (encoded, batch, pad) in data.items():
            r[mix] = bench_mix(c, mix, encoded, batch, pad, model, hf, tmp, device, autocast)
            r[mix]["hf_loss_abs_diff"] = gaps[mix]
    if not c.no_naive:
        r.update(probe_check(model, c, device, autocast))
    r["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6  # tied lm_head counted once
    r["peak_rss_mb"] = getrusage(RUSAGE_SELF).ru_maxrss / 1024
    r["loadavg"] = os.getloadavg()[0]
    r["device_name"] = torch.cuda.get_device_name(device) if cuda else None
    if not c.no_mi:
        r["mi"] = mi_agreement(c)
    return r


# --- S_MI agreement: the default law against exact Eq. 3 on long thinking-dense rationales ---

BENCHMARKS = os.path.join(ROOT, "..", "shared", "benchmarks")
MUSING_WORDS = ("Wait", "Hmm", "So", "But", "Let", "Maybe", "Okay", "Now", "Then", "Alternatively")


def mi_instances(c: BenchConfig):
    """(instances, source): per question 3 short rationales (the GSM8K solution, with a check, with
    a restatement) and one long thinking-dense one of about c.mi_long_words words: the solution's
    sentences among musings, each a thinking word and 2-4 prose words of MATH500 solutions (about
    one thinking word in seven tokens). Without the benchmark files: synthesised text, so named."""
    gsm = os.path.join(BENCHMARKS, "gsm8k_test.jsonl")
    mth = os.path.join(BENCHMARKS, "math500_test.jsonl")
    rng = random.Random(c.seed)
    if os.path.exists(gsm) and os.path.exists(mth):
        qa = []
        for _, row in read_jsonl(gsm)[:c.mi_questions]:
            solution, _, answer = row["answer"].partition("####")
            solution = re.sub(r"<<[^>]*>>", "", solution).strip()
            qa.append((row["question"], solution, answer.strip().replace(",", "")))
        # MATH500's prose words: its LaTeX would dilute the thinking words
        words = [w for _, row in read_jsonl(mth) for w in row["solution"].split()]
        filler = [w for w in words if re.fullmatch(r"[A-Za-z]+[,.]?", w)]
        source = "GSM8K test solutions + MATH500 solution text"
    else:
        sums = [(rng.randint(2, 50), rng.randint(2, 50)) for _ in range(c.mi_questions)]
        qa = [(f"Tom has {a} apples and buys {b} more. How many apples?",
               f"He has {a} + {b} = {a + b} apples.", str(a + b)) for a, b in sums]
        filler = "we could count the pieces again and check each total against the sums above "
        filler = (filler * 50).split()
        source = "synthesised text (no benchmark files found)"
    instances = []
    for i, (q, sol, ans) in enumerate(qa):
        sentences = re.split(r"(?<=[.\n])\s+", sol)
        musings = []
        while sum(len(x.split()) for x in musings) + len(sol.split()) < c.mi_long_words:
            j = rng.randrange(len(filler) - 8)
            word = rng.choice(MUSING_WORDS)
            musings.append(f"{word}, {' '.join(filler[j:j + rng.randint(2, 4)]).rstrip(',.')}.")
        every = max(1, len(musings) // len(sentences))
        parts = []  # the solution's sentences in order, one every `every` musings
        for k, musing in enumerate(musings):
            if k % every == 0 and k // every < len(sentences):
                parts.append(sentences[k // every])
            parts.append(musing)
        long = " ".join(parts) + " " + sentences[-1]
        rationales = [("short", sol), ("short-check", f"{sol} Check: that gives {ans}."),
                      ("short-restated", f"We need the total asked for. {sol}"), ("long", long)]
        instances.append(Instance(f"mi-{i}", q, ans, "gsm8k", rationales))
    return instances, source


def train_student(model, batches, steps, lr=3e-3):
    """A few AdamW steps of plain next-token loss on the bench's own rows, so that I_t responds to
    the rationale (a random student's I_t is nearly flat and its gains are noise)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for b in itertools.islice(itertools.cycle(batches), steps):
        sft_nll(model, b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def kendall_tau(a, b):
    """Kendall's tau-a: (concordant - discordant pairs) / all pairs; a tie in either counts 0."""
    signs = [(a[i] - a[j]) * (b[i] - b[j]) for i in range(len(a)) for j in range(i + 1, len(a))]
    return sum(math.copysign(1, s) if s else 0 for s in signs) / len(signs)


def agreement(runs):
    """Of [(exact, estimate, probes per branch)]: mean Kendall tau, mean relative error (all
    branches; the long, last one), top-1 agreement, mean probes per short and long branch."""
    errs = [abs(s_ - e_) / e_ for e, s, _ in runs for e_, s_ in zip(e, s) if e_ > 0]
    long_errs = [abs(s[-1] - e[-1]) / e[-1] for e, s, _ in runs if e[-1] > 0] or [0.0]
    return {"tau": mean(kendall_tau(e, s) for e, s, _ in runs),
            "rel_err": mean(errs),
            "rel_err_long": mean(long_errs),
            "top1": mean(e.index(max(e)) == s.index(max(s)) for e, s, _ in runs),
            "probes_short": mean(p for _, _, ps in runs for p in ps[:-1]),
            "probes_long": mean(ps[-1] for _, _, ps in runs)}


def mi_agreement(c: BenchConfig) -> dict:
    """S_MI's default law (with --mi-sweep every law in LAWS) against exact Eq. 3 on mi_instances,
    per student (a tiny one trained on the texts; --mi-model, a real one), as agreement(). Exact
    I_t comes from one probe pass per instance; a law's estimate reads it at its planned prefixes
    (c.mi_keys keys per instance), which is what its own probe pass would return there."""
    from eval import load_student
    from tokenizer import Tokenizer, write_tokenizer
    instances, source = mi_instances(c)
    with tempfile.TemporaryDirectory(prefix="bench-tok-") as tmp:
        texts = [i.question for i in instances] + [t for i in instances for _, t in i.rationales]
        tok = Tokenizer.from_pretrained(write_tokenizer(tmp, texts, vocab_size=c.mi_vocab))

    def rows(tok):
        return [collate([e]) for e in encode_dataset(instances, tok, max_len=10**6)[0]]

    tiny = BenchConfig(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384,
                       vocab=tok.vocab_size)
    torch.manual_seed(c.seed)
    batches = rows(tok)  # train_student leaves them as they are
    student = train_student(random_qwen2(tiny), batches, c.mi_train_steps)
    students = {"tiny": (student, batches)}
    if c.mi_model:
        model, tok = load_student(c.mi_model)
        students["real"] = model, rows(tok)
    out = {"source": source}
    for name, (model, batches) in students.items():
        traces = []
        with torch.no_grad():
            for batch in batches:
                _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
                n_rat, think = rationale_view(batch)
                plan = probe_plan(n_rat, think, CompactConfig(mi_budget=0))
                info = probe_information(model, aux.kv, batch, plan)
                traces.append((n_rat, think, info, (mi_estimate(info, plan) / n_rat).tolist()))
        out[name] = {"long_tokens": mean(int(t[0][-1]) for t in traces)}
        for law, kw in {"default": {}, **(LAWS if c.mi_sweep else {})}.items():
            runs = []  # (exact, estimate, probes per branch) of each instance and key
            for (n_rat, think, info, exact), key in itertools.product(traces, range(c.mi_keys)):
                plan = probe_plan(n_rat, think, CompactConfig(**kw), (key,), [0] * len(n_rat))
                estimate = (mi_estimate(info.gather(1, plan.prefix), plan) / n_rat).tolist()
                runs.append((exact, estimate, plan.valid.sum(-1).tolist()))
            out[name][law] = agreement(runs)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, BenchConfig)
    try:
        c = config_from_args(BenchConfig, p.parse_args(argv))
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(run_bench(c), indent=None if c.json else 2))  # without --json: indented


if __name__ == "__main__":
    main()
