"""Read what distillation did from finished outputs (SPEC.md §6): Table 1, PCA shift, the
information-gain trace, teacher weight dynamics, and the scores
COMPACT gives a multi-teacher file before any training.

    python analysis.py table --run base=runs/base/preds.jsonl --run compact=runs/c-s0/eval,runs/c-s1/eval \
        [--out table/]
    python analysis.py pca-shift --model DIR --adapter DIR --task csqa --data dev.jsonl --out pca/
    python analysis.py mi-trace --model DIR [--adapter DIR] --data multi.jsonl --id ID [--teacher T] \
        --out trace/
    python analysis.py weights RUN_DIR
    python analysis.py score --model DIR --data multi.jsonl --out scores.jsonl [--limit 500] [COMPACT flags]
    python analysis.py readings --set demo=runs/demo/base:runs/demo/data/train.jsonl \
        --set gsm8k=DIR:gsm8k_test.jsonl --out readings/

readings: what each COMPACT score catches, the within-instance AUROC against flaw labels, for every
reading of SPEC's Decisions. Plots need matplotlib; without it the numbers are still
written. Left out: sampling metrics (pass@k, majority vote), significance tests.
"""
import argparse
import csv
import glob
import math
import os
import random
import re
import statistics
import sys
from dataclasses import asdict, replace

import torch

from common import (DataError, add_config_args, config_from_args, read_json, read_jsonl,
                    user_errors, write_json, write_jsonl, write_text)
from compact import (TEACHER_STATS, CompactConfig, compact_loss, fuse_weights, mi_estimate,
                     packed_forward, probe_information, probe_plan, rationale_view)
from data import (RATIONALE, TASKS, Instance, collate, encode_dataset, encode_instance,
                  load_benchmark, load_data, load_multi_teacher, to_device)
from eval import (TASK_ALIASES, chat_prompt, check_student_flags, load_student, student_flags,
                  task_name)
from lora import load_adapter

# --- Table 1: accuracy per benchmark, average gains over the baseline, SEMs ---

GROUPS = {"in-distribution": ("math", "gsm8k", "svamp"),
          "out-of-distribution": ("csqa", "strategyqa", "gpqa")}
NAMES = {"math": "MATH500", "gsm8k": "GSM8K", "svamp": "SVAMP", "csqa": "CommonsenseQA",
         "strategyqa": "StrategyQA", "gpqa": "GPQA-Diamond"}


def seed_predictions(path):
    """{task: predictions file} of one seed: an eval.py accuracy --out (its summary beside it), the
    summary itself, a directory of summaries, or a
    predictions file named TASK.jsonl / STEM-TASK.jsonl."""
    stem = path[:-len(".summary.json")] if path.endswith(".summary.json") else os.path.splitext(path)[0]
    summaries = sorted(glob.glob(os.path.join(glob.escape(path), "*.summary.json"))) if os.path.isdir(path) \
        else [stem + ".summary.json"] if os.path.isfile(stem + ".summary.json") else []
    if not summaries:
        task = next((t for t in (*TASKS, *TASK_ALIASES) if re.search(rf"(^|[-_/]){t}\.jsonl$", path)), None)
        if task and os.path.isfile(path):
            return {task_name(task): path}
        raise DataError(f"--run {path}: no eval.py accuracy output (no .summary.json, no TASK.jsonl file)")
    found = {}
    for s in summaries:
        results = read_json(s).get("results")
        if not isinstance(results, list):
            raise DataError(f"{s}: the accuracy run has not finished; rerun it with the same --out")
        for r in results:  # a path relative to where the run started, else beside the summary
            pred = r["predictions"] if os.path.isfile(r["predictions"]) else \
                os.path.join(os.path.dirname(s), os.path.basename(r["predictions"]))
            if found.setdefault(r["task"], pred) != pred:
                raise DataError(f"--run {path}: two prediction files for {r['task']}")
    return found


def checked_jsonl(path, ok, what):
    """The records of a JSONL log (a torn last line, as a run still writing leaves, left out); the
    first record that is not a dict passing ok(record) raises
    DataError naming FILE:LINE and `what` it should be."""
    rows = read_jsonl(path, torn_tail=True)
    if bad := [lineno for lineno, r in rows if not (isinstance(r, dict) and ok(r))]:
        raise DataError(f"{path}:{bad[0]}: not {what}")
    return [r for _, r in rows]


def read_correct(path):
    """{id: 0 or 1} of a predictions file."""
    ok = lambda r: isinstance(r.get("correct"), bool) and "id" in r
    rows = checked_jsonl(path, ok, "a prediction record with 'id' and 'correct'")
    return {r["id"]: int(r["correct"]) for r in rows}


def item_means(seeds, where):
    """Per item, the mean over seeds of the 0/1 scores; every seed must score the same items."""
    if any(set(s) != set(seeds[0]) for s in seeds) or not seeds[0]:
        raise DataError(f"{where}: the seeds' prediction files hold different (or no) items")
    return {i: sum(s[i] for s in seeds) / len(seeds) for i in seeds[0]}


def sem(x, ddof):
    """sqrt(Σ(x_i − x̄)² / (n − ddof)) / √n; ddof 0 on
    0/1 scores is the binomial SEM sqrt(p(1−p)/n)."""
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - ddof) / len(x)) if len(x) > ddof else None


def table1(runs, baseline):
    """runs: {name: [{task: {id: 0/1}} per seed]} -> per run and benchmark the accuracy (mean over
    seeds) with its item SEM (of the per-item means over seeds: the binomial SEM with one seed) and
    seed SEM (std of the seeds' accuracies / √S), and per group the average gain over `baseline`
    (mean over the group's benchmarks of run − baseline) with its item
    SEM (paired per item, benchmarks in quadrature) and seed SEM."""
    tasks = [t for g in GROUPS.values() for t in g if any(t in s for seeds in runs.values() for s in seeds)]
    out, scores = {}, {}
    for name, seeds in runs.items():
        means, accs = {}, {}
        out[name] = {"seeds": len(seeds), "benchmarks": {}, "gains": {}}
        for t in [t for t in tasks if all(t in s for s in seeds)]:
            means[t] = item_means([s[t] for s in seeds], f"--run {name} {t}")
            accs[t] = [sum(s[t].values()) / len(s[t]) for s in seeds]
            out[name]["benchmarks"][t] = {"n": len(means[t]), "accuracy": sum(accs[t]) / len(seeds),
                                          "sem_items": sem(list(means[t].values()), 0),
                                          "sem_seeds": sem(accs[t], 1)}
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
            per_seed = [sum(accs[t][s] - base[t] for t in members) / len(members)
                        for s in range(row["seeds"])]
            paired = [sem([x - base_means[t][i] for i, x in means[t].items()], 0) for t in members]
            row["gains"][group] = {"gain": sum(per_seed) / len(per_seed), "benchmarks": members,
                                   "sem_items": math.sqrt(sum(v * v for v in paired)) / len(members),
                                   "sem_seeds": sem(per_seed, 1)}
    return {"baseline": baseline, "tasks": tasks, "runs": out}


def table_markdown(t):
    """Table 1's layout: a row per run; each group's benchmarks, then its average gain. In %."""
    def pct(d, key, sign=""):  # d[key] ± its item SEM (± its seed SEM, from two seeds on)
        seeds = f" ± {100 * d['sem_seeds']:.2f}" if d["sem_seeds"] is not None else ""
        return f"{100 * d[key]:{sign}.2f} ± {100 * d['sem_items']:.2f}" + seeds
    shown = {group: [m for m in members if m in t["tasks"]] for group, members in GROUPS.items()}
    head, rows = ["run", "seeds"], []
    for group, members in shown.items():
        head += [NAMES[m] for m in members] + [f"{group} avg gain"] * bool(members)
    for name, r in t["runs"].items():
        cells = [name, str(r["seeds"])]
        for group, members in shown.items():
            cells += [pct(r["benchmarks"][m], "accuracy") if m in r["benchmarks"] else "—" for m in members]
            if members:
                cells.append(pct(r["gains"][group], "gain", "+") if group in r["gains"] else "—")
        rows.append(cells)
    lines = ["| " + " | ".join(c) + " |" for c in [head, ["---"] * len(head)] + rows]
    note = (f"Accuracy and gains over {t['baseline']} in %, ± SEM over items (binomial; of the per-item mean "
            "over seeds; for gains paired per item), ± SEM over seeds.")
    return "\n".join(lines) + f"\n\n{note}\n"


def run_table(a):
    runs, sources = {}, {}
    for spec in a.run:
        name, eq, paths = spec.partition("=")
        if not eq or not name or not paths or name in runs:
            raise DataError(f"--run {spec!r}: expected NAME=PATH[,PATH...] (one path per seed), "
                            "each NAME once")
        sources[name] = paths.split(",")
        runs[name] = [{t: read_correct(p) for t, p in seed_predictions(src).items()} for src in sources[name]]
    baseline = a.baseline or next(iter(runs))
    if baseline not in runs:
        raise DataError(f"--baseline {baseline}: not one of the --run names ({', '.join(runs)})")
    t = table1(runs, baseline)
    text = table_markdown(t)
    if a.out:  # writing makes the directory
        write_text(os.path.join(a.out, "table.md"), text)
        write_json(os.path.join(a.out, "table.json"), {**t, "sources": sources})
    print(text, end="")
    return t


# --- PCA shift (SPEC §6, the paper's §4.3) ---

@torch.no_grad()
def pooled_states(model, prompts, batch_size=8):
    """[L, N, C] fp32: each block's output (embeddings not
    counted) mean-pooled over a prompt's tokens."""
    device, captured, pooled = model.lm_head.weight.device, [], []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o[0])) for b in model.model.layers]
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            # ids (B, T) and real (B, T, 1), right-padded:
            # with the causal mask no real token sees a pad
            T = max(len(p) for p in batch)
            ids = torch.tensor([p + [0] * (T - len(p)) for p in batch], device=device)
            real = torch.tensor([[[1.0]] * len(p) + [[0.0]] * (T - len(p)) for p in batch], device=device)
            captured.clear()
            model(ids, return_hidden=True)
            # each block's output, averaged over the real tokens: (L, B, C)
            pooled.append(torch.stack([(h.float() * real).sum(1) / real.sum(1) for h in captured]))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(pooled, dim=1)


def pca_shift(base, distilled):
    """Per layer, the distilled centroid's move in the
    base states' PCA frame; base, distilled [L, N, C].

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
        share = s.pow(2) / s.pow(2).sum()  # of the base's variance, per axis
        rows.append(dict(layer=layer, pc1=float(proj[0]), pc2=float(proj[1]), full=float(d.norm()),
                         pc1_rel=rel(proj[0], sd[0]), pc2_rel=rel(proj[1], sd[1]),
                         full_rel=rel(d.norm(), sd.pow(2).sum().sqrt()),
                         var_pc1=float(share[0]), var_pc2=float(share[1])))
    return rows


def run_pca_shift(a):
    items = load_benchmark(task_name(a.task), a.data)[:a.limit]
    if len(items) < 3:
        raise DataError(f"--data {a.data}: {len(items)} item(s); two principal axes need at least 3")
    model, tok = load_student(a.model, None, a.dtype, a.device)
    prompts = [chat_prompt(tok, it["prompt"])[1] for it in items]
    base = pooled_states(model, prompts, a.batch_size)
    # the same weights with the adapter on top; eval: no LoRA dropout
    load_adapter(model, a.adapter).eval()
    rows = pca_shift(base, pooled_states(model, prompts, a.batch_size))
    write_json(os.path.join(a.out, "pca_shift.json"), {"settings": vars(a), "n": len(items), "layers": rows})
    for r in rows:
        print("layer {layer:>3} | shift PC1 {pc1:.4g} PC2 {pc2:.4g} full {full:.4g} | over the base spread "
              "PC1 {pc1_rel:.3f} PC2 {pc2_rel:.3f} full {full_rel:.3f}".format(**r))
    plot(os.path.join(a.out, "pca_shift.png"), "layer (block output)", {"centroid shift / base spread": {
        k: ([r["layer"] for r in rows], [r[k + "_rel"] for r in rows]) for k in ("pc1", "pc2", "full")}})
    return rows


# --- information-gain trace (SPEC §6, the paper's App. C) ---

@torch.no_grad()
def information_trace(model, tok, inst, teacher):
    """I_0..I_|R| = log p(y | x, r_≤t) along one rationale,
    exact (compact.py's probe at every prefix, Eq. 2).

    Returns (info [|R|+1], think [|R|] bool, token texts, S_MI by compact.mi_estimate);
    ΔI_t = info[t] − info[t−1].
    """
    enc = encode_instance(inst, tok, [teacher], max_len=10**9)
    batch = to_device(collate([enc]), model.lm_head.weight.device)
    n_rat, think = rationale_view(batch)
    plan = probe_plan(n_rat, think, CompactConfig(mi_budget=0))
    _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
    info = probe_information(model, aux.kv, batch, plan)  # (1, 1 + |R|)
    text = dict(inst.rationales)[teacher].strip()
    # encode_instance tokenizes the stripped text the same way
    _, offsets = tok.encode_with_offsets(text)
    # as compact.py's default scores it (mi_norm "none": the sum)
    s_mi = float(mi_estimate(info, plan)[0])
    return info[0].float().cpu(), think[0].cpu(), [text[s:e] for s, e in offsets], s_mi


def run_mi_trace(a):
    inst = next((i for i in load_multi_teacher(a.data) if i.id == a.id), None)  # ids are unique
    if inst is None:
        raise DataError(f"--id {a.id}: not in {a.data}")
    names = [t for t, _ in inst.rationales]
    teacher = a.teacher or (names[0] if names else None)
    if teacher not in names:
        raise DataError(f"--teacher {teacher}: instance {a.id} has rationales from "
                        f"{', '.join(names) or 'no teacher'}")
    model, tok = load_student(a.model, None, a.dtype, a.device)
    traces = {"before": information_trace(model, tok, inst, teacher)}
    if a.adapter:
        # the new LoRA modules start in training mode (dropout)
        load_adapter(model, a.adapter).eval()
        traces["after"] = information_trace(model, tok, inst, teacher)
    info, think, tokens, _ = traces["before"]
    os.makedirs(a.out, exist_ok=True)
    header = ["t", "token", "is_thinking", "I_t", "delta_I", "I_t_after", "delta_I_after"]
    steps = list(range(1, len(info)))
    columns = [steps, tokens, think.int().tolist()]
    for i, *_ in traces.values():  # I_t and ΔI_t of each trace
        columns += [i[1:].tolist(), (i[1:] - i[:-1]).tolist()]
    with open(os.path.join(a.out, "trace.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header[:len(columns)]] + list(zip(*columns)))
    summary = {}
    for name, (i, th, _, s_mi) in traces.items():
        gain = i[1:] - i[:-1]
        summary[name] = {"I_0": float(i[0]), "I_final": float(i[-1]), "s_mi": s_mi,
                         "mean_gain_thinking": float(gain[th].mean()) if th.any() else None,
                         "mean_gain_other": float(gain[~th].mean()) if (~th).any() else None}
    write_json(os.path.join(a.out, "trace.json"),
               {"settings": vars(a), "teacher": teacher, "tokens": len(tokens), **summary})
    for name, s in summary.items():
        print(f"{name}: " + " | ".join(f"{k} {v:.4f}" for k, v in s.items() if v is not None))
    series = {f"ΔI_t {k}": (steps, (i[1:] - i[:-1]).tolist()) for k, (i, *_) in traces.items()}
    marks = [(t, tokens[t - 1].strip()) for t in steps if think[t - 1]]
    plot(os.path.join(a.out, "trace.png"), "rationale token t (thinking tokens marked)",
         {"ΔI_t (nats)": series}, marks)
    return traces


# --- teacher weight dynamics (SPEC §6, the paper's Fig. 3) ---

def teacher_dynamics(records):
    """Per teacher: its steps and per-step weight and scores (the plot), mean weight in the first
    and last quarter of the steps, and mean s_mi, s_g, s_d; means weighted by the branch count n."""
    q = max(1, math.ceil(len(records) / 4))
    first, last = (lambda i: i < q), (lambda i: i >= len(records) - q)  # the first and last quarter
    out = {}
    for name in sorted({t for r in records for t in r["teachers"]}):
        rows = [(i, r["step"], r["teachers"][name]) for i, r in enumerate(records) if name in r["teachers"]]
        def mean(key, keep=lambda i: True):
            sel = [(v[key], v["n"]) for i, _, v in rows if keep(i)]
            n = sum(c for _, c in sel)
            return sum(x * c for x, c in sel) / n if n else float("nan")
        series = {k: [v[k] for _, _, v in rows] for k in TEACHER_STATS}
        out[name] = dict(steps=[s for _, s, _ in rows], series=series, weight_first=mean("weight", first),
                         weight_last=mean("weight", last), **{k: mean(k) for k in TEACHER_STATS[1:]})
    return out


def run_weights(a):
    path = os.path.join(a.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{a.run_dir}: no metrics.jsonl (not a train.py output directory?)")
    ok = lambda r: "step" in r and isinstance(r.get("teachers"), dict)
    records = checked_jsonl(path, ok, "a metrics record with 'step' and 'teachers'")
    if not records:
        raise DataError(f"{path}: no complete steps yet")
    dyn = teacher_dynamics(records)
    out = a.out or a.run_dir  # writing makes the directory
    write_json(os.path.join(out, "weights.json"), {"run": a.run_dir, "steps": len(records), "teachers": {
        k: {m: v for m, v in d.items() if m not in ("steps", "series")} for k, d in dyn.items()}})
    print(f"{len(records)} steps | mean weight in the first and last quarter, mean scores")
    print(f"{'teacher':<16} {'w first':>8} {'w last':>8} {'s_mi':>9} {'s_g':>7} {'s_d':>7}")
    for name, d in dyn.items():
        print(f"{name:<16} {d['weight_first']:>8.3f} {d['weight_last']:>8.3f} {d['s_mi']:>9.4f} "
              f"{d['s_g']:>7.3f} {d['s_d']:>7.3f}")
    plot(os.path.join(out, "weights.png"), "optimizer step", {f"mean {key}": {
        name: (d["steps"], d["series"][key]) for name, d in dyn.items()} for key in TEACHER_STATS})
    return dyn


# --- COMPACT's scores of a multi-teacher file, before any training ---

def score(a, cfg):
    """Write one JSON line per rationale with its scores and weight; return (per-teacher means, with
    how often each teacher got an instance's top weight, and the data stats). The scores are what
    training would weight with (eval.rationale_scores), less LoRA dropout."""
    model, tok = load_student(a.model, a.adapter, a.dtype, a.device)
    _, encoded, info = load_data(a.model, a.data, a.max_len, limit=a.limit)
    teachers, drops, rows, tops = info["teachers"], info.get("dropped_per_teacher", {}), [], []
    for e, s in zip(encoded, rationale_scores(model, encoded, cfg, a.batch_size)):
        rows += [{"id": e.id, "teacher": teachers[t], **{k: s[k][j] for k in TEACHER_STATS}}
                 for j, t in enumerate(e.teacher)]
        tops.append(teachers[e.teacher[s["weight"].index(max(s["weight"]))]])
    write_jsonl(a.out, rows)
    summary = {}
    for t in teachers:
        mine = [r for r in rows if r["teacher"] == t]
        if mine or drops.get(t):  # every rationale dropped: n 0
            means = {k: statistics.mean(r[k] for r in mine) for k in TEACHER_STATS if mine}
            summary[t] = {**means, "n": len(mine), "top": tops.count(t), "dropped": drops.get(t, 0)}
    return summary, info


def run_score(a):
    # scores only: no consistency logits
    cfg = replace(config_from_args(CompactConfig, a), mcon_lambda=0.0)
    summary, info = score(a, cfg)
    write_json(os.path.splitext(a.out)[0] + ".settings.json", {"score": vars(a), "compact": asdict(cfg),
               "data_stats": {k: v for k, v in info.items() if k != "teachers"}})
    print(f"{'teacher':<24} {'n':>6} {'weight':>7} {'s_mi':>8} {'s_g':>7} {'s_d':>7} {'top':>6} "
          f"{'dropped':>8}")
    nan = float("nan")
    for t, r in summary.items():  # dropped: rationales longer than --max-len, left out
        print(f"{t:<24} {r['n']:>6} {r.get('weight', nan):>7.3f} {r.get('s_mi', nan):>8.4f} "
              f"{r.get('s_g', nan):>7.3f} {r.get('s_d', nan):>7.3f} {r['top']:>6} {r['dropped']:>8}")
    return summary


# --- what each score catches: within-instance AUROC
# against flaw labels, every reading of SPEC's Decisions

# reading: CompactConfig fields; the paper leaves each of these open (SPEC's Decisions),
READINGS = {
    "default": {}, "S_MI divided by its length (SPEC's Eq. 3)": dict(mi_norm="length"),
    "S_G at the last rationale token": dict(sg_feature="last"),
    "S_G at the rationale mean": dict(sg_feature="mean"), "S_G with self-loops": dict(sg_self_loops=True),
    "S_G one attention over all heads": dict(sg_heads="joint"), "temperature 0.5": dict(temperature=0.5),
    # then two beyond the paper:
    "temperature 2": dict(temperature=2.0), "z-floor 0": dict(z_floor=0.0),
    "S_G cosine of eot states (beyond the paper)": dict(sg_similarity="cosine"),
    "S_G cosine of rationale means (beyond the paper)": dict(sg_similarity="cosine", sg_feature="mean")}
HIGHER_IS_CLEAN = {"s_mi": True, "s_g": True, "s_d": False, "weight": True}  # S_D: lower is better


@torch.no_grad()
def rationale_scores(model, encoded, cfg, batch_size=4):
    """Per instance {s_mi, s_g, s_d, weight: [per branch]}: compact_loss's scores under cfg with no
    training (the student's mode, eval: no LoRA dropout; no
    consistency logits; S_MI's sample fixed per batch)."""
    out, device, cfg = [], model.lm_head.weight.device, replace(cfg, mcon_lambda=0.0)
    for i in range(0, len(encoded), batch_size):
        part = encoded[i:i + batch_size]
        _, st = compact_loss(model, to_device(collate(part), device), cfg, rng_key=(i,))
        out += [{k: st[k][b, :len(e.teacher)].tolist() for k in HIGHER_IS_CLEAN} for b, e in enumerate(part)]
    return out


def within_auroc(groups, higher=True):
    """Over every (clean, flawed) pair of rationales of one question, how often the clean one scores
    better (ties count ½); groups: [(score, flawed)] per question. None without a pair."""
    pairs = [(c, f) for g in groups for c, cf in g if not cf for f, ff in g if ff]
    return sum(0.5 if c == f else float((c > f) == higher) for c, f in pairs) / len(pairs) if pairs else None


def auroc_se(groups, higher=True):
    """within_auroc's standard error over questions: the
    jackknife, leaving one question out at a time."""
    groups = [g for g in groups if any(f for _, f in g) and not all(f for _, f in g)]
    loo = [within_auroc(groups[:i] + groups[i + 1:], higher) for i in range(len(groups))]
    return math.sqrt((len(loo) - 1) * torch.tensor(loo).var(correction=0).item()) if len(loo) > 1 else None


def reading_aurocs(model, tok, instances, batch_size=4, readings=READINGS):
    """{reading: {score: AUROC, "score/flaw": AUROC}} of labelled instances (Instance.flaws) under
    the student, and "se": {score: auroc_se}. S_MI is exact Eq. 3, so readings are compared without
    the estimator's noise; one probe pass serves every reading (S_G's readings rescore with alpha 0;
    mi_norm "none" is |R| times "length")."""
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
        # [(score k, flawed)] per question, of the clean and `flaw` (None: every flaw)
        def pairs(k, flaw):
            return [[(x, f is not None) for x, f in zip(r[k], fs) if not flaw or f in (None, flaw)]
                    for r, fs in zip(rows, labels)]
        table[name] = {k if flaw is None else f"{k}/{flaw}": within_auroc(pairs(k, flaw), up)
                       for flaw in [None] + flaws for k, up in HIGHER_IS_CLEAN.items()}
        table[name]["se"] = {k: auroc_se(pairs(k, None), up) for k, up in HIGHER_IS_CLEAN.items()}
    return table


def gsm8k_flaw_set(path, n, seed=0):
    """GSM8K test questions as labelled multi-teacher instances: the human solution (clean), a copy
    with one intermediate result changed and carried through the later steps, the final answer kept
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
    """The AUROC table of every reading on each --set NAME=MODEL:DATA (DATA: a labelled
    multi-teacher file, or a GSM8K benchmark file, made into
    gsm8k_flaw_set's --limit questions, 100 by default)."""
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


# --- plots and the command line ---

def plot(path, xlabel, panels, marks=()):
    """Stacked line plots, {y label: {line label: (x, y)}};
    marks: (x, text) as labelled vertical lines."""
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
    p = argparse.ArgumentParser(prog="analysis.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="Table 1: accuracy per benchmark, average gains over a baseline, SEMs")
    t.add_argument("--run", action="append", required=True, metavar="NAME=PATH[,PATH...]",
                   help="a run's eval.py accuracy outputs, one PATH per seed (its --out, summary or "
                        "directory); repeat")
    t.add_argument("--baseline", help="the run gains are measured against (default: the first --run)")
    t.add_argument("--out", help="directory for table.md and table.json")
    pca = sub.add_parser("pca-shift", help="per-layer centroid shift of the distilled student in the base's "
                                           "PCA frame")
    student_flags(pca, adapter_required=True)
    pca.add_argument("--task", required=True)
    pca.add_argument("--data", required=True)
    pca.add_argument("--out", required=True, help="directory for pca_shift.json and pca_shift.png")
    mi = sub.add_parser("mi-trace", help="per-token information gain along one rationale")
    student_flags(mi)
    mi.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC §8)")
    mi.add_argument("--id", required=True, help="the instance's id")
    mi.add_argument("--teacher", help="whose rationale (default: the instance's first)")
    mi.add_argument("--out", required=True, help="directory for trace.csv, trace.json and trace.png")
    w = sub.add_parser("weights", help="teacher weight dynamics of a train.py run (metrics.jsonl)")
    w.add_argument("run_dir")
    w.add_argument("--out", help="directory for weights.png and weights.json (default: RUN_DIR)")
    s = sub.add_parser("score", help="COMPACT's scores and weights of each rationale of a multi-teacher file")
    student_flags(s, batch_size=4)
    s.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC.md §8)")
    s.add_argument("--out", required=True, help="scores JSONL, one line per rationale")
    s.add_argument("--max-len", type=int, default=2048, help="longer branches are left out")
    add_config_args(s, CompactConfig)
    rd = sub.add_parser("readings", help="what each score catches: AUROCs against flaw labels, every reading")
    rd.add_argument("--set", action="append", required=True, metavar="NAME=MODEL_DIR:DATA",
                    help="a student and a labelled multi-teacher file (or a GSM8K benchmark file); repeat")
    student_flags(rd, batch_size=4, model=False)
    rd.add_argument("--out", required=True, help="directory for readings.md and readings.json")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    with user_errors(f"analysis.py {a.command}"):
        if a.command in ("pca-shift", "mi-trace", "score", "readings"):
            check_student_flags(a, ("batch_size", "limit", "max_len"))
        return {"table": run_table, "pca-shift": run_pca_shift, "mi-trace": run_mi_trace,
                "weights": run_weights, "score": run_score, "readings": run_readings}[a.command](a)


if __name__ == "__main__":
    main()
