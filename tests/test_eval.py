"""eval.py on tiny random students: accuracy and its resume, torchrun sharding, PCA shift,
the information-gain trace against a per-prefix loop and compact.py's scorer, weight dynamics."""
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import data
import lora
import tokenizer
import demo
import eval as ev
from compact import CompactConfig, adaptability_scores
from conftest import ROOT, random_model, tiny_config
from lora import apply_lora, save_adapter
from model import Transformer

# One tiny file per public benchmark format, with known answers (gpqa's choice order is shuffled
# by data.py, so its gold letter is read from the loaded item).
GSM8K = [{"question": f"Tom has {n} apples and gets 2 more. How many now?", "answer": f"{n} + 2 = {n + 2}\n#### {n + 2}"}
         for n in (3, 5, 7, 9)]
MATH = [{"problem": "What is $1/2 + 1/4$?", "solution": "$\\boxed{\\frac{3}{4}}$", "answer": "\\frac{3}{4}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "What is $2^3$?", "solution": "$\\boxed{8}$", "answer": "8", "subject": "Algebra", "level": 1,
         "unique_id": "test/algebra/2.json"}]
SVAMP = [{"Body": "Ann has 4 pens", "Question": "How many pens does Ann have?", "Equation": "( 4.0 )",
          "Answer": 4.0, "Type": "Common", "ID": "chal-1"},
         {"Body": "Ben has 6 cards.", "Question": "How many cards does Ben have?", "Equation": "( 6.0 )",
          "Answer": 6.0, "Type": "Common", "ID": "chal-2"}]
CSQA = [{"id": f"cs{i}", "question": {"stem": f"Where do {i} fish live?", "choices": [
    {"label": l, "text": t} for l, t in zip("ABCDE", ("water", "sky", "desk", "tree", "car"))]}, "answerKey": "A"}
    for i in range(3)]
STRATEGYQA = [{"qid": "s1", "question": "Is water wet?", "answer": True},
              {"qid": "s2", "question": "Can fish fly to the moon?", "answer": False}]
GPQA_HEADER = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
GPQA = [["rec1", "Which is a noble gas?", "Neon", "Iron", "Carbon", "Sodium"],
        ["rec2", "Which is a prime?", "7", "8", "9", "10"]]


def write_benchmarks(d):
    """{task: path} of small files in each benchmark's public format."""
    paths = {t: os.path.join(d, name) for t, name in (("gsm8k", "gsm8k.jsonl"), ("math", "math500.jsonl"),
             ("svamp", "svamp.jsonl"), ("csqa", "csqa.jsonl"), ("strategyqa", "strategyqa.json"), ("gpqa", "gpqa.csv"))}
    for task, rows in (("gsm8k", GSM8K), ("math", MATH), ("svamp", SVAMP), ("csqa", CSQA)):
        with open(paths[task], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(paths["strategyqa"], "w") as f:
        json.dump(STRATEGYQA, f)
    with open(paths["gpqa"], "w", newline="") as f:
        csv.writer(f).writerows([GPQA_HEADER] + GPQA)
    return paths


@pytest.fixture
def student_dir(tmp_path, tiny_tokenizer_dir):
    """A random tiny Qwen2 student whose vocabulary covers the tiny tokenizer, with its tokenizer files."""
    vocab = tokenizer.Tokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    path = str(tmp_path / "student")
    random_model(tiny_config(vocab_size=vocab)).save_pretrained(path)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), path)
    return path


class FakeGenerate:
    """Stands in for model.generate: answers each prompt with a scripted text, then the stop token."""

    def __init__(self, tok, script, fail_after=None):
        self.tok, self.script, self.fail_after, self.seen = tok, script, fail_after, []

    def __call__(self, model, prompts, max_new_tokens, eos_ids):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise KeyboardInterrupt  # as a kill between two batches
        self.seen += [tuple(p) for p in prompts]
        return [self.tok.encode(self.script[tuple(p)]) + [self.tok.eot_id] for p in prompts]


def scripted(tok, items, right):
    """Prompt ids -> a reply that states the gold answer for items whose index is in `right`."""
    script = {}
    for i, it in enumerate(items):
        answer = {"math": f"\\boxed{{{it['answer']}}}"}.get(it["task"], it["answer"]) if i in right else "I cannot tell."
        script[tuple(ev.chat_prompt(tok, it["prompt"])[1])] = f"Let me think. The answer is {answer}."
    return script


@pytest.mark.parametrize("task", ["gsm8k", "math", "svamp", "csqa", "strategyqa", "gpqa"])
def test_accuracy_and_sem_on_known_outputs(tmp_path, monkeypatch, task, student_dir):
    model, tok = lora.load_student(student_dir)
    items = data.load_benchmark(task, write_benchmarks(str(tmp_path))[task])
    right = {0} if len(items) == 2 else {0, 2}
    monkeypatch.setattr(ev, "generate", FakeGenerate(tok, scripted(tok, items, right)))
    out = str(tmp_path / "preds.jsonl")
    records = ev.evaluate(model, tok, items, out, batch_size=2)
    assert [r["id"] for r in records] == [it["id"] for it in items]
    assert [r["correct"] for r in records] == [i in right for i in range(len(items))]
    n, p, sem = ev.accuracy_sem([r["correct"] for r in records])
    assert (n, p) == (len(items), len(right) / len(items))
    assert sem == pytest.approx(math.sqrt(p * (1 - p) / n))
    first = records[0]
    assert first["prompt"] == tok.render_chat([{"role": "user", "content": items[0]["prompt"]}])
    assert first["output"].endswith(".") and "<|im_end|>" not in first["output"]  # stop token dropped
    assert first["gold"] == items[0]["answer"] and first["stopped"]
    assert [json.loads(line)["id"] for line in open(out)] == [it["id"] for it in items]


def test_real_benchmark_files_load_and_score(tmp_path, monkeypatch, benchmarks_dir, student_dir):
    model, tok = lora.load_student(student_dir)
    for task, name in (("gsm8k", "gsm8k_test.jsonl"), ("math", "math500_test.jsonl"), ("svamp", "svamp_test.jsonl")):
        items = data.load_benchmark(task, os.path.join(benchmarks_dir, name))[:4]
        monkeypatch.setattr(ev, "generate", FakeGenerate(tok, scripted(tok, items, {1, 2, 3})))
        records = ev.evaluate(model, tok, items, str(tmp_path / f"{task}.jsonl"), batch_size=3)
        assert [r["correct"] for r in records] == [False, True, True, True], task


def test_resume_after_kill_and_torn_line(tmp_path, monkeypatch, student_dir):
    model, tok = lora.load_student(student_dir)
    items = data.load_benchmark("csqa", write_benchmarks(str(tmp_path))["csqa"])
    items += [{**it, "id": f"x{i}"} for i, it in enumerate(data.load_benchmark("gsm8k", str(tmp_path / "gsm8k.jsonl")))]
    script = scripted(tok, items, set(range(len(items))))
    out = str(tmp_path / "preds.jsonl")
    killed = FakeGenerate(tok, script, fail_after=2)  # dies before its second batch of two
    monkeypatch.setattr(ev, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, tok, items, out, batch_size=2)
    kept = [json.loads(line)["id"] for line in open(out)]
    assert len(kept) == 2
    with open(out, "a") as f:
        f.write('{"id": "x3", "prompt": "torn by a ki')  # a write cut off mid-line
    rerun = FakeGenerate(tok, script)
    monkeypatch.setattr(ev, "generate", rerun)
    records = ev.evaluate(model, tok, items, out, batch_size=2)
    assert len(rerun.seen) == len(items) - 2  # only the rest, the torn item included
    assert not set(rerun.seen) & set(killed.seen)
    assert [r["id"] for r in records] == [it["id"] for it in items] and all(r["correct"] for r in records)
    assert [json.loads(line)["id"] for line in open(out)] == [it["id"] for it in items]
    assert ev.evaluate(model, tok, items, out) == records  # nothing left to do


def test_cli_end_to_end_and_torchrun_sharding(tmp_path, capsys, student_dir):
    """Two tasks on a real tiny model; then the same under two gloo ranks gives the same predictions."""
    paths = write_benchmarks(str(tmp_path))
    common = ["accuracy", "--model", student_dir, "--task", "gsm8k", "--data", paths["gsm8k"], "--task", "csqa",
              "--data", paths["csqa"], "--limit", "3", "--max-new-tokens", "5", "--batch-size", "2", "--device", "cpu"]
    ev.main(common + ["--out", str(tmp_path / "one" / "preds.jsonl")])
    single = capsys.readouterr()
    assert "items/s" in single.err and "eta" in single.err
    lines = single.out.strip().splitlines()
    assert lines[0].split() == ["task", "n", "accuracy", "±", "SEM"]
    assert [line.split()[:2] for line in lines[1:]] == [["gsm8k", "3"], ["csqa", "3"]]
    summary = json.load(open(tmp_path / "one" / "preds.summary.json"))
    assert [r["task"] for r in summary["results"]] == ["gsm8k", "csqa"] and summary["settings"]["max_new_tokens"] == 5
    ev.main(common + ["--out", str(tmp_path / "one" / "preds.jsonl")])  # all done: the same table, nothing generated
    again = capsys.readouterr()
    assert again.out == single.out and "items/s" not in again.err
    with pytest.raises(SystemExit) as e:  # other generation settings may not mix into the same predictions
        ev.main(common[:common.index("--max-new-tokens")] + ["--max-new-tokens", "6",
                                                             "--out", str(tmp_path / "one" / "preds.jsonl")])
    assert e.value.code == 2 and "another max_new_tokens" in capsys.readouterr().err

    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *common, "--out",
                               str(tmp_path / "two" / "preds.jsonl")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "RANK": str(r),
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == single.out and outs[1][0] == ""  # rank 0 alone prints the table
    for task in ("gsm8k", "csqa"):
        one = [json.loads(line) for line in open(tmp_path / "one" / f"preds-{task}.jsonl")]
        two = [json.loads(line) for line in open(tmp_path / "two" / f"preds-{task}.jsonl")]
        assert len(one) == 3 and two == one
    assert not list((tmp_path / "two").glob("*.part*"))


def test_bad_input_exits_2_naming_the_flag(tmp_path, capsys, student_dir):
    paths = write_benchmarks(str(tmp_path))
    cases = [(["--task", "gsm8k", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
             (["--task", "gsm8k", "--data", paths["gsm8k"], "--task", "csqa"], "--task given 2 times"),
             (["--task", "gsm9k", "--data", paths["gsm8k"]], "--task gsm9k"),
             (["--task", "csqa", "--data", paths["gsm8k"]], "gsm8k.jsonl:1"),
             (["--task", "gsm8k", "--data", paths["gsm8k"], "--batch-size", "0"], "--batch-size")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["accuracy", "--model", student_dir, *args, "--out", str(tmp_path / "p.jsonl")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, (args, err)
    with pytest.raises(SystemExit) as e:
        ev.main(["weights", str(tmp_path)])
    assert e.value.code == 2 and "metrics.jsonl" in capsys.readouterr().err


# --- PCA shift ---

def test_pca_shift_reads_a_known_move():
    """Moving every state by c·v1 + e·v2 shows as |c| on PC1 and |e| on PC2."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 40, 8, generator=g) * torch.tensor([5.0, 3.0, 1, 1, 1, 1, 1, 1])
    _, _, vh = torch.linalg.svd(base[0].double() - base[0].double().mean(0), full_matrices=False)
    move = (0.7 * vh[0] - 0.2 * vh[1]).float()
    rows = ev.pca_shift(base, base + move)
    assert rows[0]["pc1"] == pytest.approx(0.7, abs=1e-5) and rows[0]["pc2"] == pytest.approx(0.2, abs=1e-5)
    assert rows[0]["full"] == pytest.approx(float(move.norm()), abs=1e-5)
    assert rows[0]["var_pc1"] > rows[0]["var_pc2"]


def test_pca_shift_zero_for_identity_adapter_positive_after_a_change(tmp_path, student_dir):
    paths = write_benchmarks(str(tmp_path))
    model = Transformer.from_pretrained(student_dir, dtype=torch.float32)
    apply_lora(model, rank=4, alpha=8)
    save_adapter(model, str(tmp_path / "identity"))  # B = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "changed"))
    results = {}
    for name in ("identity", "changed", "changed"):  # twice: a LoRA dropout left on would differ
        ev.main(["pca-shift", "--model", student_dir, "--adapter", str(tmp_path / name), "--task", "csqa",
                 "--data", paths["csqa"], "--out", str(tmp_path / f"pca-{name}"), "--device", "cpu"])
        layers = json.load(open(tmp_path / f"pca-{name}" / "pca_shift.json"))["layers"]
        assert results.setdefault(name, layers) == layers
        assert os.path.isfile(tmp_path / f"pca-{name}" / "pca_shift.png")
    n_layers = tiny_config()["num_hidden_layers"]
    assert [r["layer"] for r in results["identity"]] == list(range(1, n_layers + 1))
    assert all(r[k] == 0 for r in results["identity"] for k in ("pc1", "pc2", "full"))
    assert all(r["full"] > 0 and r["pc1"] + r["pc2"] > 0 for r in results["changed"])


# --- the information-gain trace ---

MULTI = {"id": "q1", "question": "Tom has 5 apples. He gets 7 more. How many apples now?", "answer": "12",
         "task": "gsm8k", "rationales": [{"teacher": "verbose", "text": "Okay, so first 5 + 7 = 12. Wait, let me check. Therefore 12."},
                                         {"teacher": "concise", "text": "5 + 7 = 12."}]}


def per_prefix_information(model, tok, inst, teacher):
    """The slow reference: I_t = Σ_j log p(y_j | prompt, r_≤t, cue, y_<j), one forward per prefix."""
    prompt = tok.encode_chat([{"role": "user", "content": data.user_prompt(inst.question, inst.task)}])
    r = tok.encode(dict(inst.rationales)[teacher].strip())
    cue, y = tok.encode(data.answer_cue(inst.task)[0]), tok.encode(inst.answer)
    info = []
    for t in range(len(r) + 1):
        ids = torch.tensor([prompt + r[:t] + cue + y])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0].float(), -1)
        start = len(prompt) + t + len(cue)
        info.append(sum(logp[start + j - 1, y[j]] for j in range(len(y))))
    return torch.stack(info)


def test_mi_trace_equals_per_prefix_loop_and_the_scorer(tmp_path, student_dir):
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(MULTI) + "\n")
    inst = data.load_multi_teacher(str(path))[0]
    model, tok = lora.load_student(student_dir)
    info, think, tokens = ev.information_trace(model, tok, inst, "verbose", chunk=5)  # chunks change nothing
    torch.testing.assert_close(info, per_prefix_information(model, tok, inst, "verbose"), atol=1e-5, rtol=1e-5)
    assert "".join(tokens) == dict(inst.rationales)["verbose"] and think[0] and think.sum() >= 4

    # compact.py's scorer at stride 1 is (1/|R|) Σ m_t max(ΔI_t, 0) over these very gains.
    cfg = CompactConfig(mi_budget=0)
    teachers = data.teacher_names([inst])
    batch = data.collate([data.encode_instance(inst, tok, teachers, 10**9)], tok.pad_id)
    B, K, T = batch["input_ids"].shape
    with torch.no_grad():
        _, aux = model(batch["input_ids"].view(B * K, T), return_hidden=True, return_aux=True)
        s_mi = adaptability_scores(model, aux.kv, batch, cfg)[batch["teacher"] == teachers.index("verbose")][0]
    m = torch.where(think, cfg.think_weight, cfg.other_weight)
    torch.testing.assert_close(s_mi, (m * (info[1:] - info[:-1]).clamp(min=0)).mean(), atol=1e-6, rtol=1e-5)

    # The CLI: before and after an adapter, one CSV row per rationale token.
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "adapter"))
    ev.main(["mi-trace", "--model", student_dir, "--adapter", str(tmp_path / "adapter"), "--data", str(path),
             "--id", "q1", "--teacher", "verbose", "--out", str(tmp_path / "trace"), "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "trace" / "trace.csv", encoding="utf-8")))
    assert list(rows[0]) == ["t", "token", "is_thinking", "I_t", "delta_I", "I_t_after", "delta_I_after"]
    assert len(rows) == len(tokens) and [r["token"] for r in rows] == tokens
    torch.testing.assert_close(torch.tensor([float(r["I_t"]) for r in rows]), info[1:])
    assert any(abs(float(r["I_t_after"]) - float(r["I_t"])) > 1e-4 for r in rows)
    distilled, _ = lora.load_student(student_dir, str(tmp_path / "adapter"))  # the adapter's dropout is off in eval
    after, _, _ = ev.information_trace(distilled, tok, inst, "verbose")
    torch.testing.assert_close(torch.tensor([float(r["I_t_after"]) for r in rows]), after[1:])
    assert os.path.isfile(tmp_path / "trace" / "trace.png")


# --- teacher weight dynamics ---

def test_weights_table_and_plot_from_metrics(tmp_path, capsys):
    """A metrics.jsonl in train.py's documented format (TRAIN_OUTPUT.md), ending in a torn line."""
    rows = []
    for step in range(1, 9):
        teachers = {"concise": {"weight": 0.1 * step, "s_mi": 0.01, "s_g": 1.0, "s_d": 2.0, "n": 2}}
        if step != 1:  # a teacher absent from a step is absent from its dict
            teachers["verbose"] = {"weight": 1 - 0.1 * step, "s_mi": 0.03, "s_g": 0.5, "s_d": 3.0, "n": 1 + step % 2}
        rows.append({"step": step, "epoch": step / 8, "loss": 1.0, "sft": 1.0, "mcon": 0.1, "lr": 1e-4, "grad_norm": 1.0,
                     "tokens_per_s": 1.0, "instances": 2, "time": float(step), "teachers": teachers})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "los')
    ev.main(["weights", str(tmp_path)])
    assert os.path.isfile(tmp_path / "weights.png")
    got = json.load(open(tmp_path / "weights.json"))["teachers"]
    assert got["concise"]["weight_first"] == pytest.approx(0.15) and got["concise"]["weight_last"] == pytest.approx(0.75)
    assert got["verbose"]["weight_first"] == pytest.approx(0.8)  # step 2 only
    assert got["verbose"]["weight_last"] == pytest.approx((0.3 * 2 + 0.2 * 1) / 3)  # steps 7 and 8, weighted by n
    assert got["verbose"]["s_d"] == pytest.approx(3.0) and got["concise"]["s_g"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "8 steps" in out and "concise" in out and "verbose" in out


def test_weights_from_a_real_training_run(tmp_path, student_dir):
    train = pytest.importorskip("train")
    demo.synth_pool(str(tmp_path / "pool"), n_train=8, n_test=1)
    cfg = train.TrainConfig(model=student_dir, data=str(tmp_path / "pool" / "train.jsonl"), out=str(tmp_path / "run"),
                            max_steps=3, batch_size=2, grad_accum=1, max_len=256, save_every=0, lora_rank=2)
    train.train(cfg, CompactConfig(mi_budget=12))
    dyn = ev.main(["weights", str(tmp_path / "run")])
    assert sorted(dyn) == sorted(demo.POOLS["premise"]) and os.path.isfile(tmp_path / "run" / "weights.png")
    assert all(len(d["steps"]) <= 3 and 0 < d["weight_first"] < 1 for d in dyn.values())


# --- teacher rationales ---

def test_rationales_are_deterministic_per_question_and_sample_and_resume_exactly(tmp_path, capsys, student_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples{'!' * i}. How many?",
                                             "answer": str(i)}) + "\n" for i in range(3)))
    common = ["rationales", "--model", student_dir, "--questions", str(questions), "--task", "gsm8k", "--samples", "2",
              "--temperature", "1.0", "--max-new-tokens", "6", "--device", "cpu"]
    ev.main(common + ["--batch-size", "4", "--out", str(tmp_path / "a" / "qwq.jsonl")])
    a = [json.loads(line) for line in open(tmp_path / "a" / "qwq.jsonl")]
    assert [(r["id"], r["sample"]) for r in a] == [(f"q{i}", s) for i in range(3) for s in range(2)]
    assert {"question", "answer", "task", "text", "extracted", "correct", "new_tokens", "stopped"} <= set(a[0])
    assert a[0]["text"] != a[1]["text"]  # two samples of one question differ
    assert [json.loads(line)["id"] for line in open(tmp_path / "a" / "qwq.questions.jsonl")] == ["q0", "q1", "q2"]
    assert "questions 3 | samples 6" in capsys.readouterr().out
    ev.main(common + ["--batch-size", "1", "--out", str(tmp_path / "b" / "qwq.jsonl")])  # other batches: same samples
    assert [json.loads(line) for line in open(tmp_path / "b" / "qwq.jsonl")] == a
    with open(tmp_path / "b" / "qwq.jsonl", "w") as f:  # killed after two records, mid-way through a third
        f.write("".join(json.dumps(r) + "\n" for r in a[:2]) + json.dumps(a[2])[:20])
    ev.main(common + ["--batch-size", "3", "--out", str(tmp_path / "b" / "qwq.jsonl")])
    assert [json.loads(line) for line in open(tmp_path / "b" / "qwq.jsonl")] == a
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another seed may not mix into the same file
        ev.main(common + ["--seed", "1", "--out", str(tmp_path / "b" / "qwq.jsonl")])
    assert e.value.code == 2 and "another seed" in capsys.readouterr().err


def test_rationales_bad_input_exits_2(tmp_path, capsys, student_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"id": "q0", "question": "Q?", "answer": "1"}\n{"id": "q0", "question": "R?", "answer": "2"}\n')
    gsm8k = write_benchmarks(str(tmp_path))["gsm8k"]
    cases = [(["--questions", str(questions), "--task", "gsm8k"], "q.jsonl:2: duplicate id 'q0'"),
             (["--questions", str(questions), "--data", gsm8k, "--task", "gsm8k"], "give --questions FILE, or --task"),
             (["--data", gsm8k], "give --questions FILE, or --task"),
             (["--data", gsm8k, "--task", "gsm8k", "--temperature", "0"], "greedy samples are all the same"),
             (["--data", gsm8k, "--task", "gsm8k", "--top-p", "0"], "--top-p 0.0"),
             (["--data", gsm8k, "--task", "gsm9k"], "--task gsm9k: unknown")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["rationales", "--model", student_dir, "--device", "cpu", *args, "--out", str(tmp_path / "r.jsonl")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, (args, err)
    assert not os.path.exists(tmp_path / "r.jsonl")


# --- Table 1 ---

def write_accuracy_output(out, correct):
    """What eval.py accuracy writes for {task: [0/1 per item]}: OUT-STEM-TASK.jsonl and OUT-STEM.summary.json."""
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    results = []
    for task, scores in correct.items():
        with open(f"{stem}-{task}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"{task}-{i}", "correct": bool(c)}) + "\n" for i, c in enumerate(scores))
        results.append({"task": task, "n": len(scores), "predictions": f"{stem}-{task}.jsonl"})
    with open(stem + ".summary.json", "w") as f:
        json.dump({"settings": {}, "results": results}, f)


def test_table_accuracy_gains_and_sems_by_hand(tmp_path, capsys):
    base = str(tmp_path / "base" / "preds.jsonl")
    write_accuracy_output(base, {"gsm8k": [1, 0, 0, 1], "svamp": [0, 0], "csqa": [1, 0]})
    write_accuracy_output(str(tmp_path / "c0" / "preds.jsonl"), {"gsm8k": [1, 1, 0, 1], "svamp": [1, 0], "csqa": [1, 1]})
    write_accuracy_output(str(tmp_path / "c1" / "preds.jsonl"), {"gsm8k": [1, 0, 1, 0], "svamp": [1, 0], "csqa": [0, 1]})
    ev.main(["table", "--run", f"base={base}", "--run", f"compact={tmp_path / 'c0'},{tmp_path / 'c1' / 'preds.summary.json'}",
             "--out", str(tmp_path / "table")])
    t = json.load(open(tmp_path / "table" / "table.json"))
    assert t["tasks"] == ["gsm8k", "svamp", "csqa"] and t["baseline"] == "base"
    b, c = t["runs"]["base"], t["runs"]["compact"]
    approx = lambda d: pytest.approx(d, abs=1e-6)
    # base, one seed: the binomial SEM sqrt(p(1-p)/n); no seed SEM
    assert b["benchmarks"]["gsm8k"] == approx({"n": 4, "accuracy": 0.5, "sem_items": 0.25, "sem_seeds": None})
    assert b["benchmarks"]["csqa"] == approx({"n": 2, "accuracy": 0.5, "sem_items": math.sqrt(0.125), "sem_seeds": None})
    assert b["gains"] == {}
    # compact gsm8k: seeds 0.75, 0.5; item means 1, .5, .5, .5 (mean .625): sqrt(.1875)/4; seed SEM stdev(.75, .5)/√2
    assert c["benchmarks"]["gsm8k"] == approx({"n": 4, "accuracy": 0.625, "sem_items": math.sqrt(0.1875) / 4,
                                               "sem_seeds": 0.125})
    assert c["benchmarks"]["svamp"] == approx({"n": 2, "accuracy": 0.5, "sem_items": math.sqrt(0.5) / 2, "sem_seeds": 0.0})
    assert c["benchmarks"]["csqa"] == approx({"n": 2, "accuracy": 0.75, "sem_items": math.sqrt(0.125) / 2, "sem_seeds": 0.25})
    # ID gain: mean(.625 − .5, .5 − 0) = .3125; per seed .375 and .25 -> SEM .0625; paired items: gsm8k
    # d = 0, .5, .5, −.5 -> sqrt(.6875)/4, svamp d = 1, 0 -> sqrt(.5)/2, in quadrature over the 2 benchmarks
    ident = c["gains"]["in-distribution"]
    assert ident["benchmarks"] == ["gsm8k", "svamp"]
    assert {k: ident[k] for k in ("gain", "sem_items", "sem_seeds")} == approx(
        {"gain": 0.3125, "sem_items": math.sqrt(0.6875 / 16 + 0.5 / 4) / 2, "sem_seeds": 0.0625})
    # OOD: csqa alone: .75 − .5; per seed .5, 0 -> .25; d = −.5, 1 -> sqrt(1.125)/2
    ood = c["gains"]["out-of-distribution"]
    assert {k: ood[k] for k in ("gain", "sem_items", "sem_seeds")} == approx(
        {"gain": 0.25, "sem_items": math.sqrt(1.125) / 2, "sem_seeds": 0.25})
    md = capsys.readouterr().out
    assert md == open(tmp_path / "table" / "table.md").read()
    lines = md.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "run", "seeds", "GSM8K", "SVAMP", "in-distribution avg gain", "CommonsenseQA", "out-of-distribution avg gain"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "base", "1", "50.00 ± 25.00", "0.00 ± 0.00", "—", "50.00 ± 35.36", "—"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == [
        "compact", "2", "62.50 ± 10.83 ± 12.50", "50.00 ± 35.36 ± 0.00", "+31.25 ± 20.49 ± 6.25",
        "75.00 ± 17.68 ± 25.00", "+25.00 ± 53.03 ± 25.00"]


def test_table_bad_input_exits_2(tmp_path, capsys):
    base = str(tmp_path / "base" / "preds.jsonl")
    write_accuracy_output(base, {"gsm8k": [1, 0]})
    write_accuracy_output(str(tmp_path / "other" / "preds.jsonl"), {"gsm8k": [1, 0, 1]})
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "gsm8k.jsonl").write_text('{"id": "a", "correct": true}\n{"id": "b"}\n')
    (tmp_path / "running.summary.json").write_text('{"settings": {}, "results": null}')
    cases = [(["--run", "base"], "expected NAME=PATH"),
             (["--run", f"base={base}", "--run", f"base={base}"], "each NAME once"),
             (["--run", f"base={tmp_path / 'nothing'}"], "no eval.py accuracy output"),
             (["--run", f"base={tmp_path / 'running.summary.json'}"], "has not finished"),
             (["--run", f"base={tmp_path / 'torn' / 'gsm8k.jsonl'}"], "gsm8k.jsonl:2: not a prediction record"),
             (["--run", f"base={base},{tmp_path / 'other'}"], "--run base gsm8k: the seeds' prediction files hold"),
             (["--run", f"base={base}", "--run", f"x={tmp_path / 'other'}"], "gsm8k predictions of different items"),
             (["--run", f"base={base}", "--baseline", "nope"], "--baseline nope")]
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["table", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, (args, err)
