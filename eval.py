"""Evaluate students and sample teacher rationales: the generation jobs (SPEC.md §6).

    python eval.py accuracy --model DIR|org/name [--adapter DIR] --task gsm8k --data gsm8k_test.jsonl \
        --out preds.jsonl
    torchrun --nproc_per_node=8 eval.py accuracy --model DIR --task gsm8k --data A.jsonl --task svamp \
        --data B.jsonl --out p.jsonl
    torchrun --nproc_per_node=2 eval.py rationales --model TEACHER (--questions Q.jsonl | --task math \
        --data BENCH) --samples 4 --temperature 0.7 --out qwq.jsonl
    python eval.py readings --set demo=runs/demo/base:runs/demo/data/train.jsonl \
        --set gsm8k=DIR:gsm8k_test.jsonl --out r/

Both are resumable and sharded by run_sharded: a record is reused only for the same prompt text, gold
answer and generation settings, and OUT.lock keeps a second run off the same --out. accuracy: zero-shot
CoT prompts in the checkpoint's own chat template, greedy, answers checked by data.py, accuracy ± the
binomial SEM. rationales: sample s of question q draws from its own stream, so it does not depend on its
batch, rank or a resume; data.py build reads the output. readings: what each COMPACT score catches, the
within-instance AUROC against flaw labels for every reading of SPEC's Decisions.
`eval.py table|pca-shift|mi-trace|weights` run analysis.py's. Left out: pass@k, multi-GPU models.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import random
import re
import runpy
import sys
import time
from dataclasses import replace

import torch

from compact import CompactConfig, compact_loss, fuse_weights
from data import (RATIONALE, DataError, Instance, TASKS, append_jsonl, check_outputs, collate, derive_seed,
                  encode_dataset, extract_answer, is_equivalent, load_benchmark, load_multi_teacher,
                  read_json, read_jsonl, read_questions, to_device, user_errors, user_prompt, write_json,
                  write_jsonl, write_text)
from lora import load_adapter
from model import Transformer, generate
from tokenizer import Tokenizer

TASK_ALIASES = {"math500": "math", "gpqa-diamond": "gpqa"}  # the benchmark's name -> data.py's task


def load_student(model_dir, adapter=None, dtype="float32", device="cpu"):
    """Transformer (+ LoRA adapter) in eval mode, and the tokenizer of the model directory."""
    tok = Tokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, "
                         f"the model only {model.args.vocab_size}")
    return (load_adapter(model, adapter) if adapter else model).eval(), tok


def chat_prompt(tok, user_text):
    """(the exact text fed to the model, its ids): one user turn, then the assistant header."""
    messages = [{"role": "user", "content": user_text}]
    return tok.render_chat(messages), tok.encode_chat(messages)


def complete(model, tok, prompts, max_new_tokens, **sampling):
    """(text, new tokens, stopped) per prompt: model.generate up to the template's stop token, which the
    text leaves out. sampling: generate's temperature, top_p, seed (greedy without)."""
    stop = set(tok.eos_ids) | {tok.eot_id}
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=stop, **sampling)
    ends = [bool(new) and new[-1] in stop for new in outs]
    return [(tok.decode(new[:-1] if end else new), len(new), end) for new, end in zip(outs, ends)]


# --- accuracy: predict → extract → check ---

def accuracy_sem(correct):
    """(n, accuracy, SEM) of 0/1 outcomes; SEM = sqrt(p(1-p)/n), the binomial standard error."""
    n = len(correct)
    p = sum(correct) / n if n else float("nan")
    return n, p, math.sqrt(p * (1 - p) / n) if n else float("nan")


def evaluate(model, tok, items, out, batch_size=8, max_new_tokens=512, rank=0, world=1, log=None,
             settings=None):
    """Predict, extract and check every item not already in `out`; return all records, in items' order.

    items: data.load_benchmark rows. Greedy decoding; resumable and sharded by run_sharded. settings: what
    else made the predictions (model, adapter, dtype: generation_settings), stamped on each record.
    """
    def predict_and_check(jobs):
        outs = complete(model, tok, [j["ids"] for j in jobs], max_new_tokens)
        return [{"id": j["item"]["id"], "prompt": j["text"], "output": text,
                 "extracted": (pred := extract_answer(text, j["item"]["task"])), "gold": j["item"]["answer"],
                 "correct": is_equivalent(pred, j["item"]["answer"], j["item"]["task"]), "new_tokens": n,
                 "stopped": stopped} for j, (text, n, stopped) in zip(jobs, outs)]
    made_with = {**(settings or {}), "max_new_tokens": max_new_tokens}
    jobs = [dict(key=(it["id"], 0), item=it, text=text, ids=ids, stamp=stamp(text, it["answer"], made_with))
            for it in items for text, ids in [chat_prompt(tok, it["prompt"])]]
    return run_sharded(jobs, out, predict_and_check, batch_size, rank, world, log, items[0]["task"])


def run_accuracy(a, rank=0, world=1, device="cpu", held=None):
    if len(a.task) != len(a.data):
        raise DataError(f"--task given {len(a.task)} times but --data {len(a.data)} times; "
                        "they pair up in order")
    tasks = [task_name(t) for t in a.task]
    if len(set(tasks)) != len(tasks):
        raise DataError("--task: each task once per call")
    data = [load_benchmark(t, p)[:a.limit] for t, p in zip(tasks, a.data)]  # DataError names FILE:LINE
    if empty := [(t, p) for t, p, d in zip(tasks, a.data, data) if not d]:
        raise DataError(f"--data {empty[0][1]}: no {empty[0][0]} items")
    stem, ext = os.path.splitext(a.out)  # several tasks: one predictions file each
    outs = [a.out] if len(tasks) == 1 else [f"{stem}-{t}{ext or '.jsonl'}" for t in tasks]
    settings = generation_settings(a)
    model, tok = start_run(a, outs, settings, rank, world, device, held)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    table = []
    for task, items, out in zip(tasks, data, outs):
        records = evaluate(model, tok, items, out, a.batch_size, a.max_new_tokens, rank, world, log, settings)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        table.append({"task": task, "n": n, "accuracy": p, "sem": sem, "predictions": out})
    if rank == 0:
        write_json(stem + ".summary.json", {"settings": vars(a), "generation": settings, "results": table})
        print(f"{'task':<12} {'n':>6} {'accuracy':>9} {'± SEM':>7}")
        for r in table:
            print(f"{r['task']:<12} {r['n']:>6} {r['accuracy']:>9.4f} {r['sem']:>7.4f}")
    return table


def task_name(task):
    """data.py's task for a benchmark's name (math500 = math), or DataError."""
    if TASK_ALIASES.get(task, task) not in TASKS:
        raise DataError(f"--task {task}: unknown (known: {', '.join(TASKS + tuple(TASK_ALIASES))})")
    return TASK_ALIASES.get(task, task)


# --- resumable sharded runs: the part-file protocol accuracy and rationales share ---

def stamp(prompt, answer, settings):
    """A record's stamp: what made it (the prompt's text, not its position; the gold answer; the generation
    settings), as 16 hex digits of a sha256. run_sharded reuses a record only under the same stamp."""
    return hashlib.sha256(json.dumps([prompt, answer, settings], sort_keys=True).encode()).hexdigest()[:16]


def generation_settings(a, sampling=()):
    """The flags a run's records are stamped with (model, adapter, dtype, max_new_tokens, then `sampling`'s),
    model and adapter paths resolved."""
    real = lambda k, v: os.path.realpath(v) if k in ("model", "adapter") and v and os.path.exists(v) else v
    return {k: real(k, getattr(a, k)) for k in ("model", "adapter", "dtype", "max_new_tokens", *sampling)}


def read_records(path):
    """The complete records of an output file by key, (id, sample); accuracy's records have no sample."""
    lines = read_jsonl(path, torn_tail=True) if os.path.exists(path) else []  # a kill may tear the last line
    return {(r["id"], r.get("sample", 0)): r for _, r in lines if isinstance(r, dict) and "id" in r}


def merge_records(out, order):
    """Fold OUT and its part files into OUT, in `order` of keys (unknown keys last), atomically."""
    parts = sorted(glob.glob(glob.escape(out) + ".part*"))
    records = {k: r for path in [out, *parts] for k, r in read_records(path).items()}  # part files win
    rank = {k: n for n, k in enumerate(order)}
    write_jsonl(out, [r for _, r in sorted(records.items(), key=lambda kr: rank.get(kr[0], len(rank)))])
    for p in parts:
        os.remove(p)


def barrier():
    """dist.barrier() under torchrun; nothing in a plain process."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


@torch.no_grad()
def run_sharded(jobs, out, work, batch_size, rank=0, world=1, log=None, label=""):
    """Do every job whose record `out` lacks; return all records, in jobs' order.

    jobs: dicts with a unique "key" (id, sample), "ids" (the prompt) and "stamp" (see stamp()); work(batch of
    jobs) returns one record per job, carrying its id (and sample). A record in OUT is reused only under its
    job's stamp (other ones, made for other data or settings, are redone). Each rank takes every world-th
    missing job, longest prompts first (an out-of-memory shows in the first batch), and appends each batch's
    records to OUT (one process) or OUT.partR, flushed, so a kill loses at most one batch (a torn last line
    is redone). Rank 0 folds the parts into OUT, in jobs' order, at the start and the end.
    """
    keys = [j["key"] for j in jobs]
    if len(set(keys)) != len(keys):
        raise DataError(f"{label}: duplicate item ids in the data; resuming needs unique ones")
    if rank == 0:
        merge_records(out, keys)
    barrier()
    done = read_records(out)
    stale = sum(j["key"] in done and done[j["key"]].get("stamp") != j["stamp"] for j in jobs)
    if log and stale:
        log(f"{label}: {stale} record(s) in {out} were made for other items or settings: redoing them")
    mine = [j for j in jobs if done.get(j["key"], {}).get("stamp") != j["stamp"]][rank::world]
    mine.sort(key=lambda j: -len(j["ids"]))
    t0 = time.time()
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        records = [{**r, "stamp": j["stamp"]} for j, r in zip(batch, work(batch))]
        append_jsonl(out if world == 1 else f"{out}.part{rank}", records)
        if log:
            n, dt = min(start + batch_size, len(mine)), time.time() - t0
            eta = int(dt / n * (len(mine) - n))
            log(f"{label} {'rank 0: ' if world > 1 else ''}{n}/{len(mine)} | {n / dt:.2f} items/s"
                f" | eta {eta // 3600}h{eta // 60 % 60:02d}m{eta % 60:02d}s")
    barrier()
    if rank == 0:
        merge_records(out, keys)
    barrier()
    records = read_records(out)
    return [records[k] for k in keys if k in records]


def start_run(a, outs, settings, rank, world, device, held=None):
    """Refuse to add to outputs made with other generation settings (model, adapter, dtype, ...: old → new in
    the message); load the model; take OUT.lock into the ExitStack `held` (train.hold_lock: one run per
    output); rank 0 writes the settings to OUT-STEM.summary.json first, so that a resumed run can be
    checked against them."""
    summary = os.path.splitext(a.out)[0] + ".summary.json"
    if os.path.exists(summary) and any(os.path.exists(o) for o in outs):
        old = read_json(summary).get("generation") or {}
        if changed := [f"{k} {old[k]!r} → {v!r}" for k, v in settings.items() if k in old and old[k] != v]:
            raise DataError(f"--out {a.out}: holds outputs made with another {'; '.join(changed)}; "
                            "use a new --out")
    model, tok = load_student(a.model, a.adapter, a.dtype, device)
    if held is not None:
        from train import hold_lock
        held.enter_context(hold_lock(a.out, rank, device, a.out + ".lock"))
    barrier()  # every rank has read the old settings before rank 0 writes the new
    if rank == 0:
        write_json(summary, {"settings": vars(a), "generation": settings, "results": None})
    return model, tok


# --- teacher rationales: N samples per question, in the teacher's own chat template ---

def sample_seed(seed, qid, sample):
    """The sampling seed of one (seed, question, sample): a row's draws do not depend on its batch."""
    return derive_seed(seed, qid, sample)


def run_rationales(a, rank=0, world=1, device="cpu", held=None):
    """Sample --samples rationales per question at --temperature; records {id, sample, question, answer,
    task, text, extracted, correct, new_tokens, stopped}, which data.py build reads as they are."""
    if bool(a.questions) == bool(a.data) or (a.data and not a.task):
        raise DataError("give --questions FILE, or --task TASK with --data FILE (a benchmark in its public "
                        "format)")
    if a.samples > 1 and a.temperature <= 0:
        raise DataError(f"--samples {a.samples} at --temperature {a.temperature}: greedy samples are all "
                        "the same")
    rows = [vars(q) for q in read_questions(a.questions, a.task and task_name(a.task))] if a.questions else \
        load_benchmark(task_name(a.task), a.data)
    if not (questions := [{k: r[k] for k in ("id", "question", "answer", "task")} for r in rows][:a.limit]):
        raise DataError(f"{a.questions or a.data}: no questions")
    settings = generation_settings(a, ("temperature", "top_p", "seed"))
    model, tok = start_run(a, [a.out], settings, rank, world, device, held)
    stem = os.path.splitext(a.out)[0]
    if rank == 0:  # the questions as data.py build reads them
        write_jsonl(stem + ".questions.jsonl", questions)

    def sample(jobs):
        outs = complete(model, tok, [j["ids"] for j in jobs], a.max_new_tokens, temperature=a.temperature,
                        top_p=a.top_p, seed=[sample_seed(a.seed, *j["key"]) for j in jobs])
        return [{"id": j["q"]["id"], "sample": j["key"][1], **j["q"], "text": text,
                 "extracted": (pred := extract_answer(text, j["q"]["task"])),
                 "correct": is_equivalent(pred, j["q"]["answer"], j["q"]["task"]), "new_tokens": n,
                 "stopped": stopped} for j, (text, n, stopped) in zip(jobs, outs)]
    prompts = {q["id"]: chat_prompt(tok, user_prompt(q["question"], q["task"])) for q in questions}
    jobs = [{"key": (q["id"], s), "q": q, "ids": ids, "stamp": stamp(text, q["answer"], settings)}
            for q in questions for text, ids in [prompts[q["id"]]] for s in range(a.samples)]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    records = run_sharded(jobs, a.out, sample, a.batch_size, rank, world, log, "rationales")
    result = dict(questions=len(questions), samples=len(records), correct=sum(r["correct"] for r in records),
                  cut_off=sum(not r["stopped"] for r in records),
                  questions_with_a_correct_sample=len({r["id"] for r in records if r["correct"]}))
    if rank == 0:
        write_json(stem + ".summary.json", {"settings": vars(a), "generation": settings, "results": result})
        print(" | ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.items()) + f" | wrote {a.out}")
    return records


# --- what each score catches: within-instance AUROC against flaw labels, every reading of SPEC's Decisions

READINGS = {  # reading: CompactConfig fields; the paper leaves each of these open (SPEC's Decisions),
    "default": {}, "S_MI divided by its length (SPEC's Eq. 3)": dict(mi_norm="length"),
    "S_G at the last rationale token": dict(sg_feature="last"),
    "S_G at the rationale mean": dict(sg_feature="mean"), "S_G with self-loops": dict(sg_self_loops=True),
    "S_G one attention over all heads": dict(sg_heads="joint"), "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0), "z-floor 0": dict(z_floor=0.0),  # then two beyond the paper:
    "S_G cosine of eot states (beyond the paper)": dict(sg_similarity="cosine"),
    "S_G cosine of rationale means (beyond the paper)": dict(sg_similarity="cosine", sg_feature="mean")}
HIGHER_IS_CLEAN = {"s_mi": True, "s_g": True, "s_d": False, "weight": True}  # S_D: lower is better


@torch.no_grad()
def rationale_scores(model, encoded, cfg, batch_size=4):
    """Per instance {s_mi, s_g, s_d, weight: [per branch]}: compact_loss's scores under cfg with no training
    (the student's mode, eval: no LoRA dropout; no consistency logits; S_MI's sample fixed per batch)."""
    out, device, cfg = [], model.lm_head.weight.device, replace(cfg, mcon_lambda=0.0)
    for i in range(0, len(encoded), batch_size):
        part = encoded[i:i + batch_size]
        _, st = compact_loss(model, to_device(collate(part), device), cfg, rng_key=(i,))
        out += [{k: st[k][b, :len(e.teacher)].tolist() for k in HIGHER_IS_CLEAN} for b, e in enumerate(part)]
    return out


def within_auroc(groups, higher=True):
    """Over every (clean, flawed) pair of rationales of one question, how often the clean one scores better
    (ties count ½); groups: [(score, flawed)] per question. None without a pair."""
    pairs = [(c, f) for g in groups for c, cf in g if not cf for f, ff in g if ff]
    return sum(0.5 if c == f else float((c > f) == higher) for c, f in pairs) / len(pairs) if pairs else None


def auroc_se(groups, higher=True):
    """within_auroc's standard error over questions: the jackknife, leaving one question out at a time."""
    groups = [g for g in groups if any(f for _, f in g) and not all(f for _, f in g)]
    loo = [within_auroc(groups[:i] + groups[i + 1:], higher) for i in range(len(groups))]
    return math.sqrt((len(loo) - 1) * torch.tensor(loo).var(correction=0).item()) if len(loo) > 1 else None


def reading_aurocs(model, tok, instances, batch_size=4, readings=READINGS):
    """{reading: {score: AUROC, "score/flaw": AUROC}} of labelled instances (Instance.flaws) under the
    student, and "se": {score: auroc_se}. S_MI is exact Eq. 3, so readings are compared without the
    estimator's noise; one probe pass serves every reading (S_G's readings rescore with alpha 0; mi_norm
    "none" is |R| times "length")."""
    encoded, info = encode_dataset(instances, tok, max_len=10**6)
    by_id = {i.id: i.flaws for i in instances}
    labels = [[by_id[e.id].get(info["teachers"][t]) for t in e.teacher] for e in encoded]
    lengths = [[codes.count(RATIONALE) for _, codes, _ in e.branches] for e in encoded]
    flaws = sorted({f for ls in labels for f in ls if f})
    exact = CompactConfig(mi_budget=0)
    base, table = rationale_scores(model, encoded, replace(exact, mi_norm="length"), batch_size), {}
    for name, kw in readings.items():
        cfg = replace(exact, **kw)
        s_g = rationale_scores(model, encoded, replace(cfg, alpha=0.0), batch_size) if any(
            k.startswith("sg_") for k in kw) else base
        rows = []
        for s, g, n in zip(base, s_g, lengths):
            s_mi = [x * r for x, r in zip(s["s_mi"], n)] if cfg.mi_norm == "none" else s["s_mi"]
            scores = (torch.tensor([x]) for x in (s_mi, g["s_g"], s["s_d"]))
            w = fuse_weights(*scores, torch.ones(1, len(n), dtype=bool), cfg)
            rows.append({"s_mi": s_mi, "s_g": g["s_g"], "s_d": s["s_d"], "weight": w[0].tolist()})
        def pairs(k, flaw):  # [(score k, flawed)] per question, of the clean and `flaw` (None: every flaw)
            return [[(x, f is not None) for x, f in zip(r[k], fs) if not flaw or f in (None, flaw)]
                    for r, fs in zip(rows, labels)]
        table[name] = {k if flaw is None else f"{k}/{flaw}": within_auroc(pairs(k, flaw), up)
                       for flaw in [None] + flaws for k, up in HIGHER_IS_CLEAN.items()}
        table[name]["se"] = {k: auroc_se(pairs(k, None), up) for k, up in HIGHER_IS_CLEAN.items()}
    return table


def gsm8k_flaw_set(path, n, seed=0):
    """GSM8K test questions as labelled multi-teacher instances: the human solution (clean), a copy with
    one intermediate result changed and carried through the later steps, the final answer kept
    ("hallucination"), and a terse answer-only copy ("filler"). Questions of one computation have no
    intermediate: skipped."""
    rng, out = random.Random(seed), []
    for _, row in read_jsonl(path):
        calc = list(re.finditer(r"<<[^=>]*=([^>]*)>>([\d,.]*\d)", row["answer"]))
        if len(calc) < 2 or len(out) == n:
            continue
        parts = row["answer"].split("####")
        body, answer = parts[0], parts[-1].strip().replace(",", "")
        j = rng.randrange(len(calc) - 1)  # not the last: that one states the final answer
        shown, last = calc[j].group(2), calc[-1].start(2)
        value = float(shown.replace(",", ""))
        wrong = value + rng.choice((-2, -1, 1, 2)) * max(1, round(abs(value) * 0.1))
        wrong = f"{wrong:,.0f}" if "," in shown else f"{wrong:.0f}" if wrong.is_integer() else f"{wrong:g}"
        carried = body[:calc[j].start(2)] + re.sub(rf"(?<![\d.,]){re.escape(shown)}(?![\d]|,\d)", wrong,
                                                    body[calc[j].start(2):last]) + body[last:]
        clean = lambda text: re.sub(r"<<[^>]*>>", "", text).strip()
        out.append(Instance(f"gsm8k-{len(out)}", row["question"], answer, "gsm8k", [
            ("human", clean(body)), ("carried", clean(carried)), ("terse", f"So the answer is {answer}.")],
            {"carried": "hallucination", "terse": "filler"}))
    return out


def run_readings(a):
    """The AUROC table of every reading on each --set NAME=MODEL:DATA (DATA: a labelled multi-teacher file,
    or a GSM8K benchmark file, made into gsm8k_flaw_set's --limit questions, 100 by default)."""
    sets = {}
    for spec in a.set:
        name, eq, rest = spec.partition("=")
        model_dir, colon, path = rest.rpartition(":")
        if not (eq and colon and name and model_dir and path):
            raise DataError(f"--set {spec!r}: expected NAME=MODEL_DIR:DATA")
        model, tok = load_student(model_dir, None, a.dtype, a.device)
        labelled = "rationales" in read_jsonl(path)[0][1]
        instances = load_multi_teacher(path) if labelled else gsm8k_flaw_set(path, a.limit or 100)
        sets[name] = reading_aurocs(model, tok, instances[:a.limit], a.batch_size)
    fmt = lambda v, e=None: "—" if v is None else f"{v:.3f}" + ("" if e is None else f" ± {e:.3f}")
    cols = [(s, k) for s in sets for k in HIGHER_IS_CLEAN]
    lines = ["| reading | " + " | ".join(f"{s}: {k}" for s, k in cols) + " |",
             "| --- " * (1 + len(cols)) + "|"]
    lines += [f"| {r} | " + " | ".join(fmt(sets[s][r][k], sets[s][r]["se"][k]) for s, k in cols) + " |"
              for r in READINGS]
    lines += ["", "| default, per flaw | " + " | ".join(HIGHER_IS_CLEAN) + " |", "| --- " * 5 + "|"]
    for s, t in sets.items():
        for flaw in sorted({f.split("/")[1] for f in t["default"] if "/" in f}):
            cells = (fmt(t["default"][f"{k}/{flaw}"]) for k in HIGHER_IS_CLEAN)
            lines.append(f"| {s}: {flaw} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + ("\n\nWithin-instance AUROC against the flaw labels (clean above flawed = 1; "
                                "S_D: lower), ± its jackknife standard error over questions.\n")
    write_text(os.path.join(a.out, "readings.md"), text)
    write_json(os.path.join(a.out, "readings.json"), {"settings": vars(a), "sets": sets})
    print(text, end="")
    return sets


def student_flags(sp, adapter_required=False, batch_size=8, model=True):
    """(--model, --adapter,) --dtype, --device, --batch-size, --limit: the flags of a job that loads a
    student; check_student_flags checks them."""
    add = sp.add_argument
    if model:
        add("--model", required=True, help="Hugging Face model directory (weights + tokenizer) or hub id")
        add("--adapter", required=adapter_required, help="PEFT LoRA directory on top of --model")
    add("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on cuda, float32 on cpu")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--batch-size", type=int, default=batch_size)
    add("--limit", type=int, help="only the first N items of each data file")


def check_student_flags(a, flags):
    """DataError for any of `flags` below 1 or --device cuda without CUDA; --dtype's default by device."""
    for flag in flags:
        if getattr(a, flag, None) is not None and getattr(a, flag) < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device here")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")


def build_parser():
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="accuracy ± SEM on benchmarks (resumable, torchrun-aware)")
    student_flags(acc, batch_size=16)
    acc.add_argument("--task", action="append", required=True,
                     help=f"one of {', '.join(TASKS + tuple(TASK_ALIASES))}; repeat")
    acc.add_argument("--data", action="append", required=True,
                     help="the task's file in its public format; repeat, in --task order")
    acc.add_argument("--max-new-tokens", type=int, default=1024)
    acc.add_argument("--out", required=True, help="predictions JSONL (several tasks: OUT-STEM-TASK.jsonl)")
    r = sub.add_parser("rationales", help="teacher rationales, N samples per question (resumable, torchrun)")
    student_flags(r, batch_size=16)
    r.add_argument("--questions", help="JSONL of {id, question, answer[, task]}, as data.py build reads it")
    r.add_argument("--task", help="task of questions without one; with --data, the benchmark's")
    r.add_argument("--data", help="instead of --questions: a benchmark file in its public format")
    r.add_argument("--samples", type=int, default=4, help="rationales per question")
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0, help="sample s of question q draws from seed (seed, q, s)")
    r.add_argument("--max-new-tokens", type=int, default=4096)
    r.add_argument("--out", required=True,
                   help="rationales JSONL (OUT-STEM.questions.jsonl and .summary.json beside)")
    rd = sub.add_parser("readings", help="what each score catches: AUROCs against flaw labels, every reading")
    rd.add_argument("--set", action="append", required=True, metavar="NAME=MODEL_DIR:DATA",
                    help="a student and a labelled multi-teacher file (or a GSM8K benchmark file); repeat")
    student_flags(rd, batch_size=4, model=False)
    rd.add_argument("--out", required=True, help="directory for readings.md and readings.json")
    return p


ANALYSES = ("table", "pca-shift", "mi-trace", "weights")  # analysis.py's commands, also reachable from here


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ANALYSES:  # analysis.py imports this file, so it runs as a script
        sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis.py"), *argv]
        return runpy.run_path(sys.argv[0], run_name="__main__")
    a = build_parser().parse_args(argv)
    from train import cleanup_dist, setup_dist  # torchrun's process group, as training sets it up and ends it
    with user_errors(f"eval.py {a.command}"):
        try:
            check_student_flags(a, ("batch_size", "limit", "max_new_tokens", "samples"))
            if a.command == "rationales" and not 0 < a.top_p <= 1:
                raise DataError(f"--top-p {a.top_p}: must be in (0, 1]")
            if a.command == "readings":
                return run_readings(a)
            stem, ext = os.path.splitext(a.out)
            outs = [a.out, a.out + ".lock", stem + ".summary.json", stem + ".questions.jsonl"]
            if a.command == "accuracy":  # and one predictions file per task
                outs += [f"{stem}-{task_name(t)}{ext or '.jsonl'}" for t in a.task]
            inputs = [("--data", d) for d in (a.data if isinstance(a.data, list) else [a.data])] + [
                ("--questions", vars(a).get("questions")), ("--model", a.model), ("--adapter", a.adapter)]
            check_outputs([("--out", o) for o in outs], inputs)
            rank, world, device = setup_dist(a.device)
            run = run_accuracy if a.command == "accuracy" else run_rationales
            with contextlib.ExitStack() as held:  # start_run takes OUT's lock into it, before the first write
                return run(a, rank, world, device, held)
        finally:
            cleanup_dist()


if __name__ == "__main__":
    main()
