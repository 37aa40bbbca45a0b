"""The CPU demo: synthetic teachers, a tiny student, COMPACT against uniform weighting.

    python demo.py                         # the embedded default, minutes on a CPU
    torchrun --nproc_per_node=2 demo.py    # the same through DDP (gloo)
    python train.py --demo                 # alias kept for scripts

Everything runs through the real code path: train.py's loop, eval.py's accuracy. This file
holds only what the demo needs besides: the synthetic multi-teacher pool and the training
of a tiny tokenizer. Left out: real checkpoints (see README for the paper's recipe).
"""
import argparse
import json
import os
import random
import shutil
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

from compact import CompactConfig
from data import user_prompt, write_jsonl
from eval import accuracy_sem, evaluate, load_student, run_weights
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, write_tokenizer
from train import TrainConfig, cleanup_dist, print0, setup_dist, train

# --- the synthetic pool ---
#
# Multi-step arithmetic word problems (2-4 steps, small integers) and four teachers that
# differ the way real ones do. Every rationale ends on the right final value:
#   concise       correct, one short equation per step
#   verbose       correct, wrapped in thinking words (Okay, so, wait, let me check, therefore)
#   hallucinated  every intermediate result is wrong, the final one is right (the case a
#                 consensus score should catch: the answer agrees, the path does not)
#   stylized      correct, but backwards (last step first) with numbers written as words

_NAMES = ("Tom", "Ann", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe")
_ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles")
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """0..999 in English words ('one hundred twenty-three')."""
    if n < 20:
        return _WORDS[n]
    if n < 100:
        return _TENS[n // 10] + ("-" + _WORDS[n % 10] if n % 10 else "")
    return _WORDS[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")


def synth_problem(rng):
    """(question, answer, steps) with steps = [(a, op, b, result)], op in + - *."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 20)
    text, steps = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(2, 4)):
        kind = rng.choice(("add", "sub", "mul", "box") if value <= 40 else ("add", "sub"))
        if kind == "sub" and value < 2:
            kind = "add"
        if kind == "add":
            b = rng.randint(1, 15)
            text.append(f"Then {name} gets {b} more.")
            steps.append((value, "+", b, value + b))
        elif kind == "sub":
            b = rng.randint(1, value - 1)
            text.append(f"Then {name} gives away {b}.")
            steps.append((value, "-", b, value - b))
        elif kind == "mul":
            b = rng.choice((2, 3))
            text.append(f"Then the number of {item} {'doubles' if b == 2 else 'triples'}.")
            steps.append((value, "*", b, value * b))
        else:
            n, m = rng.randint(2, 4), rng.randint(2, 6)
            text.append(f"Then {name} buys {n} boxes with {m} {item} each.")
            steps += [(n, "*", m, n * m), (value, "+", n * m, value + n * m)]
        value = steps[-1][3]
    text.append(f"How many {item} does {name} have now?")
    return " ".join(text), str(value), steps


def synth_rationale(steps, teacher, rng):
    """One teacher's rationale for a problem's steps (see the section comment)."""
    if teacher == "concise":
        return " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps)
    if teacher == "verbose":
        lines = [f"Okay, so first we start from {steps[0][0]}."]
        for a, op, b, c in steps:
            lines.append(rng.choice(("Then", "Now", "Next")) + f", {a} {op} {b} = {c}.")
            if rng.random() < 0.5:
                lines.append(f"Wait, let me check: {a} {op} {b} is {c}. Yes.")
        return " ".join(lines + [f"Therefore the total is {steps[-1][3]}."])
    if teacher == "hallucinated":
        out = []
        for j, (a, op, b, c) in enumerate(steps):
            wrong = c if j == len(steps) - 1 else c + rng.choice((-3, -2, -1, 1, 2, 3))
            out.append(f"{a} {op} {b} = {max(wrong, 0)}.")
        return " ".join(out)
    if teacher == "stylized":
        ops = {"+": "plus", "-": "minus", "*": "times"}
        return "; ".join(f"{number_words(c)} is {number_words(a)} {ops[op]} {number_words(b)}"
                         for a, op, b, c in reversed(steps)) + "."
    raise ValueError(f"unknown synthetic teacher {teacher!r}")


SYNTH_TEACHERS = ("concise", "verbose", "hallucinated", "stylized")


def synth_pool(out_dir, seed=0, n_train=256, n_test=64):
    """Write out_dir/train.jsonl (multi-teacher, task gsm8k) and out_dir/test.jsonl (the same
    format without rationales), with no question in both."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        question, answer, steps = synth_problem(rng)
        if question in seen:
            continue
        seen.add(question)
        row = {"id": f"synth-{len(rows):05d}", "question": question, "answer": answer, "task": "gsm8k"}
        if len(rows) < n_train:
            row["rationales"] = [{"teacher": t, "text": synth_rationale(steps, t, rng)}
                                 for t in SYNTH_TEACHERS]
        rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, "train.jsonl"), rows[:n_train])
    write_jsonl(os.path.join(out_dir, "test.jsonl"), rows[n_train:])
    return rows[:n_train], rows[n_train:]



# --- the demo ---

DEMO_STUDENT = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                "use_sliding_window": False, "torch_dtype": "float32", "architectures": ["Qwen2ForCausalLM"]}
# Flags left at their TrainConfig default take these values in the demo.
DEMO_DEFAULTS = dict(out="runs/demo", max_steps=60, batch_size=4, grad_accum=1, lr=2e-3, max_len=320,
                     save_every=20, lora_dropout=0.0)
DEMO_PRETRAIN = dict(batch_size=8, lr=3e-3, full_ft=True)  # for min(150, 2.5 × distillation) steps


def demo(cfg, ccfg, rank, world, device):
    """Synthetic teachers → a tiny base student → COMPACT and uniform distillation → accuracy.

    The base student is trained briefly, with the very same loop, on the answer format alone
    (one terse "teacher"), so that held-out accuracy measures what the rationales teach.
    """
    cfg = replace(cfg, **{k: v for k, v in DEMO_DEFAULTS.items() if getattr(cfg, k) == getattr(TrainConfig, k)})
    out = cfg.out
    data_dir, init_dir, base_dir = (os.path.join(out, d) for d in ("data", "base-init", "base"))
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(init_dir):
        raise ValueError(f"--out {out} is not empty and holds no earlier demo: choose another --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 writes
    if rank == 0:  # a new demo replaces an earlier one's runs
        for run in ("pretrain", "uniform", "."):
            shutil.rmtree(os.path.join(out, run, "checkpoints"), ignore_errors=True)
        train_rows, test_rows = synth_pool(data_dir, seed=cfg.seed)
        texts = [r["question"] + " " + r["answer"] for r in train_rows + test_rows]
        texts += [x["text"] for r in train_rows for x in r["rationales"]]
        write_tokenizer(init_dir, texts, vocab_size=512)
        vocab = Tokenizer.from_pretrained(init_dir).vocab_size
        torch.manual_seed(cfg.seed)
        Transformer(ModelArgs.from_hf_config({**DEMO_STUDENT, "vocab_size": vocab}), {**DEMO_STUDENT, "vocab_size": vocab}).save_pretrained(init_dir)
        with open(os.path.join(data_dir, "format.jsonl"), "w") as f:
            for r in train_rows:
                f.write(json.dumps({**r, "rationales": [{"teacher": "format", "text": "Let me compute."}]}) + "\n")
    if dist.is_initialized():
        dist.barrier()

    print0("== 1/4 base student: learns the answer format only")
    pre = replace(cfg, model=init_dir, data=os.path.join(data_dir, "format.jsonl"), out=os.path.join(out, "pretrain"),
                  resume=False, max_steps=min(150, max(1, round(2.5 * cfg.max_steps))), **DEMO_PRETRAIN)
    train(pre, CompactConfig(weighting="uniform", mcon_lambda=0.0), rank, world, device)
    if rank == 0:
        shutil.rmtree(base_dir, ignore_errors=True)
        shutil.copytree(os.path.join(pre.out, "model"), base_dir)  # with the tokenizer (save_weights)
    if dist.is_initialized():
        dist.barrier()
    runs = {"compact": replace(cfg, model=base_dir, data=os.path.join(data_dir, "train.jsonl")),
            "uniform": replace(cfg, model=base_dir, data=os.path.join(data_dir, "train.jsonl"), out=os.path.join(out, "uniform"))}
    print0(f"== 2/4 COMPACT distillation from {', '.join(SYNTH_TEACHERS)}")
    train(runs["compact"], ccfg, rank, world, device)
    print0("== 3/4 the same with uniform weights (Direct Avg. + MCon)")
    train(runs["uniform"], replace(ccfg, weighting="uniform"), rank, world, device)
    if rank == 0:
        print0("== 4/4 held-out accuracy")
        demo_report(out, base_dir, os.path.join(data_dir, "test.jsonl"), runs, device)


def demo_report(out, base_dir, test_file, runs, device):
    """Held-out accuracy of base / uniform / COMPACT (eval.py's own loop), and COMPACT's teacher weights."""
    rows = [json.loads(line) for line in open(test_file)]
    items = [{"id": r["id"], "prompt": user_prompt(r["question"], r["task"]), "answer": r["answer"], "task": r["task"]}
             for r in rows]
    print0(f"{'student':<10} {'accuracy':>9} {'± SEM':>7}   first test answer (n = {len(items)}, greedy)")
    for name in ("base", "uniform", "compact"):
        model, tok = load_student(base_dir, None if name == "base" else os.path.join(runs[name].out, "adapter"),
                                  device=device)
        preds = os.path.join(out, "eval", f"{name}.jsonl")
        os.makedirs(os.path.dirname(preds), exist_ok=True)
        if os.path.exists(preds):
            os.remove(preds)  # a new demo run: new predictions
        records = evaluate(model, tok, items, preds, batch_size=64, max_new_tokens=96)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        print0(f"{name:<10} {p:>9.3f} {sem:>7.3f}   {records[0]['output'][:90]!r}")
    print0("COMPACT's teacher weights over training (eval.py weights):")
    run_weights(argparse.Namespace(run_dir=out, out=None))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEMO_DEFAULTS["out"], help="the demo's directory (replaced by a new demo)")
    p.add_argument("--max-steps", type=int, default=DEMO_DEFAULTS["max_steps"], help="distillation steps per arm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.max_steps < 1:
        p.error("--max-steps must be >= 1")
    cfg, ccfg = TrainConfig(out=a.out, max_steps=a.max_steps, seed=a.seed), CompactConfig()
    rank, world, device = setup_dist()
    try:
        demo(cfg, ccfg, rank, world, device)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_dist()


if __name__ == "__main__":
    main()
