"""The CPU demo: four synthetic teachers, a tiny student that learns arithmetic, COMPACT against
baselines, and the verdict as a paired measurement over seeds.

    python demo.py                       # base, Direct Avg., COMPACT; 3 paired seeds
    python demo.py --seed-base 100       # the same on seeds 100, 101, 102
    python demo.py --full                # every arm of SPEC.md §5 (SbS per teacher, MCC, ...)
    python demo.py --pool stress         # the stress test: teachers uniformly good or bad
    torchrun --nproc_per_node=2 demo.py  # the same through DDP (gloo)

The task: left-to-right arithmetic on small numbers ("7*3-5+8"), digits one token each, words
one token each. A tiny Qwen2-shaped student is first taught one- and two-step problems with
worked steps (its "pretraining"; this is the base student, OUT/base/), then distilled on
three-step problems from four teachers, each correct on most questions and flawed on a different
few (every rationale's "flaw" label is in the data), each arm through train.py's own loop and
scored with eval.py's own accuracy. OUT/report.json holds the table; OUT/weights.png the weight
curves when matplotlib is installed. Left out: real checkpoints (docs/usage.md has the paper's recipe).
"""
import argparse
import math
import os
import random
import re
import shutil
import time

import tokenizers
import torch
from tokenizers import decoders, models

from analysis import (HIGHER_IS_CLEAN, plot, read_correct, reading_aurocs, sem,
                      teacher_dynamics)
from common import (barrier, print0, read_json, read_jsonl, run_job, write_json, write_jsonl,
                    write_text)
from compact import CompactConfig
from data import FLAWS, load_multi_teacher
from eval import accuracy_sem, evaluate, load_student
from model import ModelArgs, Transformer
from tokenizer import BUILTIN_TEMPLATES
from train import TrainConfig, train

# --- the task: left-to-right arithmetic on small numbers ---

MAX_VALUE = 29  # every intermediate value stays in 0..29


def apply_op(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng, n_ops):
    """(question, answer, steps), steps = [(a, op, b, result)]: a start digit and n_ops operations
    on digits ("7*3-5+8"). × only comes first, so the usual precedence and left to right agree."""
    value = start = rng.randint(1, 9)
    steps = []
    for j in range(n_ops):
        choices = [(op, b) for op in "+-" for b in range(1, 10)
                   if 0 <= apply_op(value, op, b) <= MAX_VALUE]
        # × in about half
        choices += [("*", b) for b in (2, 3) if j == 0 and value * b <= MAX_VALUE] * 9
        op, b = rng.choice(choices)
        steps.append((value, op, b, apply_op(value, op, b)))
        value = steps[-1][3]
    return str(start) + "".join(f"{op}{b}" for _, op, b, _ in steps), str(value), steps


# --- the teachers: two pools ---

# A teacher's style: what opens a chain of equations, what joins two of them, and the filler it
# writes when it skips the reasoning. Styles differ in length and in thinking-word density, as the
# paper's teachers do; a two-step chain shows every part of its style (the base student learns all
# four).
STYLES = {
    "terse": ("", ", ", "So it is {}."),  # 7*3=21, 21-5=16, 16+8=24.
    "stepwise": ("", ", then ", "Hmm, so it is {}."),  # 7*3=21, then 21-5=16, then 16+8=24.
    # Okay, now 7*3=21. Next 21-5=16. Next 16+8=24.
    "narrator": ("Okay, now ", ". Next ", "Okay, now let me see. So it is {}."),
    "reflective": ("First, ", ". Wait, so then ",
                   "First, let me think. Wait, hmm. So then it is {}."),
}
# The flaws (data.FLAWS) and the score each is meant to be caught by:
#   hallucination  one intermediate result wrong and carried through, the final answer right:
#                  S_G (consensus)
#   form           the same true equations, answer first (the last step first): S_D (difficulty)
#   filler         thinking words and the answer, no arithmetic: S_MI (adaptability)
# "premise" (the default): every teacher writes in its own style, correct on most questions and
# flawed on a different random subset; P(0, 1, 2 of a question's four rationales are flawed) =
# FLAW_COUNTS, each flaw drawn uniformly. "stress": four teachers uniformly good or bad, each
# flawed on every question in one way (teacher: (style, flaw)); only the stepwise teacher can be
# learned from.
FLAW_COUNTS = (0.4, 0.4, 0.2)
POOLS = {"premise": {t: (t, None) for t in STYLES},
         "stress": {"stepwise": ("stepwise", None), "hallucinated": ("stepwise", "hallucination"),
                    "reversed": ("terse", "form"), "oracle": ("stepwise", "filler")}}


def chain(equations, style):
    """Equations in a style: "First, 7*3=21. Wait, so then 21-5=16. Wait, so then 16+8=24." """
    return STYLES[style][0] + STYLES[style][1].join(equations) + "."


def hallucinate(steps, rng, carried=True):
    """Wrong intermediate results, the final one kept. carried: one result off by 1 or 2 and carried
    through the later steps (each computed right from the wrong value); else (the stress pool)
    every intermediate result off by 1 or 2, the operands kept."""
    last = len(steps) - 1
    if not carried:
        return [(a, op, b, c if j == last else c + rng.choice((1, 2) if c < 2 else (-2, -1, 1, 2)))
                for j, (a, op, b, c) in enumerate(steps)]
    j, d = rng.choice([(j, d) for j in range(last) for d in (-2, -1, 1, 2)
                       if all(0 <= c + d <= MAX_VALUE for *_, c in steps[j:last])])
    return [(a + d * (k > j), op, b, c + d * (j <= k < last))
            for k, (a, op, b, c) in enumerate(steps)]


def rationale(steps, style, flaw, rng, carried=True):
    """One rationale for a problem's steps in a style, with a flaw (data.FLAWS) or none."""
    if flaw == "filler":
        return STYLES[style][2].format(steps[-1][3])
    if flaw == "form":
        return chain([f"{c}={a}{op}{b}" for a, op, b, c in reversed(steps)], style)
    if flaw == "hallucination":
        steps = hallucinate(steps, rng, carried)
    elif flaw is not None:
        raise ValueError(f"unknown flaw {flaw!r}")
    return chain([f"{a}{op}{b}={c}" for a, op, b, c in steps], style)


def assign_flaws(rng, teachers, counts=FLAW_COUNTS):
    """teacher: flaw or None for one question: how many are flawed (counts), which (uniform), which
    flaw (uniform)."""
    flawed = rng.sample(teachers, rng.choices(range(len(counts)), counts)[0])
    return {t: rng.choice(FLAWS) if t in flawed else None for t in teachers}


def unique_problems(rng, n, ops, seen):
    """n problems with questions not in `seen` (which grows); ops: the allowed step counts."""
    out, tries = [], 0
    while len(out) < n:
        q, a, steps = make_problem(rng, rng.choice(ops))
        tries += 1
        if tries > 50 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct problems with {ops} steps")
        if q not in seen:
            seen.add(q)
            out.append((q, a, steps))
    return out


def one_step_facts():
    """Every single operation the task can ask for, as one-step problems (a from 0 to MAX_VALUE)."""
    ops = [(op, b) for op in "+-*" for b in ((2, 3) if op == "*" else range(1, 10))]
    return [(f"{a}{op}{b}", str(apply_op(a, op, b)), [(a, op, b, apply_op(a, op, b))])
            for a in range(MAX_VALUE + 1) for op, b in ops
            if 0 <= apply_op(a, op, b) <= MAX_VALUE and (op != "*" or 1 <= a <= 9)]


def synth_pool(out_dir, seed=0, n_train=2000, n_test=300, n_pretrain=2000, pool="premise",
               flaw_counts=FLAW_COUNTS):
    """Write out_dir/test.jsonl (three steps, no rationales), train.jsonl (three steps, every
    teacher of the pool, each rationale with its "flaw" label) and pretrain.jsonl (every one-step
    fact and n_pretrain two-step problems, clean: each in a random style of the pool's teachers,
    stepwise only for "stress"); no question in two files. Returns (train rows, test rows)."""
    rng, seen, teachers = random.Random(seed), set(), POOLS[pool]
    test, train_, pre = (unique_problems(rng, n, (steps,), seen) for n, steps in
                         ((n_test, 3), (n_train, 3), (n_pretrain, 2)))

    def train_rationales(steps):
        flaws = {t: flaw for t, (_, flaw) in teachers.items()}  # stress: the teacher's own
        if pool == "premise":
            flaws = assign_flaws(rng, list(teachers), flaw_counts)
        return [{"teacher": t, "text": rationale(steps, style, flaws[t], rng, pool == "premise"),
                 "flaw": flaws[t]} for t, (style, _) in teachers.items()]

    def pre_rationales(steps):
        style = "stepwise" if pool == "stress" else rng.choice(list(teachers))
        return [{"teacher": style, "text": rationale(steps, style, None, rng), "flaw": None}]

    def rows(problems, prefix, make=None):
        return [{"id": f"{prefix}-{i:05d}", "question": q, "answer": a,
                 **({"rationales": make(s)} if make else {})}
                for i, (q, a, s) in enumerate(problems)]
    # drawn first: the same whatever the flaw settings
    pre = rows(one_step_facts() + pre, "pre", pre_rationales)
    out = {"test": rows(test, "test"), "train": rows(train_, "train", train_rationales),
           "pretrain": pre}
    # the clean-only arm's data: each question's clean rationales; questions without any are dropped
    clean = ({**r, "rationales": [x for x in r["rationales"] if not x["flaw"]]}
             for r in out["train"])
    out["train_clean"] = [r for r in clean if r["rationales"]]
    for name, r in out.items():  # write_jsonl makes out_dir
        write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), r)
    return out["train"], out["test"]


# --- a tokenizer.json like any checkpoint's: one token per character, and per word of the pools ---

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ALPHABET = "0123456789+-*=,.: \nFHNOSTWabcdefghijklmnopqrstuvwxyz"


def pool_words():
    """Every word the pools and the answer cue write, with its leading space where it has one."""
    texts = [x for style in STYLES.values() for x in style] + ["\nThe answer is "]
    return sorted({w for t in texts for w in re.findall(r" ?[A-Za-z]+", t)})


def write_tokenizer(out_dir):
    """One token per character and one per word of the pools (" answer", " Wait", as a real BPE
    has them: merges built left to right, so digits stay one token each); ChatML specials and
    template."""
    pairs = ((w[:i - 1], w[i - 1]) for w in pool_words() for i in range(2, len(w) + 1))
    merges = list(dict.fromkeys(pairs))
    tokens = SPECIALS + sorted(set(ALPHABET)) + [a + b for a, b in merges]
    vocab = {c: i for i, c in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    # as tok.save, atomically
    write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "model_max_length": 512,
        "chat_template": BUILTIN_TEMPLATES["chatml"]})
    eos = {"eos_token_id": [vocab["<|im_end|>"]]}
    write_json(os.path.join(out_dir, "generation_config.json"), eos)
    return len(vocab)


# --- the student, the stages, the arms ---

STUDENT = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False,
           "torch_dtype": "float32", "architectures": ["Qwen2ForCausalLM"]}
# Full fine-tuning: a from-scratch student this small learns little through LoRA in minutes.
COMMON = dict(full_ft=True, grad_accum=1, max_len=128, save_every=0, warmup=0.05,
              keep_checkpoints=1)
PRETRAIN = dict(batch_size=32, lr=3e-3)
DISTIL = dict(batch_size=8, lr=1.5e-3)  # 3e-3: lower accuracy, wider spread (docs/demo.md)
UNIFORM = dict(weighting="uniform", mcon_lambda=0.0)
# name: (teachers, CompactConfig fields), SPEC.md §5; "sbs-T" is SbS-KD from teacher T alone.
# Run in this order, every seed of an arm before the next arm, so a stopped run has whole arms.
# clean-only: no flaws; compact-cosine: S_G beyond the paper.
ARMS = {"base": None, "sbs-stepwise": ("stepwise", UNIFORM), "direct-avg": ("", UNIFORM),
        "compact": ("", {}), "mcc": ("", dict(weighting="uniform")),
        "no-mi": ("", dict(alpha=0.0)), "no-consensus": ("", dict(beta=0)),
        "no-difficulty": ("", dict(gamma=0)), "clean-only": ("", UNIFORM),
        "compact-cosine": ("", dict(sg_similarity="cosine"))}


def pool_arms(pool):
    """ARMS and an SbS arm for every other teacher of the pool."""
    return {**ARMS, **{f"sbs-{t}": (t, UNIFORM) for t in POOLS[pool] if t != "stepwise"}}


DEFAULT_ARMS = ("base", "direct-avg", "compact")


def demo(a, rank, world, device):
    """Pool and tokenizer → pretraining (the base student) → every arm × seed → the report
    (rank 0). Every rank runs every stage: train() and run_result() split their work over ranks."""
    out = a.out
    data_dir, base_dir = os.path.join(out, "data"), os.path.join(out, "base")
    init = os.path.join(out, "pretrain", "init")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(f"{out}/demo.json"):
        raise ValueError(f"--out {out} is not empty and holds no earlier demo: choose another")
    barrier()  # every rank has checked before rank 0 writes
    t0 = time.time()
    if rank == 0:  # a new demo replaces an earlier one
        for d in ("pretrain", "runs", "eval", "base"):
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
        synth_pool(data_dir, 0, a.n_train, a.n_test, a.n_pretrain, a.pool, a.flaw_counts)
        config = {**STUDENT, "vocab_size": write_tokenizer(init)}
        torch.manual_seed(0)
        Transformer(ModelArgs.from_hf_config(config), config).save_pretrained(init)
        write_json(os.path.join(out, "demo.json"), vars(a))
    barrier()
    base = a.base  # an earlier demo's base student: the arms run on it, nothing is pretrained
    if not base:
        styles = "the stepwise style" if a.pool == "stress" else "the four styles"
        print0(f"== base student: {a.pretrain_steps} steps on one-step facts and two-step "
               f"problems, clean rationales in {styles}")
        pre = TrainConfig(model=init, out=os.path.join(out, "pretrain"),
                          max_steps=a.pretrain_steps,
                          data=os.path.join(data_dir, "pretrain.jsonl"), **COMMON, **PRETRAIN)
        train(pre, CompactConfig(**UNIFORM), rank, world, device)
        base = os.path.join(pre.out, "model")  # with the tokenizer (save_weights)
    if rank == 0:
        shutil.copytree(base, base_dir)
    barrier()  # nobody reads OUT/base before it is complete
    test_rows = [row for _, row in read_jsonl(os.path.join(data_dir, "test.jsonl"))]
    # Every rank evaluates its share (eval.run_sharded reaches barriers on every rank).
    run_result(base_dir, None, test_rows, f"{out}/eval/base.jsonl", rank, world, device, (t0, 0))
    arms = pool_arms(a.pool)
    for arm in [x for x in a.arms if arms[x]]:
        teachers, fields = arms[arm]
        data = os.path.join(data_dir, "train_clean.jsonl" if arm == "clean-only" else "train.jsonl")
        # Paired within a seed: every arm starts from the same base student and sees the same
        # data order (data.shard_indices draws it from the seed alone).
        for seed in range(a.seed, a.seed + a.seeds):
            run_dir = os.path.join(out, "runs", arm, f"seed-{seed}")
            cfg = TrainConfig(model=base_dir, data=data, teachers=teachers, seed=seed,
                              max_steps=a.max_steps, out=run_dir, **COMMON, **DISTIL)
            sources = teachers or ", ".join(POOLS[a.pool])
            print0(f"== {arm}, seed {seed}: {a.max_steps} steps from {sources}")
            t_run = (time.time(), time.process_time())
            train(cfg, CompactConfig(**fields), rank, world, device)
            preds = os.path.join(out, "eval", f"{arm}-seed-{seed}.jsonl")
            run_result(f"{cfg.out}/model", cfg.out, test_rows, preds, rank, world, device, t_run)
    if rank == 0:
        report(a, len(test_rows), t0)
    barrier()


def run_result(model_dir, run_dir, test_rows, preds, rank, world, device, start):
    """Held-out accuracy with eval.py's loop (greedy, batched, answers checked by data.py), and the
    run's teacher weights; written to RUN/result.json (OUT/eval/base.json for the base student).
    Every rank calls it and predicts every world-th item (evaluate's collectives); rank 0 writes.
    start: (time.time(), time.process_time()) when the run began."""
    model, tok = load_student(model_dir, None, device=device)
    items = [{"id": r["id"], "prompt": r["question"], "answer": r["answer"], "task": None}
             for r in test_rows]
    if rank == 0:  # the other ranks read preds only after run_sharded's first barrier
        os.makedirs(os.path.dirname(preds), exist_ok=True)
        if os.path.exists(preds):
            os.remove(preds)
    records = evaluate(model, tok, items, preds, batch_size=100, max_new_tokens=64,
                       rank=rank, world=world)
    if rank != 0:
        return
    n, acc, _ = accuracy_sem([r["correct"] for r in records])
    metrics = [r for _, r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] if run_dir else []
    dyn = teacher_dynamics(metrics)  # {} for the base student
    teachers = {t: {k: v for k, v in d.items() if k != "steps"} for t, d in dyn.items()}
    result = {"accuracy": acc, "n": n, "sample_output": records[0]["output"],
              "wall_s": round(time.time() - start[0], 1),
              "cpu_s": round(time.process_time() - start[1], 1), "teachers": teachers}
    write_json(os.path.join(run_dir, "result.json") if run_dir else preds[:-6] + ".json", result)
    print0(f"   held-out accuracy {acc:.3f} (n = {n}) | {result['wall_s']}s | "
           f"first answer {result['sample_output'][:50]!r}")


def mean(values):
    """sum(values) / len(values); None if any is None (an AUROC that a seed could not compute)."""
    return None if None in values else sum(values) / len(values)


# The comparisons the demo claims, (a, b): a verdict for each pair whose two arms ran.
CLAIMS = (("compact", "direct-avg"), ("compact", "no-consensus"), ("compact", "base"),
          ("compact", "clean-only"))


def paired_verdict(a, b, acc_a, acc_b, question_diffs=None):
    """Arm a against arm b, paired by seed (a seed: the same base student, the same data order):
    diff = the mean over seeds of acc_a[s] - acc_b[s]; se its standard error over seeds, or with
    one seed over questions (question_diffs: a's 0/1 minus b's on each held-out question); call
    "a better" or "b better" where |diff| > 2 se, else "no difference"."""
    diffs = [x - y for x, y in zip(acc_a, acc_b)]
    diff = sum(diffs) / len(diffs)
    se = sem(diffs, 1) if len(diffs) > 1 else sem(question_diffs, 1)
    call = "no difference"
    if abs(diff) > 2 * se:
        call = "a better" if diff > 0 else "b better"
    return {"a": a, "b": b, "diff": diff, "se": se, "n_seeds": len(diffs), "call": call}


def held_out_correct(out, arm, seed):
    """{question id: 0/1} of an arm's seed (of the base student: seed None) on the held-out set."""
    name = "base" if arm == "base" else f"{arm}-seed-{seed}"
    return read_correct(os.path.join(out, "eval", name + ".jsonl"))


def verdicts(out, table):
    """paired_verdict for each claim whose arms ran, on the seeds both ran (the base student is
    one: it pairs with every seed)."""
    found = []
    for a, b in CLAIMS:
        if a not in table or b not in table:
            continue
        runs = {arm: dict(zip(table[arm]["seeds"], table[arm]["per_seed"])) for arm in (a, b)}
        seeds = [s for s in runs[a] if s in runs[b] or b == "base"]
        acc_a = [runs[a][s] for s in seeds]
        acc_b = [runs[b][None if b == "base" else s] for s in seeds]
        question_diffs = None
        if len(seeds) == 1:
            right = [held_out_correct(out, arm, seeds[0]) for arm in (a, b)]
            question_diffs = [right[0][q] - right[1][q] for q in right[0]]
        found.append(paired_verdict(a, b, acc_a, acc_b, question_diffs))
    return found


STATS = ("weight_first", "weight_last", "s_mi", "s_g", "s_d")  # per teacher, averaged over seeds


def arm_row(a, arm, seeds):
    """An arm's row of the report from its result.json files (None if none is written yet)."""
    paths = [os.path.join(a.out, "runs", arm, f"seed-{s}", "result.json") for s in seeds]
    if arm == "base":
        paths = [os.path.join(a.out, "eval", "base.json")]
    res = [read_json(p) for p in paths if os.path.isfile(p)]
    if not res:
        return None
    accs = [r["accuracy"] for r in res]
    acc = mean(accs)
    # One base student: its SEM is the binomial one; an arm's is the spread over its seeds.
    err = math.sqrt(acc * (1 - acc) / res[0]["n"]) if arm == "base" else sem(accs, 1) or 0.0
    dyn = [r["teachers"] for r in res if r["teachers"]]
    names = sorted({t for d in dyn for t in d})
    teachers = {t: {k: mean([d[t][k] for d in dyn]) for k in STATS} for t in names}
    row = {"accuracy": acc, "sem": err, "per_seed": accs, "n_per_seed": res[0]["n"],
           "seeds": [None] if arm == "base" else seeds[:len(res)],
           "minutes": round(sum(r["wall_s"] for r in res) / 60, 2),
           "sample_output": res[0]["sample_output"], "teachers": teachers}
    if dyn and pool_arms(a.pool)[arm][1].get("weighting") != "uniform":
        series = {t: [d[t]["series"]["weight"] for d in dyn] for t in names}
        row["curve"] = {t: [mean(x) for x in zip(*s)] for t, s in series.items()}
    return row


def report(a, n_test, t0):
    """Accuracy per arm (mean ± SEM over seeds), the paired verdicts, weights per teacher, the
    chart; OUT/report.json."""
    seeds = list(range(a.seed, a.seed + a.seeds))
    table = {arm: row for arm in a.arms if (row := arm_row(a, arm, seeds))}
    curves = {arm: row.pop("curve") for arm, row in table.items() if "curve" in row}
    if curves:
        for arm, auroc in caught(a, {x: table[x]["seeds"] for x in curves}).items():
            table[arm]["auroc"] = auroc
    sbs = [x for x in table if x.startswith("sbs-")]
    best = max(sbs, key=lambda x: table[x]["accuracy"], default=None)
    found = verdicts(a.out, table)
    summary = {"arms": table, "verdicts": found, "best_sbs": best, "settings": vars(a),
               "minutes": round((time.time() - t0) / 60, 2)}
    write_json(os.path.join(a.out, "report.json"), summary)
    print0(f"\n{'arm':<24} {'accuracy':>9} {'± SEM':>7}  per seed (n = {n_test} each)")
    for arm, r in table.items():
        label = arm + (" (SbS best)" if arm == best and len(sbs) > 1 else "")
        per_seed = " ".join(f"{x:.3f}" for x in r["per_seed"])
        print0(f"{label:<24} {r['accuracy']:>9.3f} {r['sem']:>7.3f}  {per_seed}")
    print0(f"\n{'paired verdict':<28} {'diff':>7} {'± se':>6} {'seeds':>5}  call (|diff| > 2 se)")
    for v in found:
        print0(f"{v['a'] + ' vs ' + v['b']:<28} {v['diff']:>+7.3f} {v['se']:>6.3f} "
               f"{v['n_seeds']:>5}  {v['call']}")
    for arm, series in curves.items():
        print_readings(arm, table[arm], series, len(seeds))
    if curves:
        panels = {f"weight ({arm})": {t: (list(range(1, len(w) + 1)), w) for t, w in s.items()}
                  for arm, s in curves.items()}
        png = plot(os.path.join(a.out, "weights.png"), "optimizer step", panels)
        print0(f"\nwrote {png or 'no PNG (pip install matplotlib)'}, {a.out}/report.json")
    print0(f"demo: {(time.time() - t0) / 60:.1f} min")


def two_places(v):
    return "  -" if v is None else f"{v:.2f}"


def print_readings(arm, row, series, n_seeds):
    """An arm's AUROC per score and flaw (base student → distilled) and its weight curves."""
    print0(f"\n{arm}: within-instance AUROC against the flaw labels, base student → distilled "
           "(S_D: lower)")
    early, late = row["auroc"]["early"], row["auroc"]["late"]
    for k in HIGHER_IS_CLEAN:
        cells = [f"{(f + '/all').split('/')[1]} {two_places(early[f])} → {two_places(late[f])}"
                 for f in early if f.split("/")[0] == k]
        print0(f"{k:<8} " + " | ".join(cells))
    print0(f"\n{arm}: mean weight per teacher over training (mean of {n_seeds} seeds; "
           "▁ = 0, █ = 1)")
    for t, w in series.items():
        d = row["teachers"][t]
        print0(f"{t:<13} {sparkline(w)}  {d['weight_first']:.2f} → {d['weight_last']:.2f}   "
               f"S_MI {d['s_mi']:.4f}  S_G {d['s_g']:.3f}  S_D {d['s_d']:.3f}")


def caught(a, arms, n=300):
    """What each score caught, per arm of {arm: seeds}: within-instance AUROC of S_MI, S_G, S_D
    and the arm's weight against the flaw labels of the first n training questions, under the
    base student ("early", with its "se"; one scoring pass serves every arm) and, averaged over
    seeds, the arm's distilled students ("late"); S_MI exact (analysis.reading_aurocs, each
    arm's CompactConfig fields its reading)."""
    instances = load_multi_teacher(os.path.join(a.out, "data", "train.jsonl"))[:n]

    def auroc(path, *names):
        readings = {x: pool_arms(a.pool)[x][1] for x in names}
        return reading_aurocs(*load_student(path), instances, 50, readings)
    early = auroc(os.path.join(a.out, "base"), *arms)
    out = {}
    for arm, seeds in arms.items():
        late = [auroc(os.path.join(a.out, "runs", arm, f"seed-{s}", "model"), arm)[arm]
                for s in seeds]
        out[arm] = {"early": early[arm],
                    "late": {k: mean([x[k] for x in late]) for k in late[0] if k != "se"}}
    return out


BARS = "▁▂▃▄▅▆▇█"


def sparkline(values, width=48):
    """Values in [0, 1] as one row of bar characters, averaged into at most `width` columns."""
    cols = min(width, len(values))
    chunks = [values[i * len(values) // cols:(i + 1) * len(values) // cols] for i in range(cols)]
    return "".join(BARS[min(len(BARS) - 1, int(sum(c) / len(c) * len(BARS)))] for c in chunks)


def parse_args(argv=None):
    """The demo's flags, checked (argparse's error, exit 2, names the flag)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--out", default="runs/demo", help="the demo's directory (replaced by a new demo)")
    add("--pool", choices=POOLS, default="premise", help="the teachers (see POOLS)")
    add("--flaw-counts", default=",".join(map(str, FLAW_COUNTS)),
        help="premise pool: P(0, 1, 2, ... of a question's rationales flawed), comma-separated")
    add("--full", action="store_true", help=f"every arm: {', '.join(ARMS)}, sbs-T per teacher")
    add("--arms", help=f"comma-separated arms (default: {','.join(DEFAULT_ARMS)})")
    add("--max-steps", type=int, default=300, help="distillation steps per arm and seed")
    add("--pretrain-steps", type=int, default=1200, help="steps that make the base student")
    add("--base", help="an earlier demo's OUT/base: the arms run on it, nothing is pretrained")
    add("--seeds", type=int, default=3, help="seeds per arm (paired across arms), --full too")
    add("--seed-base", "--seed", dest="seed", type=int, default=0,
        help="the first seed: an arm's seeds are N, N+1, ... (the base student is one)")
    add("--n-train", type=int, default=2000, help="three-step training problems")
    add("--n-test", type=int, default=1000, help="held-out problems, one set for all")
    add("--n-pretrain", type=int, default=2000, help="two-step problems for the base student")
    a = p.parse_args(argv)
    for flag in ("max_steps", "pretrain_steps", "seeds", "n_train", "n_test", "n_pretrain"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        a.flaw_counts = [float(x) for x in a.flaw_counts.split(",")]
    except ValueError:
        p.error(f"--flaw-counts: numbers expected, got {a.flaw_counts!r}")
    most = len(POOLS["premise"]) + 1
    if len(a.flaw_counts) > most or min(a.flaw_counts) < 0 or not sum(a.flaw_counts) > 0:
        p.error(f"--flaw-counts: at most {most} weights >= 0, not all 0")
    known = pool_arms(a.pool)
    a.arms = list(known) if a.full else (a.arms.split(",") if a.arms else list(DEFAULT_ARMS))
    if unknown := [x for x in a.arms if x not in known]:
        p.error(f"--arms: unknown {', '.join(unknown)} "
                f"(known with --pool {a.pool}: {', '.join(known)})")
    return a


def main(argv=None):
    run_job(demo, parse_args(argv), prog="demo.py")


if __name__ == "__main__":
    # Each process takes its share of the cores, at most two: alone on 2 cores, 2 threads pretrain
    # 1.5x faster than 1; more threads than cores (ranks x threads) run ~5x slower.
    torch.set_num_threads(max(1, min(2, os.cpu_count() // int(os.environ.get("WORLD_SIZE", 1)))))
    main()
