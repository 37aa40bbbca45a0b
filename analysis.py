"""Read what distillation did from finished outputs (SPEC.md §6): Table 1, the PCA shift, the
information-gain trace, teacher weight dynamics, the scores COMPACT gives a multi-teacher file
before any training, and what each score catches (the readings).

    python analysis.py table --run base=runs/base/preds.jsonl
        --run compact=runs/c-s0/eval,runs/c-s1/eval [--out table/]
    python analysis.py pca-shift --model DIR --adapter DIR --task csqa --data dev.jsonl --out pca/
    python analysis.py mi-trace --model DIR [--adapter DIR] --data multi.jsonl --id ID
        [--teacher T] --out trace/
    python analysis.py weights RUN_DIR
    python analysis.py score --model DIR --data multi.jsonl --out scores.jsonl [COMPACT flags]
    python analysis.py readings --set demo=runs/demo/base:runs/demo/data/train.jsonl
        --set gsm8k=DIR:gsm8k_test.jsonl --out readings/

readings: each score's within-instance AUROC against flaw labels, for every reading of SPEC's
Decisions. Plots need matplotlib; without it the numbers are still written.
Left out: sampling metrics (pass@k, majority vote), significance tests.
"""
import argparse
import csv
import glob
import math
import os
import random
import re
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


def seed_scores(path):
    """{task: {id: 0 or 1}} of one seed, from an eval.py accuracy --out (its summary beside it),
    the summary itself, a directory of summaries, or a predictions file named TASK.jsonl or
    STEM-TASK.jsonl."""
    stem = os.path.splitext(path)[0]
    if path.endswith(".summary.json"):
        stem = path[:-len(".summary.json")]
    summaries = [stem + ".summary.json"] if os.path.isfile(stem + ".summary.json") else []
    if os.path.isdir(path):
        summaries = sorted(glob.glob(os.path.join(glob.escape(path), "*.summary.json")))
    if not summaries:
        tasks = [t for t in (*TASKS, *TASK_ALIASES) if re.search(rf"(^|[-_/]){t}\.jsonl$", path)]
        if not tasks or not os.path.isfile(path):
            raise DataError(f"--run {path}: no eval.py accuracy output (no .summary.json, "
                            "no TASK.jsonl file)")
        return {task_name(tasks[0]): read_correct(path)}
    found = {}
    for s in summaries:
        results = read_json(s).get("results")
        if not isinstance(results, list):
            raise DataError(f"{s}: the accuracy run has not finished; rerun it with the same --out")
        for r in results:  # a path relative to where the run started, else beside the summary
            pred = r["predictions"]
            if not os.path.isfile(pred):
                pred = os.path.join(os.path.dirname(s), os.path.basename(pred))
            if found.setdefault(r["task"], pred) != pred:
                raise DataError(f"--run {path}: two prediction files for {r['task']}")
    return {task: read_correct(p) for task, p in found.items()}


def checked_jsonl(path, types, what):
    """The records of a JSONL log (a torn last line, as a run still writing leaves, left out);
    the first that is not a dict with `types`' keys, of their types ({key: type}), raises
    DataError naming FILE:LINE and `what` it should be."""
    rows = read_jsonl(path, torn_tail=True)
    for lineno, r in rows:
        keys = isinstance(r, dict) and all(k in r for k in types)
        if not keys or not all(isinstance(r[k], t) for k, t in types.items()):
            raise DataError(f"{path}:{lineno}: not {what}")
    return [r for _, r in rows]


def read_correct(path):
    """{id: 0 or 1} of a predictions file."""
    what = "a prediction record with 'id' and 'correct'"
    rows = checked_jsonl(path, {"id": object, "correct": bool}, what)
    return {r["id"]: int(r["correct"]) for r in rows}


def sem(x, ddof):
    """sqrt(Σ(x_i − x̄)² / (n − ddof)) / √n; ddof 0 on 0/1 scores is the binomial SEM
    sqrt(p(1−p)/n). None for n <= ddof."""
    if len(x) <= ddof:
        return None
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - ddof) / len(x))


def benchmark(seeds, where):
    """(per-item means over seeds, accuracy per seed, Table 1's cell) of a run's benchmark: the
    accuracy (mean over seeds), its item SEM (of the per-item means: the binomial SEM with one
    seed) and its seed SEM (std of the seeds' accuracies / √S). Every seed scores the same items."""
    if any(set(s) != set(seeds[0]) for s in seeds) or not seeds[0]:
        raise DataError(f"{where}: the seeds' prediction files hold different (or no) items")
    means = {i: sum(s[i] for s in seeds) / len(seeds) for i in seeds[0]}  # per item, over seeds
    accs = [sum(s.values()) / len(s) for s in seeds]
    cell = {"n": len(means), "accuracy": sum(accs) / len(seeds),
            "sem_items": sem(list(means.values()), 0), "sem_seeds": sem(accs, 1)}
    return means, accs, cell


def group_gain(run, base, members, where):
    """A run's average gain over the baseline on a group's benchmarks (run, base: {task: (means,
    accs)}): the mean of run − baseline, its item SEM (paired per item, benchmarks in quadrature)
    and its seed SEM."""
    for t in members:
        if set(run[t][0]) != set(base[t][0]):
            raise DataError(f"{where}: {t} predictions of different items")
    base_acc = {t: sum(base[t][1]) / len(base[t][1]) for t in members}
    per_seed = []
    for s in range(len(run[members[0]][1])):
        per_seed.append(sum(run[t][1][s] - base_acc[t] for t in members) / len(members))
    paired = [sem([x - base[t][0][i] for i, x in run[t][0].items()], 0) for t in members]
    return {"gain": sum(per_seed) / len(per_seed), "benchmarks": members,
            "sem_items": math.sqrt(sum(v * v for v in paired)) / len(members),
            "sem_seeds": sem(per_seed, 1)}


def table1(runs, baseline):
    """runs: {name: [{task: {id: 0/1}} per seed]} -> per run its benchmarks' cells and, for
    every group all of whose benchmarks it and `baseline` share, its average gain."""
    seen = {t for seeds in runs.values() for s in seeds for t in s}
    tasks = [t for members in GROUPS.values() for t in members if t in seen]
    scores = {}  # {run: {task: (per-item means, per-seed accuracies)}}
    out = {}
    for name, seeds in runs.items():
        scores[name] = {}
        out[name] = {"seeds": len(seeds), "benchmarks": {}, "gains": {}}
        for t in [t for t in tasks if all(t in s for s in seeds)]:
            means, accs, cell = benchmark([s[t] for s in seeds], f"--run {name} {t}")
            scores[name][t] = (means, accs)
            out[name]["benchmarks"][t] = cell
    for name, row in out.items():
        for group, members in GROUPS.items():
            members = [t for t in members if t in tasks]
            shared = all(t in scores[name] and t in scores[baseline] for t in members)
            if name != baseline and members and shared:
                where = f"--run {name} and --run {baseline}"
                row["gains"][group] = group_gain(scores[name], scores[baseline], members, where)
    return {"baseline": baseline, "tasks": tasks, "runs": out}


def percent(d, key, sign=""):
    """d[key] ± its item SEM (± its seed SEM, from two seeds on), in %; — without d."""
    if d is None:
        return "—"
    seeds = f" ± {100 * d['sem_seeds']:.2f}" if d["sem_seeds"] is not None else ""
    return f"{100 * d[key]:{sign}.2f} ± {100 * d['sem_items']:.2f}{seeds}"


def markdown(head, rows):
    """The lines of a Markdown table."""
    return ["| " + " | ".join(cells) + " |" for cells in [head, ["---"] * len(head), *rows]]


def table_markdown(t):
    """Table 1's layout: a row per run; each group's benchmarks, then its average gain. In %."""
    shown = {g: [m for m in members if m in t["tasks"]] for g, members in GROUPS.items()}
    shown = {g: members for g, members in shown.items() if members}
    head = ["run", "seeds"]
    for group, members in shown.items():
        head += [NAMES[m] for m in members] + [f"{group} avg gain"]
    rows = []
    for name, r in t["runs"].items():
        cells = [name, str(r["seeds"])]
        for group, members in shown.items():
            cells += [percent(r["benchmarks"].get(m), "accuracy") for m in members]
            cells.append(percent(r["gains"].get(group), "gain", "+"))
        rows.append(cells)
    note = (f"Accuracy and gains over {t['baseline']} in %, ± SEM over items (binomial; of the "
            "per-item mean over seeds; for gains paired per item), ± SEM over seeds.")
    return "\n".join(markdown(head, rows)) + f"\n\n{note}\n"


def report(out, name, text, obj):
    """Print the text; with an OUT, write OUT/NAME.md and OUT/NAME.json (making the directory)."""
    if out:
        write_text(os.path.join(out, name + ".md"), text)
        write_json(os.path.join(out, name + ".json"), obj)
    print(text, end="")


def run_table(a):
    runs = {}
    sources = {}
    for spec in a.run:
        name, eq, paths = spec.partition("=")
        if not eq or not name or not paths or name in runs:
            raise DataError(f"--run {spec!r}: expected NAME=PATH[,PATH...] (one path per seed), "
                            "each NAME once")
        sources[name] = paths.split(",")
        runs[name] = [seed_scores(src) for src in sources[name]]
    baseline = a.baseline or next(iter(runs))
    if baseline not in runs:
        raise DataError(f"--baseline {baseline}: not one of the --run names ({', '.join(runs)})")
    t = table1(runs, baseline)
    report(a.out, "table", table_markdown(t), {**t, "sources": sources})
    return t


# --- the student before and after its adapter ---

def before_and_after(a, measure):
    """{"before": measure(model, tok) of --model, "after": the same with --adapter on top} (no
    "after" without an adapter): the same weights, the adapter loaded in eval mode (no dropout)."""
    model, tok = load_student(a.model, None, a.dtype, a.device)
    out = {"before": measure(model, tok)}
    if a.adapter:
        load_adapter(model, a.adapter).eval()
        out["after"] = measure(model, tok)
    return out


# --- PCA shift (SPEC §6, the paper's §4.3) ---

@torch.no_grad()
def pooled_states(model, prompts, batch_size=8):
    """[L, N, C] fp32: each block's output (embeddings not counted) mean-pooled over a prompt's
    tokens."""
    device = model.lm_head.weight.device
    captured = []
    pooled = []
    hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o[0]))
             for b in model.model.layers]
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            T = max(len(p) for p in batch)
            # right-padded: with the causal mask no real token sees a pad
            ids = torch.tensor([p + [0] * (T - len(p)) for p in batch], device=device)  # (B, T)
            mask = [[1.0] * len(p) + [0.0] * (T - len(p)) for p in batch]
            real = torch.tensor(mask, device=device)[..., None]  # (B, T, 1)
            captured.clear()
            model(ids, return_hidden=True)
            means = [(h.float() * real).sum(1) / real.sum(1) for h in captured]
            pooled.append(torch.stack(means))  # (L, B, C)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(pooled, dim=1)


def ratio(v, scale):
    return float(v / scale) if scale > 0 else float("nan")


def pca_shift(base, distilled):
    """Per layer, the distilled centroid's move in the base states' PCA frame; base, distilled
    [L, N, C]. d = mean(distilled) − mean(base); pc1, pc2 = |d · v_k| for the base's top principal
    axes v_k (SVD of the centred base states); full = ‖d‖₂. The *_rel values divide by the base's
    spread: its standard deviation along v_k, and its RMS distance to the centroid for full."""
    rows = []
    for layer, (x, y) in enumerate(zip(base.double(), distilled.double()), 1):
        mu = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)
        sd = s / math.sqrt(x.shape[0])  # the spread along each axis
        d = y.mean(0) - mu
        proj = (vh[:2] @ d).abs()
        share = s.pow(2) / s.pow(2).sum()  # of the base's variance, per axis
        rows.append({"layer": layer, "pc1": float(proj[0]), "pc2": float(proj[1]),
                     "full": float(d.norm()), "pc1_rel": ratio(proj[0], sd[0]),
                     "pc2_rel": ratio(proj[1], sd[1]),
                     "full_rel": ratio(d.norm(), sd.pow(2).sum().sqrt()),
                     "var_pc1": float(share[0]), "var_pc2": float(share[1])})
    return rows


def run_pca_shift(a):
    items = load_benchmark(task_name(a.task), a.data)[:a.limit]
    if len(items) < 3:
        raise DataError(f"--data {a.data}: {len(items)} item(s); "
                        "two principal axes need at least 3")

    def states(model, tok):
        prompts = [chat_prompt(tok, it["prompt"])[1] for it in items]
        return pooled_states(model, prompts, a.batch_size)

    pooled = before_and_after(a, states)
    rows = pca_shift(pooled["before"], pooled["after"])
    result = {"settings": vars(a), "n": len(items), "layers": rows}
    write_json(os.path.join(a.out, "pca_shift.json"), result)
    for r in rows:
        print("layer {layer:>3} | shift PC1 {pc1:.4g} PC2 {pc2:.4g} full {full:.4g} | over the "
              "base spread PC1 {pc1_rel:.3f} PC2 {pc2_rel:.3f} full {full_rel:.3f}".format(**r))
    layers = [r["layer"] for r in rows]
    lines = {k: (layers, [r[k + "_rel"] for r in rows]) for k in ("pc1", "pc2", "full")}
    panels = {"centroid shift / base spread": lines}
    plot(os.path.join(a.out, "pca_shift.png"), "layer (block output)", panels)
    return rows


# --- information-gain trace (SPEC §6, the paper's App. C) ---

@torch.no_grad()
def information_trace(model, tok, inst, teacher):
    """I_0..I_|R| = log p(y | x, r_≤t) along one rationale, exact (compact.py's probe at every
    prefix, Eq. 2). Returns (info [|R|+1], think [|R|] bool, token texts, S_MI by
    compact.mi_estimate); ΔI_t = info[t] − info[t−1]."""
    enc = encode_instance(inst, tok, [teacher], max_len=10**9)
    batch = to_device(collate([enc]), model.lm_head.weight.device)
    n_rat, think = rationale_view(batch)
    plan = probe_plan(n_rat, think, CompactConfig(mi_budget=0))
    _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
    info = probe_information(model, aux.kv, batch, plan)  # (1, 1 + |R|)
    text = dict(inst.rationales)[teacher].strip()
    _, offsets = tok.encode_with_offsets(text)  # encode_instance tokenizes the stripped text so
    s_mi = float(mi_estimate(info, plan)[0])  # as compact.py's default scores it
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
    traces = before_and_after(a, lambda model, tok: information_trace(model, tok, inst, teacher))
    info, think, tokens, _ = traces["before"]
    steps = list(range(1, len(info)))
    header = ["t", "token", "is_thinking"]
    columns = [steps, tokens, think.int().tolist()]
    series = {}
    summary = {}
    for name, (i, th, _, s_mi) in traces.items():
        gain = i[1:] - i[:-1]  # ΔI_t
        suffix = "_after" if name == "after" else ""
        header += ["I_t" + suffix, "delta_I" + suffix]
        columns += [i[1:].tolist(), gain.tolist()]
        series[f"ΔI_t {name}"] = (steps, gain.tolist())
        summary[name] = {"I_0": float(i[0]), "I_final": float(i[-1]), "s_mi": s_mi,
                         "mean_gain_thinking": float(gain[th].mean()) if th.any() else None,
                         "mean_gain_other": float(gain[~th].mean()) if (~th).any() else None}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "trace.csv"), "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *zip(*columns)])
    result = {"settings": vars(a), "teacher": teacher, "tokens": len(tokens), **summary}
    write_json(os.path.join(a.out, "trace.json"), result)
    for name, s in summary.items():
        print(f"{name}: " + " | ".join(f"{k} {v:.4f}" for k, v in s.items() if v is not None))
    marks = [(t, tokens[t - 1].strip()) for t in steps if think[t - 1]]
    plot(os.path.join(a.out, "trace.png"), "rationale token t (thinking tokens marked)",
         {"ΔI_t (nats)": series}, marks)
    return traces


# --- teacher weight dynamics (SPEC §6, the paper's Fig. 3) ---

def weighted_mean(rows, key, steps):
    """The mean of v[key] over the rows (i, step, v) with i in `steps`, weighted by v["n"]."""
    sel = [(v[key], v["n"]) for i, _, v in rows if i in steps]
    n = sum(c for _, c in sel)
    return sum(x * c for x, c in sel) / n if n else float("nan")


def teacher_dynamics(records):
    """Per teacher: its steps and per-step weight and scores (the plot), mean weight in the first
    and last quarter of the steps, and mean s_mi, s_g, s_d; means weighted by the branch count n."""
    q = max(1, math.ceil(len(records) / 4))
    out = {}
    for name in sorted({t for r in records for t in r["teachers"]}):
        rows = [(i, r["step"], r["teachers"][name]) for i, r in enumerate(records)
                if name in r["teachers"]]
        out[name] = {"steps": [s for _, s, _ in rows],
                     "series": {k: [v[k] for _, _, v in rows] for k in TEACHER_STATS},
                     "weight_first": weighted_mean(rows, "weight", range(q)),
                     "weight_last": weighted_mean(rows, "weight", range(len(records) - q, 10**9))}
        for k in TEACHER_STATS[1:]:
            out[name][k] = weighted_mean(rows, k, range(len(records)))
    return out


def run_weights(a):
    path = os.path.join(a.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise DataError(f"{a.run_dir}: no metrics.jsonl (not a train.py output directory?)")
    what = "a metrics record with 'step' and 'teachers'"
    records = checked_jsonl(path, {"step": object, "teachers": dict}, what)
    if not records:
        raise DataError(f"{path}: no complete steps yet")
    dyn = teacher_dynamics(records)
    out = a.out or a.run_dir  # writing makes the directory
    means = {}
    for name, d in dyn.items():
        means[name] = {k: v for k, v in d.items() if k not in ("steps", "series")}
    result = {"run": a.run_dir, "steps": len(records), "teachers": means}
    write_json(os.path.join(out, "weights.json"), result)
    print(f"{len(records)} steps | mean weight in the first and last quarter, mean scores")
    print(f"{'teacher':<16} {'w first':>8} {'w last':>8} {'s_mi':>9} {'s_g':>7} {'s_d':>7}")
    for name, d in dyn.items():
        print(f"{name:<16} {d['weight_first']:>8.3f} {d['weight_last']:>8.3f} "
              f"{d['s_mi']:>9.4f} {d['s_g']:>7.3f} {d['s_d']:>7.3f}")
    panels = {}
    for k in TEACHER_STATS:
        panels[f"mean {k}"] = {name: (d["steps"], d["series"][k]) for name, d in dyn.items()}
    plot(os.path.join(out, "weights.png"), "optimizer step", panels)
    return dyn


# --- COMPACT's scores of a multi-teacher file, before any training ---

HIGHER_IS_CLEAN = {"s_mi": True, "s_g": True, "s_d": False, "weight": True}  # S_D: lower is better


@torch.no_grad()
def rationale_scores(model, encoded, cfg, batch_size=4):
    """Per instance {s_mi, s_g, s_d, weight: [per branch]}: compact_loss's scores under cfg with
    no training (the student's mode, eval: no LoRA dropout; no consistency logits; S_MI's sample
    fixed per batch)."""
    device = model.lm_head.weight.device
    cfg = replace(cfg, mcon_lambda=0.0)
    out = []
    for i in range(0, len(encoded), batch_size):
        part = encoded[i:i + batch_size]
        _, st = compact_loss(model, to_device(collate(part), device), cfg, rng_key=(i,))
        for b, e in enumerate(part):
            out.append({k: st[k][b, :len(e.teacher)].tolist() for k in HIGHER_IS_CLEAN})
    return out


def run_score(a):
    """Write one JSON line per rationale with its scores and weight (rationale_scores: what
    training would weight with, less LoRA dropout); print per teacher the means and how often it
    got an instance's top weight."""
    cfg = replace(config_from_args(CompactConfig, a), mcon_lambda=0.0)  # no consistency logits
    model, _ = load_student(a.model, a.adapter, a.dtype, a.device)
    _, encoded, info = load_data(a.model, a.data, a.max_len, limit=a.limit)
    teachers = info["teachers"]
    rows = []
    tops = []
    for e, s in zip(encoded, rationale_scores(model, encoded, cfg, a.batch_size)):
        for j, t in enumerate(e.teacher):
            rows.append({"id": e.id, "teacher": teachers[t], **{k: s[k][j] for k in TEACHER_STATS}})
        tops.append(teachers[e.teacher[s["weight"].index(max(s["weight"]))]])
    write_jsonl(a.out, rows)
    stats = {k: v for k, v in info.items() if k != "teachers"}
    settings = {"score": vars(a), "compact": asdict(cfg), "data_stats": stats}
    write_json(os.path.splitext(a.out)[0] + ".settings.json", settings)
    print(f"{'teacher':<24} {'n':>6} {'weight':>7} {'s_mi':>8} {'s_g':>7} {'s_d':>7} {'top':>6} "
          f"{'dropped':>8}")
    drops = info.get("dropped_per_teacher", {})
    nan = float("nan")
    summary = {}
    for t in teachers:
        mine = [r for r in rows if r["teacher"] == t]
        if not mine and not drops.get(t):
            continue
        m = {k: sum(r[k] for r in mine) / len(mine) if mine else nan for k in TEACHER_STATS}
        summary[t] = {**m, "n": len(mine), "top": tops.count(t), "dropped": drops.get(t, 0)}
        print(f"{t:<24} {len(mine):>6} {m['weight']:>7.3f} {m['s_mi']:>8.4f} {m['s_g']:>7.3f} "
              f"{m['s_d']:>7.3f} {tops.count(t):>6} {drops.get(t, 0):>8}")
    return summary


# --- what each score catches: within-instance AUROC against flaw labels, for every reading ---

READINGS = {  # reading: its CompactConfig fields; the paper leaves each open (SPEC's Decisions)
    "default": {},
    "S_MI divided by its length (SPEC's Eq. 3)": {"mi_norm": "length"},
    "S_G at the last rationale token": {"sg_feature": "last"},
    "S_G at the rationale mean": {"sg_feature": "mean"},
    "S_G with self-loops": {"sg_self_loops": True},
    "S_G one attention over all heads": {"sg_heads": "joint"},
    "temperature 0.5": {"temperature": 0.5},
    "temperature 2": {"temperature": 2.0},
    "z-floor 0": {"z_floor": 0.0},
    "S_G cosine of eot states (beyond the paper)": {"sg_similarity": "cosine"},
    "S_G cosine of rationale means (beyond the paper)": {"sg_similarity": "cosine",
                                                         "sg_feature": "mean"},
}


def within_auroc(groups, higher=True):
    """Over every (clean, flawed) pair of rationales of one question, how often the clean one
    scores better (ties count ½); groups: [(score, flawed)] per question. None without a pair."""
    wins = []
    for g in groups:
        clean = [x for x, flawed in g if not flawed]
        bad = [x for x, flawed in g if flawed]
        wins += [0.5 if c == f else float((c > f) == higher) for c in clean for f in bad]
    return sum(wins) / len(wins) if wins else None


def auroc_se(groups, higher=True):
    """within_auroc's standard error over questions: the jackknife, leaving one question out."""
    groups = [g for g in groups if any(f for _, f in g) and not all(f for _, f in g)]
    if len(groups) < 2:
        return None
    loo = [within_auroc(groups[:i] + groups[i + 1:], higher) for i in range(len(groups))]
    return math.sqrt((len(loo) - 1) * torch.tensor(loo).var(correction=0).item())


def reading_scores(s, g, lengths, cfg):
    """One instance's scores and weights under cfg, from S_MI (exact, by length) and S_D of s, S_G
    of g: mi_norm "none" is |R| times "length", and the weights are fused again."""
    s_mi = s["s_mi"]
    if cfg.mi_norm == "none":
        s_mi = [x * n for x, n in zip(s_mi, lengths)]
    scores = [torch.tensor([x]) for x in (s_mi, g["s_g"], s["s_d"])]
    w = fuse_weights(*scores, torch.ones(1, len(lengths), dtype=bool), cfg)
    return {"s_mi": s_mi, "s_g": g["s_g"], "s_d": s["s_d"], "weight": w[0].tolist()}


def flaw_groups(rows, labels, k, flaw):
    """[(score k, flawed)] per question, of the clean rationales and those of `flaw` (None:
    every flaw)."""
    groups = []
    for r, fs in zip(rows, labels):
        kept = [(x, f) for x, f in zip(r[k], fs) if not flaw or f in (None, flaw)]
        groups.append([(x, f is not None) for x, f in kept])
    return groups


def reading_aurocs(model, tok, instances, batch_size=4, readings=READINGS):
    """{reading: {score: AUROC, "score/flaw": AUROC, "se": {score: auroc_se}}} of labelled
    instances (Instance.flaws) under the student. S_MI is exact Eq. 3, so readings are compared
    without the estimator's noise; one probe pass serves every reading (S_G's readings rescore
    with alpha 0, which skips the probe)."""
    encoded, info = encode_dataset(instances, tok, max_len=10**6)
    by_id = {i.id: i.flaws for i in instances}
    labels = [[by_id[e.id].get(info["teachers"][t]) for t in e.teacher] for e in encoded]
    lengths = [[codes.count(RATIONALE) for _, codes, _ in e.branches] for e in encoded]
    flaws = sorted({f for ls in labels for f in ls if f})
    exact = CompactConfig(mi_budget=0)
    base = rationale_scores(model, encoded, replace(exact, mi_norm="length"), batch_size)
    table = {}
    for name, kw in readings.items():
        cfg = replace(exact, **kw)
        s_g = base
        if any(k.startswith("sg_") for k in kw):
            s_g = rationale_scores(model, encoded, replace(cfg, alpha=0.0), batch_size)
        rows = [reading_scores(s, g, n, cfg) for s, g, n in zip(base, s_g, lengths)]
        table[name] = {}
        for flaw in [None, *flaws]:
            for k, up in HIGHER_IS_CLEAN.items():
                key = k if flaw is None else f"{k}/{flaw}"
                table[name][key] = within_auroc(flaw_groups(rows, labels, k, flaw), up)
        table[name]["se"] = {}
        for k, up in HIGHER_IS_CLEAN.items():
            table[name]["se"][k] = auroc_se(flaw_groups(rows, labels, k, None), up)
    return table


def strip_calc(text):
    """A GSM8K solution without its <<calculator>> annotations."""
    return re.sub(r"<<[^>]*>>", "", text).strip()


def gsm8k_flaw_set(path, n, seed=0):
    """GSM8K test questions as labelled multi-teacher instances: the human solution (clean), a copy
    with one intermediate result changed and carried through the later steps, the final answer
    kept ("hallucination"), and a terse answer-only copy ("filler"). Questions of one computation
    have no intermediate: skipped."""
    rng = random.Random(seed)
    out = []
    for _, row in read_jsonl(path):
        if len(out) == n:
            break
        calc = list(re.finditer(r"<<[^=>]*=([^>]*)>>([\d,.]*\d)", row["answer"]))
        if len(calc) < 2:
            continue
        body = row["answer"].split("####")[0]
        answer = row["answer"].split("####")[-1].strip().replace(",", "")
        j = rng.randrange(len(calc) - 1)  # not the last: that one states the final answer
        shown = calc[j].group(2)
        value = float(shown.replace(",", ""))
        wrong = value + rng.choice((-2, -1, 1, 2)) * max(1, round(abs(value) * 0.1))
        spec = ",.0f" if "," in shown else ".0f" if wrong.is_integer() else "g"  # as it was written
        text = format(wrong, spec)
        start = calc[j].start(2)
        end = calc[-1].start(2)  # from the changed result up to the final answer
        same = rf"(?<![\d.,]){re.escape(shown)}(?![\d]|,\d)"
        carried = body[:start] + re.sub(same, text, body[start:end]) + body[end:]
        rationales = [("human", strip_calc(body)), ("carried", strip_calc(carried)),
                      ("terse", f"So the answer is {answer}.")]
        flaws = {"carried": "hallucination", "terse": "filler"}
        qid = f"gsm8k-{len(out)}"
        out.append(Instance(qid, row["question"], answer, "gsm8k", rationales, flaws))
    return out


def auroc_cell(v, se=None):
    if v is None:
        return "—"
    return f"{v:.3f}" + ("" if se is None else f" ± {se:.3f}")


def run_readings(a):
    """The AUROC table of every reading on each --set NAME=MODEL:DATA (DATA: a labelled
    multi-teacher file, or a GSM8K benchmark file, made into gsm8k_flaw_set's --limit questions,
    100 by default)."""
    sets = {}
    for spec in a.set:
        name, eq, rest = spec.partition("=")
        model_dir, colon, path = rest.rpartition(":")
        if not (eq and colon and name and model_dir and path):
            raise DataError(f"--set {spec!r}: expected NAME=MODEL_DIR:DATA")
        model, tok = load_student(model_dir, None, a.dtype, a.device)
        records = read_jsonl(path)
        if not records:
            raise DataError(f"--set {spec}: {path} holds no lines")
        if "rationales" in records[0][1]:  # a labelled multi-teacher file
            instances = load_multi_teacher(path)
        else:
            instances = gsm8k_flaw_set(path, a.limit or 100)
        sets[name] = reading_aurocs(model, tok, instances[:a.limit], a.batch_size)
    cols = [(s, k) for s in sets for k in HIGHER_IS_CLEAN]
    rows = []
    for r in READINGS:
        rows.append([r] + [auroc_cell(sets[s][r][k], sets[s][r]["se"][k]) for s, k in cols])
    per_flaw = []
    for s, t in sets.items():
        for flaw in sorted({f.split("/")[1] for f in t["default"] if "/" in f}):
            cells = [auroc_cell(t["default"][f"{k}/{flaw}"]) for k in HIGHER_IS_CLEAN]
            per_flaw.append([f"{s}: {flaw}", *cells])
    lines = markdown(["reading"] + [f"{s}: {k}" for s, k in cols], rows)
    lines += [""] + markdown(["default, per flaw", *HIGHER_IS_CLEAN], per_flaw)
    note = ("Within-instance AUROC against the flaw labels (clean above flawed = 1; S_D: lower), "
            "± its jackknife standard error over questions.")
    text = "\n".join(lines) + f"\n\n{note}\n"
    report(a.out, "readings", text, {"settings": vars(a), "sets": sets})
    return sets


# --- plots and the command line ---

def plot(path, xlabel, panels, marks=()):
    """Stacked line plots, {y label: {line label: (x, y)}}; marks: (x, text) as labelled vertical
    lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot {path}: pip install matplotlib", file=sys.stderr)
        return None
    size = (9, 1 + 3 * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=size, sharex=True, squeeze=False)
    for ax, (ylabel, series) in zip(axes[:, 0], panels.items()):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
        for x, text in marks:
            ax.axvline(x, color="gray", lw=0.6, ls=":")
            ax.annotate(text, (x, 0.01), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=8, va="bottom", ha="right")
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
    t = sub.add_parser("table", help="Table 1: accuracy, average gains over a baseline, SEMs")
    t.add_argument("--run", action="append", required=True, metavar="NAME=PATH[,PATH...]",
                   help="a run's eval.py accuracy --out (or summary, or directory) per seed")
    t.add_argument("--baseline", help="the run gains are measured against (default: the first)")
    t.add_argument("--out", help="directory for table.md and table.json")
    pca = sub.add_parser("pca-shift", help="per-layer centroid shift in the base's PCA frame")
    student_flags(pca, adapter_required=True)
    pca.add_argument("--task", required=True)
    pca.add_argument("--data", required=True)
    pca.add_argument("--out", required=True, help="directory for pca_shift.json and pca_shift.png")
    mi = sub.add_parser("mi-trace", help="per-token information gain along one rationale")
    student_flags(mi)
    mi.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC §8)")
    mi.add_argument("--id", required=True, help="the instance's id")
    mi.add_argument("--teacher", help="whose rationale (default: the instance's first)")
    mi.add_argument("--out", required=True, help="directory for trace.csv, .json and .png")
    w = sub.add_parser("weights", help="teacher weight dynamics of a train.py run (metrics.jsonl)")
    w.add_argument("run_dir")
    w.add_argument("--out", help="directory for weights.png and weights.json (default: RUN_DIR)")
    s = sub.add_parser("score", help="COMPACT's scores and weights of each rationale of a file")
    student_flags(s, batch_size=4)
    s.add_argument("--data", required=True, help="multi-teacher JSONL (SPEC.md §8)")
    s.add_argument("--out", required=True, help="scores JSONL, one line per rationale")
    s.add_argument("--max-len", type=int, default=2048, help="longer branches are left out")
    add_config_args(s, CompactConfig)
    rd = sub.add_parser("readings", help="AUROCs of each score against flaw labels, every reading")
    rd.add_argument("--set", action="append", required=True, metavar="NAME=MODEL_DIR:DATA",
                    help="a student and a labelled multi-teacher file (or GSM8K's); repeat")
    student_flags(rd, batch_size=4, model=False)
    rd.add_argument("--out", required=True, help="directory for readings.md and readings.json")
    return p


COMMANDS = {"table": run_table, "pca-shift": run_pca_shift, "mi-trace": run_mi_trace,
            "weights": run_weights, "score": run_score, "readings": run_readings}


def main(argv=None):
    a = build_parser().parse_args(argv)
    with user_errors(f"analysis.py {a.command}"):
        if a.command in ("pca-shift", "mi-trace", "score", "readings"):
            check_student_flags(a, ("batch_size", "limit", "max_len"))
        return COMMANDS[a.command](a)


if __name__ == "__main__":
    main()
