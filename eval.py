"""Evaluate students and read what distillation did to them (SPEC.md §6).

    python eval.py accuracy --model DIR [--adapter DIR] --task gsm8k --data gsm8k_test.jsonl --out preds.jsonl
    torchrun --nproc_per_node=8 eval.py accuracy --model DIR --task gsm8k --data A.jsonl --task svamp --data B.jsonl --out p.jsonl
    python eval.py pca-shift --model DIR --adapter DIR --task csqa --data dev.jsonl --out pca/
    python eval.py mi-trace --model DIR [--adapter DIR] --data multi.jsonl --id ID [--teacher T] --out trace/
    python eval.py weights RUN_DIR

accuracy: zero-shot CoT prompts (data.py) rendered with the checkpoint's own chat template,
greedy decoding with the KV cache in length-sorted batches, answers extracted and checked by
data.py; prints accuracy ± SEM, the binomial standard error sqrt(p(1-p)/n) of the 0/1 scores.
--task and --data repeat and pair up in order (math500 = data.py's "math"); with one task --out
is the predictions file, with several each task writes OUT-STEM-TASK.jsonl beside it, and
OUT-STEM.summary.json holds the settings and the table. Every batch is appended and flushed,
so a rerun with the same --out does only what is missing (a torn last line is redone); a rerun
with another --model, --adapter or --max-new-tokens is refused. Under torchrun each rank takes
every WORLD_SIZE-th missing item and appends to its own OUT.partR; rank 0 merges the parts
into OUT, in data order, at the start and the end of a run.

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
import json
import math
import os
import sys
import time

import torch

from compact import CompactConfig, probe_log_likelihood, probe_plan
from data import DataError, TASKS, Tokenizer, collate, encode_instance, extract_answer, is_equivalent, \
    load_benchmark, load_multi_teacher
from lora import load_adapter
from model import Transformer, generate

SCORES = ("weight", "s_mi", "s_g", "s_d")  # per teacher in each metrics.jsonl step (train.py)
TASK_ALIASES = {"math500": "math", "gpqa-diamond": "gpqa"}  # the benchmark's name -> data.py's task


def load_student(model_dir, adapter=None, dtype="float32", device="cpu"):
    """Transformer (+ LoRA adapter) in eval mode, and the tokenizer of the model directory."""
    tok = Tokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if model.args.vocab_size < tok.vocab_size:
        raise DataError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    if adapter:
        load_adapter(model, adapter)
    return model.eval(), tok


def chat_prompt(tok, user_text):
    """(the exact text fed to the model, its ids): one user turn, then the assistant header."""
    messages = [{"role": "user", "content": user_text}]
    return tok.render_chat(messages), tok.encode_chat(messages)


# --- accuracy ---

def complete_lines(path):
    """(line number, object or None if not JSON) per complete line of a JSONL file that another
    process may be appending to, or was killed while appending to: a torn last line is left out."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                yield lineno, None


def read_predictions(path):
    """The complete records of a predictions file, by id."""
    lines = complete_lines(path) if os.path.exists(path) else []
    return {r["id"]: r for _, r in lines if isinstance(r, dict) and "id" in r}


def merge_predictions(out, order):
    """Fold OUT and its part files into OUT, in data order (unknown ids last), atomically."""
    parts = sorted(glob.glob(glob.escape(out) + ".part*"))
    records = read_predictions(out)
    for p in parts:
        records.update(read_predictions(p))
    rank = {i: n for n, i in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: rank.get(r["id"], len(rank)))
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for p in parts:
        os.remove(p)
    return records


def write_atomic(path, text):
    """Write beside, then rename over: a kill leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def accuracy_sem(correct):
    """(n, accuracy, SEM) of 0/1 outcomes; SEM = sqrt(p(1-p)/n), the binomial standard error."""
    n = len(correct)
    p = sum(correct) / n if n else float("nan")
    return n, p, math.sqrt(p * (1 - p) / n) if n else float("nan")


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def evaluate(model, tok, items, out, batch_size=8, max_new_tokens=512, rank=0, world=1, log=None):
    """Predict, extract and check every item not already in `out`; return all records, in items' order.

    items: data.load_benchmark rows. Each rank generates todo[rank::world], longest prompts
    first (an out-of-memory shows in the first batch), and appends one line per item per batch.
    """
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{items[0]['task']}: duplicate item ids in the data; resuming needs unique ones")
    if rank == 0:
        merge_predictions(out, ids)
    _barrier(world)
    done = read_predictions(out)
    mine = [it for it in items if it["id"] not in done][rank::world]
    prompts = {it["id"]: chat_prompt(tok, it["prompt"]) for it in mine}
    mine.sort(key=lambda it: -len(prompts[it["id"]][1]))
    stop = set(tok.eos_ids) | {tok.eot_id}
    path = out if world == 1 else f"{out}.part{rank}"
    t0 = time.time()
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            outs = generate(model, [prompts[it["id"]][1] for it in batch], max_new_tokens=max_new_tokens, eos_ids=stop)
            for it, new in zip(batch, outs):
                stopped = bool(new) and new[-1] in stop
                text = tok.decode(new[:-1] if stopped else new)
                pred = extract_answer(text, it["task"])
                f.write(json.dumps({"id": it["id"], "prompt": prompts[it["id"]][0], "output": text, "extracted": pred,
                                    "gold": it["answer"], "correct": is_equivalent(pred, it["answer"], it["task"]),
                                    "new_tokens": len(new), "stopped": stopped}, ensure_ascii=False) + "\n")
            f.flush()
            if log:
                n, dt = start + len(batch), time.time() - t0
                eta = int(dt / n * (len(mine) - n))
                log(f"{items[0]['task']} {'rank 0: ' if world > 1 else ''}{n}/{len(mine)} | {n / dt:.2f} items/s"
                    f" | eta {eta // 3600}h{eta // 60 % 60:02d}m{eta % 60:02d}s")
    _barrier(world)
    if rank == 0:
        merge_predictions(out, ids)
    _barrier(world)
    records = read_predictions(out)
    return [records[i] for i in ids if i in records]


def run_accuracy(a, rank=0, world=1, device="cpu"):
    if len(a.task) != len(a.data):
        raise DataError(f"--task given {len(a.task)} times but --data {len(a.data)} times; they pair up in order")
    tasks = [TASK_ALIASES.get(t, t) for t in a.task]
    for t in tasks:
        if t not in TASKS:
            raise DataError(f"--task {t}: unknown (known: {', '.join(TASKS + tuple(TASK_ALIASES))})")
    if len(set(tasks)) != len(tasks):
        raise DataError("--task: each task once per call")
    data = [load_benchmark(t, p)[:a.limit] for t, p in zip(tasks, a.data)]  # DataError names FILE:LINE
    for t, p, d in zip(tasks, a.data, data):
        if not d:
            raise DataError(f"--data {p}: no {t} items")
    stem, ext = os.path.splitext(a.out)
    outs = [a.out] if len(tasks) == 1 else [f"{stem}-{t}{ext or '.jsonl'}" for t in tasks]  # one file per task
    summary_path = stem + ".summary.json"
    if os.path.exists(summary_path) and any(os.path.exists(o) for o in outs):
        old = json.load(open(summary_path)).get("settings", {})
        changed = [k for k in ("model", "adapter", "max_new_tokens") if old.get(k) != getattr(a, k)]
        if changed:
            raise DataError(f"--out {a.out}: holds predictions made with another {', '.join(changed)}; use a new --out")
    model, tok = load_student(a.model, a.adapter, a.dtype, device)
    _barrier(world)  # every rank has read the old settings before rank 0 writes the new
    if rank == 0:  # the settings first, so a resumed run can be checked against them
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        write_json(summary_path, {"settings": vars(a), "results": None})
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else None
    table = []
    for task, items, out in zip(tasks, data, outs):
        records = evaluate(model, tok, items, out, a.batch_size, a.max_new_tokens, rank, world, log)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        table.append({"task": task, "n": n, "accuracy": p, "sem": sem, "predictions": out})
    if rank == 0:
        write_json(summary_path, {"settings": vars(a), "results": table})
        print(f"{'task':<12} {'n':>6} {'accuracy':>9} {'± SEM':>7}")
        for r in table:
            print(f"{r['task']:<12} {r['n']:>6} {r['accuracy']:>9.4f} {r['sem']:>7.4f}")
    return table


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
    task = TASK_ALIASES.get(a.task, a.task)
    items = load_benchmark(task, a.data)[:a.limit]
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
        out[name] = {"steps": [s for _, s, _ in rows], "series": {k: [v[k] for _, _, v in rows] for k in SCORES},
                     "weight_first": mean("weight", lambda i: i < q),
                     "weight_last": mean("weight", lambda i: i >= len(records) - q),
                     **{k: mean(k) for k in SCORES[1:]}}
    return out


def run_weights(a):
    path = os.path.join(a.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{a.run_dir}: no metrics.jsonl (not a train.py output directory?)")
    records = []
    for lineno, r in complete_lines(path):  # a run still writing has a torn last line
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
        name: (d["steps"], d["series"][key]) for name, d in dyn.items()} for key in SCORES})
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
        if a.command == "weights":
            return run_weights(a)
        for flag in ("batch_size", "limit", "max_new_tokens"):
            if getattr(a, flag, None) is not None and getattr(a, flag) < 1:
                raise DataError(f"--{flag.replace('_', '-')} must be >= 1")
        if a.device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda: no CUDA device here")
        a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
        if a.command == "accuracy":
            from train import setup_dist  # torchrun's process group, as training sets it up
            rank, world, device = setup_dist(a.device)
            return run_accuracy(a, rank, world, device)
        return (run_pca_shift if a.command == "pca-shift" else run_mi_trace)(a, a.device)
    except (DataError, OSError, ValueError, KeyError) as e:
        p.exit(2, f"eval.py {a.command}: error: {e.args[0] if isinstance(e, KeyError) else e}\n")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
