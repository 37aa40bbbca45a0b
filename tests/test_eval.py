"""eval.py on tiny random students: accuracy and its resume, torchrun sharding, teacher rationales."""
import csv
import json
import math
import os
import socket
import subprocess
import sys

import pytest

import data
import eval as ev
from conftest import ROOT

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
    model, tok = ev.load_student(student_dir)
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
    model, tok = ev.load_student(student_dir)
    for task, name in (("gsm8k", "gsm8k_test.jsonl"), ("math", "math500_test.jsonl"), ("svamp", "svamp_test.jsonl")):
        items = data.load_benchmark(task, os.path.join(benchmarks_dir, name))[:4]
        monkeypatch.setattr(ev, "generate", FakeGenerate(tok, scripted(tok, items, {1, 2, 3})))
        records = ev.evaluate(model, tok, items, str(tmp_path / f"{task}.jsonl"), batch_size=3)
        assert [r["correct"] for r in records] == [False, True, True, True], task


def test_resume_after_kill_and_torn_line(tmp_path, monkeypatch, student_dir):
    model, tok = ev.load_student(student_dir)
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
    import analysis
    with pytest.raises(SystemExit) as e:
        analysis.main(["weights", str(tmp_path)])
    assert e.value.code == 2 and "metrics.jsonl" in capsys.readouterr().err


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




# --- one run per output, no output over an input, predictions reused only where they belong ---

def test_predictions_are_redone_for_other_items_and_other_settings_are_refused(tmp_path, monkeypatch, capsys,
                                                                           student_dir):
    model, tok = ev.load_student(student_dir)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"  # the same count of items, so the same positional ids
    a.write_text("".join(json.dumps(r) + "\n" for r in GSM8K[:2]))
    b.write_text("".join(json.dumps(r) + "\n" for r in GSM8K[2:]))
    items = {p: data.load_benchmark("gsm8k", str(p)) for p in (a, b)}
    assert [it["id"] for it in items[a]] == [it["id"] for it in items[b]]
    fake = FakeGenerate(tok, {**scripted(tok, items[a], {0, 1}), **scripted(tok, items[b], {0, 1})})
    monkeypatch.setattr(ev, "generate", lambda model, prompts, max_new_tokens, eos_ids: fake(model, prompts, max_new_tokens,
                                                                                             eos_ids))
    common = ["accuracy", "--model", student_dir, "--task", "gsm8k", "--device", "cpu", "--out", str(tmp_path / "p.jsonl")]
    ev.main(common + ["--data", str(a)])
    ev.main(common + ["--data", str(b)])  # other data under the same ids: every prediction is made again
    assert len(fake.seen) == 4 and "2 record(s)" in capsys.readouterr().err
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert [r["gold"] for r in records] == [it["answer"] for it in items[b]] and all(r["correct"] for r in records)
    ev.main(common + ["--data", str(b)])
    assert len(fake.seen) == 4  # the same data and settings: nothing redone
    with pytest.raises(SystemExit) as e:
        ev.main(common + ["--data", str(b), "--dtype", "bfloat16"])
    assert e.value.code == 2 and "another dtype 'float32' → 'bfloat16'" in capsys.readouterr().err


def test_an_out_over_an_input_or_held_by_another_run_exits_2_and_writes_nothing(tmp_path, capsys, student_dir):
    import contextlib
    from common import lock_file
    paths = write_benchmarks(str(tmp_path))
    bench = open(paths["gsm8k"], "rb").read()
    common = ["accuracy", "--model", student_dir, "--task", "gsm8k", "--data", paths["gsm8k"], "--device", "cpu"]
    for out in (paths["gsm8k"], os.path.join(student_dir, "preds.jsonl")):
        with pytest.raises(SystemExit) as e:
            ev.main(common + ["--out", out])
        assert e.value.code == 2 and "would overwrite" in capsys.readouterr().err
    assert open(paths["gsm8k"], "rb").read() == bench and not os.path.exists(paths["gsm8k"] + ".lock")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q0", "question": "Q?", "answer": "1", "task": "gsm8k"}) + "\n")
    with pytest.raises(SystemExit) as e:  # rationales' OUT-STEM.questions.jsonl would replace its --questions
        ev.main(["rationales", "--model", student_dir, "--questions", str(questions), "--device", "cpu",
                 "--out", str(tmp_path / "q.jsonl")])
    assert e.value.code == 2 and "would overwrite --questions" in capsys.readouterr().err
    out = tmp_path / "run" / "p.jsonl"
    with contextlib.ExitStack() as held:
        assert lock_file(held, str(out) + ".lock") is None
        with pytest.raises(SystemExit) as e:
            ev.main(common + ["--out", str(out)])
    assert e.value.code == 2 and f"{out}: another run (pid {os.getpid()})" in capsys.readouterr().err
    assert os.listdir(out.parent) == ["p.jsonl.lock"]
