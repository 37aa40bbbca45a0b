"""Evaluate students, sample teacher rationales, and read what distillation did (SPEC.md §6).

    python eval.py accuracy --model DIR|org/name [--adapter DIR] --task gsm8k --data gsm8k_test.jsonl --out preds.jsonl
    torchrun --nproc_per_node=8 eval.py accuracy --model DIR --task gsm8k --data A.jsonl --task svamp --data B.jsonl --out p.jsonl
    torchrun --nproc_per_node=2 eval.py rationales --model TEACHER (--questions Q.jsonl | --task math --data BENCH) \
        --samples 4 --temperature 0.7 --out qwq.jsonl
    python eval.py table --run base=runs/base/preds.jsonl --run compact=runs/c-s0/eval,runs/c-s1/eval [--out table/]
    python eval.py pca-shift --model DIR --adapter DIR --task csqa --data dev.jsonl --out pca/
    python eval.py mi-trace --model DIR [--adapter DIR] --data multi.jsonl --id ID [--teacher T] --out trace/
    python eval.py weights RUN_DIR

accuracy: zero-shot CoT prompts (data.py) rendered with the checkpoint's own chat template,
greedy decoding with the KV cache in length-sorted batches, answers extracted and checked by
data.py; prints accuracy ± SEM, the binomial standard error sqrt(p(1-p)/n) of the 0/1 scores.
--task and --data repeat and pair up in order (math500 = data.py's "math"); with one task --out
is the predictions file, with several each task writes OUT-STEM-TASK.jsonl beside it, and
OUT-STEM.summary.json holds the settings and the table.

rationales: --samples per question at --temperature (--top-p), prompted like accuracy in the
teacher's own chat template; sample s of question q draws from its own stream, seeded by
(--seed, q, s), so a sample does not depend on its batch, its rank or a resume. Writes one record
per (question, sample), OUT-STEM.questions.jsonl and OUT-STEM.summary.json; `data.py build
--questions OUT-STEM.questions.jsonl --teacher NAME=OUT` reads them as they are.

Both run_sharded: every batch is appended and flushed, so a rerun with the same --out does only
what is missing (a torn last line is redone); a rerun with other generation settings is refused.
Under torchrun each rank takes every WORLD_SIZE-th missing item and appends to its own
OUT.partR; rank 0 merges the parts into OUT, in data order, at the start and the end of a run.

table: the paper's Table 1 from accuracy outputs: --run NAME=PATH[,PATH...] (one PATH per seed:
an accuracy --out, its summary, or a directory of summaries). Accuracy per benchmark, the
in-distribution (MATH500, GSM8K, SVAMP) and out-of-distribution (CommonsenseQA, StrategyQA,
GPQA-Diamond) average gain over --baseline, each ± SEM over items and, with several seeds, ± SEM
over seeds (table1 says how); as Markdown (printed, table.md) and JSON (table.json).

pca-shift: per layer l (the output of block l; the embeddings are not a layer), each prompt's
states mean-pooled over its tokens; PCA of the base student's pooled states (SVD, centred);
d = centroid(base + adapter) − centroid(base); reports |d·v1|, |d·v2|, ‖d‖, and the same over
the base's spread (its std along v1, v2; its RMS distance to the centroid).

mi-trace: I_t = log p(y | x, r_≤t) after every rationale token, computed exactly by compact.py's
probe with every position (equal to a per-prefix loop), ΔI_t = I_t − I_{t−1}, thinking tokens marked,
before and, with --adapter, after distillation. weights: a train.py run's metrics.jsonl as
per-teacher weight and score curves (the paper's Fig. 3) and a table.

Left out: sampling metrics (pass@k, majority vote), answer checking beyond data.py's, multi-turn
prompts, several GPUs per model. Plots need matplotlib; without it the numbers are still written.
"""
import argparse
import csv
import glob
import hashlib
import json
import math
import os
import re
import sys
import time

import torch

from compact import TEACHER_STATS, CompactConfig, probe_log_likelihood, probe_plan
from data import DataError, TASKS, collate, encode_instance, extract_answer, is_equivalent, load_benchmark, \
    load_multi_teacher, read_jsonl, read_questions, user_prompt, write_json, write_jsonl, write_text
from lora import load_adapter, load_student
from model import generate

TASK_ALIASES = {"math500": "math", "gpqa-diamond": "gpqa"}  # the benchmark's name -> data.py's task


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


def evaluate(model, tok, items, out, batch_size=8, max_new_tokens=512, rank=0, world=1, log=None):
    """Predict, extract and check every item not already in `out`; return all records, in items' order.

    items: data.load_benchmark rows. Greedy decoding; resumable and sharded by run_sharded.
    """
    def predict_and_check(jobs):
        outs = complete(model, tok, [j["ids"] for j in jobs], max_new_tokens)
        return [{"id": j["item"]["id"], "prompt": j["text"], "output": text, "extracted": (pred := extract_answer(
                    text, j["item"]["task"])), "gold": j["item"]["answer"],
                 "correct": is_equivalent(pred, j["item"]["answer"], j["item"]["task"]), "new_tokens": n,
                 "stopped": stopped} for j, (text, n, stopped) in zip(jobs, outs)]
    jobs = [{"key": (it["id"], 0), "item": it, **dict(zip(("text", "ids"), chat_prompt(tok, it["prompt"])))}
            for it in items]
    return run_sharded(jobs, out, predict_and_check, batch_size, rank, world, log, items[0]["task"])


def run_accuracy(a, rank=0, world=1, device="cpu"):
    if len(a.task) != len(a.data):
        raise DataError(f"--task given {len(a.task)} times but --data {len(a.data)} times; they pair up in order")
    tasks = [task_name(t) for t in a.task]
    if len(set(tasks)) != len(tasks):
        raise DataError("--task: each task once per call")
    data = [load_benchmark(t, p)[:a.limit] for t, p in zip(tasks, a.data)]  # DataError names FILE:LINE
    for t, p, d in zip(tasks, a.data, data):
        if not d:
            raise DataError(f"--data {p}: no {t} items")
    stem, ext = os.path.splitext(a.out)
    outs = [a.out] if len(tasks) == 1 else [f"{stem}-{t}{ext or '.jsonl'}" for t in tasks]  # one file per task
    model, tok = start_run(a, outs, ("model", "adapter", "max_new_tokens"), rank, world, device)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    table = []
    for task, items, out in zip(tasks, data, outs):
        records = evaluate(model, tok, items, out, a.batch_size, a.max_new_tokens, rank, world, log)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        table.append({"task": task, "n": n, "accuracy": p, "sem": sem, "predictions": out})
    if rank == 0:
        write_json(stem + ".summary.json", {"settings": vars(a), "results": table})
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

def read_records(path):
    """The complete records of an output file by key, (id, sample); accuracy's records have no sample."""
    lines = read_jsonl(path, torn_tail=True) if os.path.exists(path) else []  # a kill may tear the last line
    return {(r["id"], r.get("sample", 0)): r for _, r in lines if isinstance(r, dict) and "id" in r}


def merge_records(out, order):
    """Fold OUT and its part files into OUT, in `order` of keys (unknown keys last), atomically."""
    parts = sorted(glob.glob(glob.escape(out) + ".part*"))
    records = read_records(out)
    for p in parts:
        records.update(read_records(p))
    rank = {k: n for n, k in enumerate(order)}
    write_jsonl(out, sorted(records.values(), key=lambda r: rank.get((r["id"], r.get("sample", 0)), len(rank))))
    for p in parts:
        os.remove(p)


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def run_sharded(jobs, out, work, batch_size, rank=0, world=1, log=None, label=""):
    """Do every job whose record `out` lacks; return all records, in jobs' order.

    jobs: dicts with a unique "key" (id, sample) and "ids" (the prompt); work(batch of jobs) returns one
    record per job, carrying its id (and sample). Each rank takes every world-th missing job, longest
    prompts first (an out-of-memory shows in the first batch), and appends each batch's records to OUT
    (one process) or OUT.partR, flushed, so a kill loses at most one batch (a torn last line is redone).
    Rank 0 folds the parts into OUT, in jobs' order, at the start and the end.
    """
    keys = [j["key"] for j in jobs]
    if len(set(keys)) != len(keys):
        raise DataError(f"{label}: duplicate item ids in the data; resuming needs unique ones")
    if rank == 0:
        merge_records(out, keys)
    _barrier(world)
    done = read_records(out)
    mine = sorted([j for j in jobs if j["key"] not in done][rank::world], key=lambda j: -len(j["ids"]))
    t0 = time.time()
    with open(out if world == 1 else f"{out}.part{rank}", "a", encoding="utf-8") as f:
        for start in range(0, len(mine), batch_size):
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in work(mine[start:start + batch_size]))
            f.flush()
            if log:
                n, dt = min(start + batch_size, len(mine)), time.time() - t0
                eta = int(dt / n * (len(mine) - n))
                log(f"{label} {'rank 0: ' if world > 1 else ''}{n}/{len(mine)} | {n / dt:.2f} items/s"
                    f" | eta {eta // 3600}h{eta // 60 % 60:02d}m{eta % 60:02d}s")
    _barrier(world)
    if rank == 0:
        merge_records(out, keys)
    _barrier(world)
    records = read_records(out)
    return [records[k] for k in keys if k in records]


def start_run(a, outs, keys, rank, world, device):
    """Refuse to resume outputs made with other settings `keys`; load the model; rank 0 writes the settings
    to OUT-STEM.summary.json first, so that a resumed run can be checked against them."""
    summary = os.path.splitext(a.out)[0] + ".summary.json"
    if os.path.exists(summary) and any(os.path.exists(o) for o in outs):
        old = json.load(open(summary)).get("settings", {})
        if changed := [k for k in keys if old.get(k) != getattr(a, k)]:
            raise DataError(f"--out {a.out}: holds outputs made with another {', '.join(changed)}; use a new --out")
    model, tok = load_student(a.model, a.adapter, a.dtype, device)
    _barrier(world)  # every rank has read the old settings before rank 0 writes the new
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        write_json(summary, {"settings": vars(a), "results": None})
    return model, tok


# --- teacher rationales: N samples per question, in the teacher's own chat template ---

def sample_seed(seed, qid, sample):
    """The sampling seed of one (seed, question, sample): a row's draws do not depend on its batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{qid}\0{sample}".encode()).digest()[:7], "little")


def run_rationales(a, rank=0, world=1, device="cpu"):
    """Sample --samples rationales per question at --temperature; records {id, sample, question, answer,
    task, text, extracted, correct, new_tokens, stopped}, which data.py build reads as they are."""
    if bool(a.questions) == bool(a.data) or (a.data and not a.task):
        raise DataError("give --questions FILE, or --task TASK with --data FILE (a benchmark in its public format)")
    if a.samples > 1 and a.temperature <= 0:
        raise DataError(f"--samples {a.samples} at --temperature {a.temperature}: greedy samples are all the same")
    questions = [{"id": q.id, "question": q.question, "answer": q.answer, "task": q.task} for q in
                 read_questions(a.questions, a.task and task_name(a.task))] if a.questions else \
        [{k: it[k] for k in ("id", "question", "answer", "task")} for it in load_benchmark(task_name(a.task), a.data)]
    if not (questions := questions[:a.limit]):
        raise DataError(f"{a.questions or a.data}: no questions")
    model, tok = start_run(a, [a.out], ("model", "adapter", "max_new_tokens", "temperature", "top_p", "seed"),
                           rank, world, device)
    stem = os.path.splitext(a.out)[0]
    if rank == 0:  # the questions as data.py build reads them
        write_jsonl(stem + ".questions.jsonl", questions)

    def sample(jobs):
        outs = complete(model, tok, [j["ids"] for j in jobs], a.max_new_tokens, temperature=a.temperature,
                        top_p=a.top_p, seed=[sample_seed(a.seed, *j["key"]) for j in jobs])
        return [{"id": j["q"]["id"], "sample": j["key"][1], **j["q"], "text": text, "extracted": (pred := extract_answer(
                    text, j["q"]["task"])), "correct": is_equivalent(pred, j["q"]["answer"], j["q"]["task"]),
                 "new_tokens": n, "stopped": stopped} for j, (text, n, stopped) in zip(jobs, outs)]
    prompts = {q["id"]: chat_prompt(tok, user_prompt(q["question"], q["task"]))[1] for q in questions}
    jobs = [{"key": (q["id"], s), "q": q, "ids": prompts[q["id"]]} for q in questions for s in range(a.samples)]
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    records = run_sharded(jobs, a.out, sample, a.batch_size, rank, world, log, "rationales")
    solved = {r["id"] for r in records if r["correct"]}
    result = {"questions": len(questions), "samples": len(records), "correct": sum(r["correct"] for r in records),
              "cut_off": sum(not r["stopped"] for r in records), "questions_with_a_correct_sample": len(solved)}
    if rank == 0:
        write_json(stem + ".summary.json", {"settings": vars(a), "results": result})
        print(" | ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.items()) + f" | wrote {a.out}")
    return records


# --- Table 1: accuracy per benchmark, average gains over the baseline, SEMs ---

GROUPS = {"in-distribution": ("math", "gsm8k", "svamp"), "out-of-distribution": ("csqa", "strategyqa", "gpqa")}
NAMES = {"math": "MATH500", "gsm8k": "GSM8K", "svamp": "SVAMP", "csqa": "CommonsenseQA", "strategyqa": "StrategyQA",
         "gpqa": "GPQA-Diamond"}


def seed_predictions(path):
    """{task: predictions file} of one seed: an eval.py accuracy --out (its summary beside it), the summary
    itself, a directory of summaries, or a predictions file named TASK.jsonl / STEM-TASK.jsonl."""
    stem = path[:-len(".summary.json")] if path.endswith(".summary.json") else os.path.splitext(path)[0]
    summaries = sorted(glob.glob(os.path.join(glob.escape(path), "*.summary.json"))) if os.path.isdir(path) else \
        [stem + ".summary.json"] if os.path.isfile(stem + ".summary.json") else []
    if not summaries:
        task = next((t for t in TASKS + tuple(TASK_ALIASES) if re.search(rf"(^|[-_/]){t}\.jsonl$", path)), None)
        if task and os.path.isfile(path):
            return {task_name(task): path}
        raise DataError(f"--run {path}: no eval.py accuracy output (no .summary.json, no TASK.jsonl file)")
    found = {}
    for s in summaries:
        results = json.load(open(s)).get("results")
        if not isinstance(results, list):
            raise DataError(f"{s}: the accuracy run has not finished; rerun it with the same --out")
        for r in results:  # a path relative to where the run started, else beside the summary
            pred = r["predictions"] if os.path.isfile(r["predictions"]) else \
                os.path.join(os.path.dirname(s), os.path.basename(r["predictions"]))
            if found.setdefault(r["task"], pred) != pred:
                raise DataError(f"--run {path}: two prediction files for {r['task']}")
    return found


def read_correct(path):
    """{id: 0 or 1} of a predictions file."""
    out = {}
    for lineno, r in read_jsonl(path, torn_tail=True):
        if not isinstance(r, dict) or not isinstance(r.get("correct"), bool) or "id" not in r:
            raise DataError(f"{path}:{lineno}: not a prediction record with 'id' and 'correct'")
        out[r["id"]] = int(r["correct"])
    return out


def item_means(seeds, where):
    """Per item, the mean over seeds of the 0/1 scores; every seed must score the same items."""
    if any(set(s) != set(seeds[0]) for s in seeds) or not seeds[0]:
        raise DataError(f"{where}: the seeds' prediction files hold different (or no) items")
    return {i: sum(s[i] for s in seeds) / len(seeds) for i in seeds[0]}


def sem(x, ddof):
    """sqrt(Σ(x_i − x̄)² / (n − ddof)) / √n; ddof 0 on 0/1 scores is the binomial SEM sqrt(p(1−p)/n)."""
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - ddof) / len(x)) if len(x) > ddof else None


def table1(runs, baseline):
    """runs: {name: [{task: {id: 0/1}} per seed]} -> per run and benchmark the accuracy (mean over seeds) with
    its item SEM (of the per-item means over seeds: the binomial SEM with one seed) and seed SEM (std of the
    seeds' accuracies / √S), and per group the average gain over `baseline` (mean over the group's benchmarks
    of run − baseline) with its item SEM (paired per item, benchmarks in quadrature) and seed SEM."""
    tasks = [t for g in GROUPS.values() for t in g if any(t in s for seeds in runs.values() for s in seeds)]
    out, scores = {}, {}
    for name, seeds in runs.items():
        means, accs = {}, {}
        out[name] = {"seeds": len(seeds), "benchmarks": {}, "gains": {}}
        for t in [t for t in tasks if all(t in s for s in seeds)]:
            means[t] = item_means([s[t] for s in seeds], f"--run {name} {t}")
            accs[t] = [sum(s[t].values()) / len(s[t]) for s in seeds]
            out[name]["benchmarks"][t] = {"n": len(means[t]), "accuracy": sum(accs[t]) / len(seeds),
                                          "sem_items": sem(list(means[t].values()), 0), "sem_seeds": sem(accs[t], 1)}
        scores[name] = means, accs
    base_means, base_accs = scores[baseline]
    for name, row in out.items():
        means, accs = scores[name]
        for group, members in GROUPS.items():
            members = [t for t in members if t in tasks]
            if name == baseline or not members or any(t not in means or t not in base_means for t in members):
                continue
            if bad := [t for t in members if set(means[t]) != set(base_means[t])]:
                raise DataError(f"--run {name} and --run {baseline}: {bad[0]} predictions of different items")
            base = {t: sum(base_accs[t]) / len(base_accs[t]) for t in members}
            per_seed = [sum(accs[t][s] - base[t] for t in members) / len(members) for s in range(row["seeds"])]
            paired = [sem([x - base_means[t][i] for i, x in means[t].items()], 0) for t in members]
            row["gains"][group] = {"gain": sum(per_seed) / len(per_seed), "benchmarks": members,
                                   "sem_items": math.sqrt(sum(v * v for v in paired)) / len(members),
                                   "sem_seeds": sem(per_seed, 1)}
    return {"baseline": baseline, "tasks": tasks, "runs": out}


def table_markdown(t):
    """Table 1's layout: a row per run; each group's benchmarks, then its average gain. In %."""
    pct = lambda v, sign="": f"{100 * v[0]:{sign}.2f} ± {100 * v[1]:.2f}" + (f" ± {100 * v[2]:.2f}" if v[2] is not None else "")
    head, rows = ["run", "seeds"], []
    for group, members in GROUPS.items():
        head += [NAMES[m] for m in members if m in t["tasks"]] + [f"{group} avg gain"] * any(m in t["tasks"] for m in members)
    for name, r in t["runs"].items():
        cells = [name, str(r["seeds"])]
        for group, members in GROUPS.items():
            cells += [pct([b["accuracy"], b["sem_items"], b["sem_seeds"]]) if (b := r["benchmarks"].get(m)) else "—"
                      for m in members if m in t["tasks"]]
            if any(m in t["tasks"] for m in members):
                g = r["gains"].get(group)
                cells.append(pct([g["gain"], g["sem_items"], g["sem_seeds"]], "+") if g else "—")
        rows.append(cells)
    lines = ["| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head)] + rows]
    return "\n".join(lines) + (f"\n\nAccuracy and gains over {t['baseline']} in %, ± SEM over items (binomial; "
                               "of the per-item mean over seeds; for gains paired per item), ± SEM over seeds.\n")


def run_table(a):
    runs = {}
    for spec in a.run:
        name, eq, paths = spec.partition("=")
        if not eq or not name or not paths or name in runs:
            raise DataError(f"--run {spec!r}: expected NAME=PATH[,PATH...] (one path per seed), each NAME once")
        runs[name] = [{t: read_correct(p) for t, p in seed_predictions(path).items()} for path in paths.split(",")]
    baseline = a.baseline or next(iter(runs))
    if baseline not in runs:
        raise DataError(f"--baseline {baseline}: not one of the --run names ({', '.join(runs)})")
    t = table1(runs, baseline)
    text = table_markdown(t)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        write_text(os.path.join(a.out, "table.md"), text)
        write_json(os.path.join(a.out, "table.json"), {**t, "sources": {r.partition("=")[0]: r.partition("=")[2].split(",")
                                                                        for r in a.run}})
    print(text, end="")
    return t


# --- PCA shift (SPEC §6, the paper's §4.3) ---

@torch.no_grad()
def pooled_states(model, prompts, batch_size=8):
    """[L, N, C] fp32: each block's output (embeddings not counted) mean-pooled over a prompt's tokens."""
    device = model.lm_head.weight.device
    captured, pooled = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0])) for layer in model.model.layers]
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            T = max(len(p) for p in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long, device=device)
            real = torch.zeros(len(batch), T, 1, device=device)
            for i, p in enumerate(batch):  # right padding: with the causal mask no real token sees a pad
                ids[i, :len(p)] = torch.tensor(p)
                real[i, :len(p)] = 1
            captured.clear()
            model(ids, return_hidden=True)
            pooled.append(torch.stack([(h.float() * real).sum(1) / real.sum(1) for h in captured]))  # (L, B, C)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(pooled, dim=1)


def pca_shift(base, distilled):
    """Per layer, the distilled centroid's move in the base states' PCA frame; base, distilled [L, N, C].

    d = mean(distilled) − mean(base). pc1, pc2 = |d · v_k| for the base's top principal axes
    v_k (SVD of the centred base states); full = ‖d‖₂. The *_rel values divide by the base's
    spread: its standard deviation along v_k, and its RMS distance to the centroid for full.
    """
    rows = []
    for layer, (x, y) in enumerate(zip(base.double(), distilled.double()), 1):
        mu = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)
        sd = s / math.sqrt(x.shape[0])  # spread along each axis
        d = y.mean(0) - mu
        proj = (vh[:2] @ d).abs()
        rel = lambda v, scale: float(v / scale) if scale > 0 else float("nan")
        rows.append({"layer": layer, "pc1": float(proj[0]), "pc2": float(proj[1]), "full": float(d.norm()),
                     "pc1_rel": rel(proj[0], sd[0]), "pc2_rel": rel(proj[1], sd[1]),
                     "full_rel": rel(d.norm(), sd.pow(2).sum().sqrt()),
                     "var_pc1": float(s[0] ** 2 / s.pow(2).sum()), "var_pc2": float(s[1] ** 2 / s.pow(2).sum())})
    return rows


def run_pca_shift(a, device="cpu"):
    items = load_benchmark(task_name(a.task), a.data)[:a.limit]
    if len(items) < 3:
        raise DataError(f"--data {a.data}: {len(items)} item(s); two principal axes need at least 3")
    model, tok = load_student(a.model, None, a.dtype, device)
    prompts = [chat_prompt(tok, it["prompt"])[1] for it in items]
    base = pooled_states(model, prompts, a.batch_size)
    load_adapter(model, a.adapter).eval()  # the same weights with the adapter on top; eval: no LoRA dropout
    rows = pca_shift(base, pooled_states(model, prompts, a.batch_size))
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "pca_shift.json"), {"settings": vars(a), "n": len(items), "layers": rows})
    for r in rows:
        print("layer {layer:>3} | shift PC1 {pc1:.4g} PC2 {pc2:.4g} full {full:.4g} | over the base spread "
              "PC1 {pc1_rel:.3f} PC2 {pc2_rel:.3f} full {full_rel:.3f}".format(**r))
    plot(os.path.join(a.out, "pca_shift.png"), "layer (block output)", {"centroid shift / base spread": {
        k: ([r["layer"] for r in rows], [r[k + "_rel"] for r in rows]) for k in ("pc1", "pc2", "full")}})
    return rows


# --- information-gain trace (SPEC §6, the paper's App. C) ---

@torch.no_grad()
def information_trace(model, tok, inst, teacher, chunk=256):
    """I_0..I_|R| = log p(y | x, r_≤t) along one rationale, exact (compact.py's probe, --mi-budget 0).

    Returns (info [|R|+1], think [|R|] bool, token texts); ΔI_t = info[t] − info[t−1]. The probe
    blocks see only the main pass and themselves, so `chunk` of them at a time is exact and
    bounds the attention matrix of a long rationale.
    """
    enc = encode_instance(inst, tok, [teacher], max_len=10**9)
    device = model.lm_head.weight.device
    batch = {k: (v[:, 0] if v.dim() == 3 else v).to(device) for k, v in collate([enc], tok.pad_id).items()}  # (1, T)
    pos, valid, _ = probe_plan(batch["rationale_mask"], batch["think_mask"], CompactConfig(mi_budget=0))
    _, aux = model(batch["input_ids"], return_hidden=True, return_aux=True)
    info = torch.cat([probe_log_likelihood(model, aux.kv, batch["attention_mask"], pos[:, i:i + chunk],
                                           valid[:, i:i + chunk], batch["probe_ids"], batch["probe_answer_mask"])[0]
                      for i in range(0, pos.shape[1], chunk)])  # (1 + |R|,)
    text = dict(inst.rationales)[teacher].strip()
    _, offsets = tok.encode_with_offsets(text)  # encode_instance tokenizes the stripped text the same way
    return info.float().cpu(), batch["think_mask"][0, pos[0, 1:]].cpu(), [text[s:e] for s, e in offsets]


def run_mi_trace(a, device="cpu"):
    instances = {inst.id: inst for inst in load_multi_teacher(a.data)}
    if a.id not in instances:
        raise DataError(f"--id {a.id}: not in {a.data}")
    inst = instances[a.id]
    names = [t for t, _ in inst.rationales]
    teacher = a.teacher or (names[0] if names else None)
    if teacher not in names:
        raise DataError(f"--teacher {teacher}: instance {a.id} has rationales from {', '.join(names) or 'no teacher'}")
    model, tok = load_student(a.model, None, a.dtype, device)
    traces = {"before": information_trace(model, tok, inst, teacher)}
    if a.adapter:
        load_adapter(model, a.adapter).eval()  # the new LoRA modules start in training mode (dropout)
        traces["after"] = information_trace(model, tok, inst, teacher)
    info, think, tokens = traces["before"]
    os.makedirs(a.out, exist_ok=True)
    header = ["t", "token", "is_thinking", "I_t", "delta_I"] + (["I_t_after", "delta_I_after"] if a.adapter else [])
    with open(os.path.join(a.out, "trace.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for t in range(1, len(info)):
            extra = [float(v) for i, _, _ in traces.values() for v in (i[t], i[t] - i[t - 1])]
            w.writerow([t, tokens[t - 1], int(think[t - 1])] + extra)
    ccfg = CompactConfig()
    summary = {}
    for name, (i, th, _) in traces.items():
        gain = i[1:] - i[:-1]
        m = torch.where(th, ccfg.think_weight, ccfg.other_weight)
        summary[name] = {"I_0": float(i[0]), "I_final": float(i[-1]), "s_mi": float((m * gain.clamp(min=0)).mean()),
                         "mean_gain_thinking": float(gain[th].mean()) if th.any() else None,
                         "mean_gain_other": float(gain[~th].mean()) if (~th).any() else None}
    write_json(os.path.join(a.out, "trace.json"), {"settings": vars(a), "teacher": teacher, "tokens": len(tokens),
                                                   **summary})
    for name, s in summary.items():
        print(f"{name}: " + " | ".join(f"{k} {v:.4f}" for k, v in s.items() if v is not None))
    steps = list(range(1, len(info)))
    series = {f"ΔI_t {k}": (steps, (i[1:] - i[:-1]).tolist()) for k, (i, _, _) in traces.items()}
    marks = [(t, tokens[t - 1].strip()) for t in steps if think[t - 1]]
    plot(os.path.join(a.out, "trace.png"), "rationale token t (thinking tokens marked)", {"ΔI_t (nats)": series}, marks)
    return traces


# --- teacher weight dynamics (SPEC §6, the paper's Fig. 3) ---

def teacher_dynamics(records):
    """Per teacher: its steps and per-step weight and scores (the plot), mean weight in the first and
    last quarter of the steps, and mean s_mi, s_g, s_d; means weighted by the branch count n."""
    q = max(1, math.ceil(len(records) / 4))
    out = {}
    for name in sorted({t for r in records for t in r["teachers"]}):
        rows = [(i, r["step"], r["teachers"][name]) for i, r in enumerate(records) if name in r["teachers"]]
        def mean(key, keep=lambda i: True):
            sel = [(v[key], v["n"]) for i, _, v in rows if keep(i)]
            n = sum(c for _, c in sel)
            return sum(x * c for x, c in sel) / n if n else float("nan")
        out[name] = {"steps": [s for _, s, _ in rows], "series": {k: [v[k] for _, _, v in rows] for k in TEACHER_STATS},
                     "weight_first": mean("weight", lambda i: i < q),
                     "weight_last": mean("weight", lambda i: i >= len(records) - q),
                     **{k: mean(k) for k in TEACHER_STATS[1:]}}
    return out


def run_weights(a):
    path = os.path.join(a.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{a.run_dir}: no metrics.jsonl (not a train.py output directory?)")
    records = []
    for lineno, r in read_jsonl(path, torn_tail=True):  # a run still writing has a torn last line
        if not isinstance(r, dict) or "step" not in r or not isinstance(r.get("teachers"), dict):
            raise DataError(f"{path}:{lineno}: not a metrics record with 'step' and 'teachers'")
        records.append(r)
    if not records:
        raise DataError(f"{path}: no complete steps yet")
    dyn = teacher_dynamics(records)
    out = a.out or a.run_dir
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "weights.json"), {"run": a.run_dir, "steps": len(records), "teachers": {
        k: {m: v for m, v in d.items() if m not in ("steps", "series")} for k, d in dyn.items()}})
    print(f"{len(records)} steps | mean weight in the first and last quarter, mean scores")
    print(f"{'teacher':<16} {'w first':>8} {'w last':>8} {'s_mi':>9} {'s_g':>7} {'s_d':>7}")
    for name, d in dyn.items():
        print(f"{name:<16} {d['weight_first']:>8.3f} {d['weight_last']:>8.3f} {d['s_mi']:>9.4f} {d['s_g']:>7.3f} "
              f"{d['s_d']:>7.3f}")
    plot(os.path.join(out, "weights.png"), "optimizer step", {f"mean {key}": {
        name: (d["steps"], d["series"][key]) for name, d in dyn.items()} for key in TEACHER_STATS})
    return dyn


# --- plots and the command line ---

def plot(path, xlabel, panels, marks=()):
    """Stacked line plots, {y label: {line label: (x, y)}}; marks: (x, text) as labelled vertical lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot {path}: pip install matplotlib", file=sys.stderr)
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1 + 3 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels.items()):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
        for x, text in marks:
            ax.axvline(x, color="gray", lw=0.6, ls=":")
            ax.annotate(text, (x, 0.01), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                        va="bottom", ha="right")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser():
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def student(sp, adapter_required=False, batch_size=8):
        sp.add_argument("--model", required=True, help="Hugging Face model directory (weights + tokenizer)")
        sp.add_argument("--adapter", required=adapter_required, help="PEFT LoRA directory on top of --model")
        sp.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on cuda, float32 on cpu")
        sp.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--batch-size", type=int, default=batch_size)
        sp.add_argument("--limit", type=int, help="only the first N items of each data file")

    acc = sub.add_parser("accuracy", help="accuracy ± SEM on benchmarks (resumable, torchrun-aware)")
    student(acc, batch_size=16)
    acc.add_argument("--task", action="append", required=True,
                     help=f"one of {', '.join(TASKS + tuple(TASK_ALIASES))}; repeat")
    acc.add_argument("--data", action="append", required=True,
                     help="the task's file in its public format; repeat, in --task order")
    acc.add_argument("--max-new-tokens", type=int, default=1024)
    acc.add_argument("--out", required=True, help="predictions JSONL (several tasks: OUT-STEM-TASK.jsonl)")
    r = sub.add_parser("rationales", help="teacher rationales: N samples per question (resumable, torchrun-aware)")
    student(r, batch_size=16)
    r.add_argument("--questions", help="JSONL of {id, question, answer[, task]}, as data.py build reads it")
    r.add_argument("--task", help="task of questions without one; with --data, the benchmark's")
    r.add_argument("--data", help="instead of --questions: a benchmark file in its public format")
    r.add_argument("--samples", type=int, default=4, help="rationales per question")
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=0, help="sample s of question q draws from seed (seed, q, s)")
    r.add_argument("--max-new-tokens", type=int, default=4096)
    r.add_argument("--out", required=True, help="rationales JSONL (OUT-STEM.questions.jsonl and .summary.json beside)")
    t = sub.add_parser("table", help="Table 1: accuracy per benchmark, average gains over a baseline, SEMs")
    t.add_argument("--run", action="append", required=True, metavar="NAME=PATH[,PATH...]",
                   help="a run's eval.py accuracy outputs, one PATH per seed (its --out, summary or directory); repeat")
    t.add_argument("--baseline", help="the run gains are measured against (default: the first --run)")
    t.add_argument("--out", help="directory for table.md and table.json")
    pca = sub.add_parser("pca-shift", help="per-layer centroid shift of the distilled student in the base's PCA frame")
    student(pca, adapter_required=True)
    pca.add_argument("--task", required=True)
    pca.add_argument("--data", required=True)
    pca.add_argument("--out", required=True, help="directory for pca_shift.json and pca_shift.png")
    mi = sub.add_parser("mi-trace", help="per-token information gain along one rationale")
    student(mi)
    mi.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC §8)")
    mi.add_argument("--id", required=True, help="the instance's id")
    mi.add_argument("--teacher", help="whose rationale (default: the instance's first)")
    mi.add_argument("--out", required=True, help="directory for trace.csv, trace.json and trace.png")
    w = sub.add_parser("weights", help="teacher weight dynamics of a train.py run (metrics.jsonl)")
    w.add_argument("run_dir")
    w.add_argument("--out", help="directory for weights.png and weights.json (default: RUN_DIR)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    try:
        if a.command in ("weights", "table"):
            return (run_weights if a.command == "weights" else run_table)(a)
        for flag in ("batch_size", "limit", "max_new_tokens", "samples"):
            if getattr(a, flag, None) is not None and getattr(a, flag) < 1:
                raise DataError(f"--{flag.replace('_', '-')} must be >= 1")
        if a.device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device here")
        a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
        if a.command == "rationales" and not 0 < a.top_p <= 1:
            raise DataError(f"--top-p {a.top_p}: must be in (0, 1]")
        if a.command in ("accuracy", "rationales"):
            from train import setup_dist  # torchrun's process group, as training sets it up
            rank, world, device = setup_dist(a.device)
            return (run_accuracy if a.command == "accuracy" else run_rationales)(a, rank, world, device)
        return (run_pca_shift if a.command == "pca-shift" else run_mi_trace)(a, a.device)
    except (DataError, OSError, ValueError, KeyError) as e:
        p.exit(2, f"eval.py {a.command}: error: {e.args[0] if isinstance(e, KeyError) else e}\n")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
