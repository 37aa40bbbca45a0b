"""Evaluate students and sample teacher rationales: the generation jobs (SPEC.md §6).

    python eval.py accuracy --model DIR|org/name [--adapter DIR] --task gsm8k
        --data gsm8k_test.jsonl --out preds.jsonl
    torchrun --nproc_per_node=8 eval.py accuracy --model DIR --task gsm8k --data A.jsonl
        --task svamp --data B.jsonl --out p.jsonl
    torchrun --nproc_per_node=2 eval.py rationales --model TEACHER
        (--questions Q.jsonl | --task math --data BENCH) --samples 4 --temperature 0.7
        --out qwq.jsonl

Both are resumable and sharded by run_sharded: a record is reused only for the same prompt text,
gold answer and generation settings, and OUT.lock keeps a second run off the same --out.
accuracy: zero-shot CoT prompts in the checkpoint's own chat template, greedy, answers checked by
data.py, accuracy ± the binomial SEM. rationales: sample s of question q draws from its own
stream, so it does not depend on its batch, rank or a resume; data.py build reads the output.
Reading finished outputs (Table 1, PCA shift, the readings) is analysis.py's.
Left out: pass@k, multi-GPU models.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import sys
import time

import torch

from common import (DataError, append_jsonl, barrier, check_outputs, cleanup_dist, derive_seed,
                    duration, hold_lock, read_json, read_jsonl, setup_dist, user_errors,
                    write_json, write_jsonl)
from data import (TASKS, extract_answer, is_equivalent, load_benchmark, read_questions,
                  user_prompt)
from lora import load_adapter
from model import Transformer, generate
from tokenizer import Tokenizer

TASK_ALIASES = {"math500": "math", "gpqa-diamond": "gpqa"}  # a benchmark's name -> data.py's task


def load_student(model_dir, adapter=None, dtype="float32", device="cpu"):
    """Transformer (+ LoRA adapter) in eval mode, and the tokenizer of the model directory."""
    tok = Tokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, "
                         f"the model only {model.args.vocab_size}")
    if adapter:
        model = load_adapter(model, adapter)
    return model.eval(), tok


def chat_prompt(tok, user_text):
    """(the exact text fed to the model, its ids): one user turn, then the assistant header."""
    messages = [{"role": "user", "content": user_text}]
    return tok.render_chat(messages), tok.encode_chat(messages)


def complete(model, tok, prompts, max_new_tokens, **sampling):
    """(text, new tokens, stopped) per prompt: model.generate up to the template's stop token,
    which the text leaves out. sampling: generate's temperature, top_p, seed (greedy without)."""
    stop = set(tok.eos_ids) | {tok.eot_id}
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_ids=stop, **sampling)
    results = []
    for new in outs:
        stopped = bool(new) and new[-1] in stop
        text = tok.decode(new[:-1] if stopped else new)
        results.append((text, len(new), stopped))
    return results


def log_stderr(line):
    print(line, file=sys.stderr, flush=True)


# --- accuracy: predict → extract → check ---

def accuracy_sem(correct):
    """(n, accuracy, SEM) of 0/1 outcomes; SEM = sqrt(p(1-p)/n), the binomial standard error."""
    n = len(correct)
    if not n:
        return 0, float("nan"), float("nan")
    p = sum(correct) / n
    return n, p, math.sqrt(p * (1 - p) / n)


def evaluate(model, tok, items, out, batch_size=8, max_new_tokens=512, rank=0, world=1,
             log=None, settings=None):
    """Predict, extract and check every item not already in `out`; return all records, in items'
    order. items: data.load_benchmark rows. Greedy decoding; resumable and sharded by run_sharded.
    settings: what else made the predictions (model, adapter, dtype: generation_settings), stamped
    on each record."""
    def predict_and_check(jobs):
        outs = complete(model, tok, [j["ids"] for j in jobs], max_new_tokens)
        records = []
        for j, (text, n, stopped) in zip(jobs, outs):
            it = j["item"]
            pred = extract_answer(text, it["task"])
            correct = is_equivalent(pred, it["answer"], it["task"])
            records.append({"id": it["id"], "prompt": j["text"], "output": text, "extracted": pred,
                            "gold": it["answer"], "correct": correct, "new_tokens": n,
                            "stopped": stopped})
        return records

    made_with = {**(settings or {}), "max_new_tokens": max_new_tokens}
    jobs = []
    for it in items:
        text, ids = chat_prompt(tok, it["prompt"])
        key = (it["id"], 0)
        jobs.append({"key": key, "item": it, "text": text, "ids": ids,
                     "stamp": stamp(text, it["answer"], made_with)})
    task = items[0]["task"]
    return run_sharded(jobs, out, predict_and_check, batch_size, rank, world, log, task)


def run_accuracy(a, rank=0, world=1, device="cpu", held=None):
    if len(a.task) != len(a.data):
        raise DataError(f"--task given {len(a.task)} times but --data {len(a.data)} times; "
                        "they pair up in order")
    tasks = [task_name(t) for t in a.task]
    if len(set(tasks)) != len(tasks):
        raise DataError("--task: each task once per call")
    data = [load_benchmark(t, p)[:a.limit] for t, p in zip(tasks, a.data)]  # names FILE:LINE
    for task, path, items in zip(tasks, a.data, data):
        if not items:
            raise DataError(f"--data {path}: no {task} items")
    stem, ext = os.path.splitext(a.out)
    outs = [a.out]
    if len(tasks) > 1:  # several tasks: one predictions file each
        outs = [f"{stem}-{t}{ext or '.jsonl'}" for t in tasks]
    settings = generation_settings(a)
    model, tok = start_run(a, outs, settings, rank, world, device, held)
    log = log_stderr if rank == 0 else None
    table = []
    for task, items, out in zip(tasks, data, outs):
        records = evaluate(model, tok, items, out, a.batch_size, a.max_new_tokens, rank, world,
                           log, settings)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        table.append({"task": task, "n": n, "accuracy": p, "sem": sem, "predictions": out})
    if rank == 0:
        summary = {"settings": vars(a), "generation": settings, "results": table}
        write_json(stem + ".summary.json", summary)
        print(f"{'task':<12} {'n':>6} {'accuracy':>9} {'± SEM':>7}")
        for r in table:
            print(f"{r['task']:<12} {r['n']:>6} {r['accuracy']:>9.4f} {r['sem']:>7.4f}")
    return table


def task_name(task):
    """data.py's task for a benchmark's name (math500 = math), or DataError."""
    name = TASK_ALIASES.get(task, task)
    if name not in TASKS:
        known = ", ".join(TASKS + tuple(TASK_ALIASES))
        raise DataError(f"--task {task}: unknown (known: {known})")
    return name


# --- resumable sharded runs: the part-file protocol accuracy and rationales share ---

def stamp(prompt, answer, settings):
    """A record's stamp: what made it (the prompt's text, not its position; the gold answer; the
    generation settings), as 16 hex digits of a sha256. run_sharded reuses a record only under
    the same stamp."""
    made = json.dumps([prompt, answer, settings], sort_keys=True)
    return hashlib.sha256(made.encode()).hexdigest()[:16]


def generation_settings(a, sampling=()):
    """The flags a run's records are stamped with (model, adapter, dtype, max_new_tokens, then
    `sampling`'s), model and adapter paths resolved."""
    settings = {}
    for k in ("model", "adapter", "dtype", "max_new_tokens", *sampling):
        v = getattr(a, k)
        if k in ("model", "adapter") and v and os.path.exists(v):
            v = os.path.realpath(v)
        settings[k] = v
    return settings


def read_records(path):
    """The complete records of an output file by key, (id, sample); accuracy's have no sample."""
    if not os.path.exists(path):
        return {}
    lines = read_jsonl(path, torn_tail=True)  # a kill may tear the last line
    return {(r["id"], r.get("sample", 0)): r for _, r in lines if isinstance(r, dict) and "id" in r}


def merge_records(out, order):
    """Fold OUT and its part files into OUT, in `order` of keys (unknown keys last), atomically."""
    parts = sorted(glob.glob(glob.escape(out) + ".part*"))
    records = {}
    for path in [out, *parts]:  # part files win
        records.update(read_records(path))
    rank = {k: n for n, k in enumerate(order)}
    keys = sorted(records, key=lambda k: rank.get(k, len(rank)))
    write_jsonl(out, [records[k] for k in keys])
    for p in parts:
        os.remove(p)


@torch.no_grad()
def run_sharded(jobs, out, work, batch_size, rank=0, world=1, log=None, label=""):
    """Do every job whose record `out` lacks; return all records, in jobs' order.

    jobs: dicts with a unique "key" (id, sample), "ids" (the prompt) and "stamp" (see stamp());
    work(batch of jobs) returns one record per job. A record in OUT is reused only under its job's
    stamp. Each rank takes every world-th missing job, longest prompts first (an out-of-memory
    shows in the first batch), and appends each batch's records to OUT (one process) or OUT.partR,
    flushed. Rank 0 folds the parts into OUT, in jobs' order, at the start and the end.
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
        log(f"{label}: {stale} record(s) in {out} were made for other items or settings: "
            "redoing them")
    mine = [j for j in jobs if done.get(j["key"], {}).get("stamp") != j["stamp"]][rank::world]
    mine.sort(key=lambda j: -len(j["ids"]))
    part = out if world == 1 else f"{out}.part{rank}"
    t0 = time.time()
    for start in range(0, len(mine), batch_size):
        batch = mine[start:start + batch_size]
        records = [{**r, "stamp": j["stamp"]} for j, r in zip(batch, work(batch))]
        append_jsonl(part, records)
        if log:
            n = min(start + batch_size, len(mine))
            dt = time.time() - t0
            eta = duration(dt / n * (len(mine) - n))
            who = "rank 0: " if world > 1 else ""
            log(f"{label} {who}{n}/{len(mine)} | {n / dt:.2f} items/s | eta {eta}")
    barrier()
    if rank == 0:
        merge_records(out, keys)
    barrier()
    records = read_records(out)
    return [records[k] for k in keys if k in records]


def start_run(a, outs, settings, rank, world, device, held=None):
    """Refuse to add to outputs made with other generation settings (old → new in the message);
    load the model; take OUT.lock into the ExitStack `held` (common.hold_lock: one run per
    output); rank 0 writes the settings to OUT-STEM.summary.json first, so that a resumed run can
    be checked against them."""
    summary = os.path.splitext(a.out)[0] + ".summary.json"
    if os.path.exists(summary) and any(os.path.exists(o) for o in outs):
        old = read_json(summary).get("generation") or {}
        changed = [f"{k} {old[k]!r} → {v!r}" for k, v in settings.items()
                   if k in old and old[k] != v]
        if changed:
            raise DataError(f"--out {a.out}: holds outputs made with another "
                            f"{'; '.join(changed)}; use a new --out")
    model, tok = load_student(a.model, a.adapter, a.dtype, device)
    if held is not None:
        held.enter_context(hold_lock(a.out, rank, device, a.out + ".lock"))
    barrier()  # every rank has read the old settings before rank 0 writes the new
    if rank == 0:
        write_json(summary, {"settings": vars(a), "generation": settings, "results": None})
    return model, tok


# --- teacher rationales: N samples per question, in the teacher's own chat template ---

def sample_seed(seed, qid, sample):
    """The sampling seed of one (seed, question, sample): a row's draws ignore its batch."""
    return derive_seed(seed, qid, sample)


def run_rationales(a, rank=0, world=1, device="cpu", held=None):
    """Sample --samples rationales per question at --temperature; records {id, sample, question,
    answer, task, text, extracted, correct, new_tokens, stopped}, which data.py build reads."""
    if bool(a.questions) == bool(a.data) or (a.data and not a.task):
        raise DataError("give --questions FILE, or --task TASK with --data FILE "
                        "(a benchmark in its public format)")
    if a.samples > 1 and a.temperature <= 0:
        raise DataError(f"--samples {a.samples} at --temperature {a.temperature}: "
                        "greedy samples are all the same")
    if a.questions:
        rows = [vars(q) for q in read_questions(a.questions, a.task and task_name(a.task))]
    else:
        rows = load_benchmark(task_name(a.task), a.data)
    questions = [{k: r[k] for k in ("id", "question", "answer", "task")} for r in rows]
    questions = questions[:a.limit]
    if not questions:
        raise DataError(f"{a.questions or a.data}: no questions")
    settings = generation_settings(a, ("temperature", "top_p", "seed"))
    model, tok = start_run(a, [a.out], settings, rank, world, device, held)
    stem = os.path.splitext(a.out)[0]
    if rank == 0:  # the questions as data.py build reads them
        write_jsonl(stem + ".questions.jsonl", questions)

    def sample(jobs):
        seeds = [sample_seed(a.seed, *j["key"]) for j in jobs]
        outs = complete(model, tok, [j["ids"] for j in jobs], a.max_new_tokens,
                        temperature=a.temperature, top_p=a.top_p, seed=seeds)
        records = []
        for j, (text, n, stopped) in zip(jobs, outs):
            q = j["q"]
            pred = extract_answer(text, q["task"])
            correct = is_equivalent(pred, q["answer"], q["task"])
            records.append({"id": q["id"], "sample": j["key"][1], **q, "text": text,
                            "extracted": pred, "correct": correct, "new_tokens": n,
                            "stopped": stopped})
        return records

    jobs = []
    for q in questions:
        text, ids = chat_prompt(tok, user_prompt(q["question"], q["task"]))
        made = stamp(text, q["answer"], settings)
        jobs += [{"key": (q["id"], s), "q": q, "ids": ids, "stamp": made} for s in range(a.samples)]
    log = log_stderr if rank == 0 else None
    records = run_sharded(jobs, a.out, sample, a.batch_size, rank, world, log, "rationales")
    result = {"questions": len(questions), "samples": len(records),
              "correct": sum(r["correct"] for r in records),
              "cut_off": sum(not r["stopped"] for r in records),
              "questions_with_a_correct_sample": len({r["id"] for r in records if r["correct"]})}
    if rank == 0:
        summary = {"settings": vars(a), "generation": settings, "results": result}
        write_json(stem + ".summary.json", summary)
        counts = " | ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.items())
        print(f"{counts} | wrote {a.out}")
    return records


# --- the command line ---

def student_flags(sp, adapter_required=False, batch_size=8, model=True):
    """(--model, --adapter,) --dtype, --device, --batch-size, --limit: the flags of a job that
    loads a student; check_student_flags checks them."""
    add = sp.add_argument
    if model:
        add("--model", required=True,
            help="Hugging Face model directory (weights + tokenizer) or hub id")
        add("--adapter", required=adapter_required, help="PEFT LoRA directory on top of --model")
    add("--dtype", choices=("bfloat16", "float32"),
        help="default: bfloat16 on cuda, float32 on cpu")
    add("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--batch-size", type=int, default=batch_size)
    add("--limit", type=int, help="only the first N items of each data file")


def check_student_flags(a, flags):
    """DataError for any of `flags` below 1 or --device cuda without CUDA; --dtype's default by
    device."""
    for flag in flags:
        value = getattr(a, flag, None)
        if value is not None and value < 1:
            raise DataError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device here")
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")


def build_parser():
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy",
                         help="accuracy ± SEM on benchmarks (resumable, torchrun-aware)")
    student_flags(acc, batch_size=16)
    acc.add_argument("--task", action="append", required=True,
                     help=f"one of {', '.join(TASKS + tuple(TASK_ALIASES))}; repeat")
    acc.add_argument("--data", action="append", required=True,
                     help="the task's file in its public format; repeat, in --task order")
    acc.add_argument("--max-new-tokens", type=int, default=1024)
    acc.add_argument("--out", required=True,
                     help="predictions JSONL (several tasks: OUT-STEM-TASK.jsonl)")
    r = sub.add_parser("rationales",
                       help="teacher rationales, N samples per question (resumable, torchrun)")
    student_flags(r, batch_size=16)
    r.add_argument("--questions",
                   help="JSONL of {id, question, answer[, task]}, as data.py build reads it")
    r.add_argument("--task", help="task of questions without one; with --data, the benchmark's")
    r.add_argument("--data", help="instead of --questions: a benchmark file in its public format")
    r.add_argument("--samples", type=int, default=4, help="rationales per question")
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0,
                   help="sample s of question q draws from seed (seed, q, s)")
    r.add_argument("--max-new-tokens", type=int, default=4096)
    r.add_argument("--out", required=True,
                   help="rationales JSONL (OUT-STEM.questions.jsonl and .summary.json beside)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    with user_errors(f"eval.py {a.command}"):
        try:
            check_student_flags(a, ("batch_size", "limit", "max_new_tokens", "samples"))
            if a.command == "rationales" and not 0 < a.top_p <= 1:
                raise DataError(f"--top-p {a.top_p}: must be in (0, 1]")
            stem, ext = os.path.splitext(a.out)
            outs = [a.out, a.out + ".lock", stem + ".summary.json", stem + ".questions.jsonl"]
            if a.command == "accuracy":  # and one predictions file per task
                outs += [f"{stem}-{task_name(t)}{ext or '.jsonl'}" for t in a.task]
            data = a.data if isinstance(a.data, list) else [a.data]
            inputs = [("--data", d) for d in data]
            inputs.append(("--questions", vars(a).get("questions")))
            inputs += [("--model", a.model), ("--adapter", a.adapter)]
            check_outputs([("--out", o) for o in outs], inputs)
            rank, world, device = setup_dist(a.device)
            run = run_accuracy if a.command == "accuracy" else run_rationales
            with contextlib.ExitStack() as held:  # start_run takes OUT's lock, before any write
                return run(a, rank, world, device, held)
        finally:
            cleanup_dist()


if __name__ == "__main__":
    main()
