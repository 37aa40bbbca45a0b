"""analysis.py on finished outputs and tiny random students: Table 1 by hand, PCA shift, the information-gain
trace against a per-prefix loop and compact.py's scorer, weight dynamics, the score command."""
import csv
import json
import math
import os
from functools import partial

import pytest
import torch

import analysis
import data
import demo
import eval as ev
from compact import (CompactConfig, adaptability_scores, packed_forward, probe_information,
                     rationale_view)
from conftest import tiny_config
from lora import apply_lora, save_adapter
from model import Transformer
from test_eval import write_benchmarks


# --- PCA shift ---

def test_pca_shift_reads_a_known_move():
    """Moving every state by c·v1 + e·v2 shows as |c| on PC1 and |e| on PC2."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 40, 8, generator=g) * torch.tensor([5.0, 3.0, 1, 1, 1, 1, 1, 1])
    _, _, vh = torch.linalg.svd(base[0].double() - base[0].double().mean(0), full_matrices=False)
    move = (0.7 * vh[0] - 0.2 * vh[1]).float()
    rows = analysis.pca_shift(base, base + move)
    assert rows[0]["pc1"] == pytest.approx(0.7, abs=1e-5) and rows[0]["pc2"] == pytest.approx(0.2, abs=1e-5)
    assert rows[0]["full"] == pytest.approx(float(move.norm()), abs=1e-5)
    assert rows[0]["var_pc1"] > rows[0]["var_pc2"]


def test_pooled_states_equal_each_prompt_alone(student_dir):
    """Batched prompts of different lengths pool their real tokens only: as each prompt alone."""
    model, tok = ev.load_student(student_dir)
    prompts = [tok.encode("Tom has 5 apples."), tok.encode("So"), tok.encode("First, 3 + 4 = 7. Wait.")]
    alone = torch.cat([analysis.pooled_states(model, [p]) for p in prompts], dim=1)
    torch.testing.assert_close(analysis.pooled_states(model, prompts, batch_size=3), alone)


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
        analysis.main(["pca-shift", "--model", student_dir, "--adapter", str(tmp_path / name), "--task", "csqa",
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


def test_mi_trace_equals_per_prefix_loop_and_the_scorer(tmp_path, student_dir, monkeypatch):
    import compact
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(MULTI) + "\n")
    inst = data.load_multi_teacher(str(path))[0]
    model, tok = ev.load_student(student_dir)
    info, think, tokens, s_trace = analysis.information_trace(model, tok, inst, "verbose")
    torch.testing.assert_close(info, per_prefix_information(model, tok, inst, "verbose"), atol=1e-5, rtol=1e-5)
    assert "".join(tokens) == dict(inst.rationales)["verbose"] and think[0] and think.sum() >= 4
    monkeypatch.setattr(compact, "PROBE_QUERIES", 12)  # the blocks split over many segments: the same I
    torch.testing.assert_close(analysis.information_trace(model, tok, inst, "verbose")[0], info, atol=1e-6, rtol=0)
    monkeypatch.undo()

    # compact.py's scorer at stride 1 is Σ m_t max(ΔI_t, 0) over these very gains.
    cfg = CompactConfig(mi_budget=0)
    teachers = data.teacher_names([inst])
    batch = data.collate([data.encode_instance(inst, tok, teachers, 10**9)])
    with torch.no_grad():
        _, aux = packed_forward(model, batch, return_hidden=True, return_aux=True)
        verbose = batch["teacher"].flatten()[batch["slot"]] == teachers.index("verbose")
        probe = partial(probe_information, model, aux.kv, batch)
        s_mi = adaptability_scores(probe, *rationale_view(batch), cfg)[verbose][0]
    m = torch.where(think, cfg.think_weight, cfg.other_weight)
    torch.testing.assert_close(s_mi, (m * (info[1:] - info[:-1]).clamp(min=0)).sum(), atol=1e-6, rtol=1e-5)
    assert s_trace == pytest.approx(float(s_mi), abs=1e-6)  # the trace's summary is compact's own estimate

    # The CLI: before and after an adapter, one CSV row per rationale token.
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, str(tmp_path / "adapter"))
    analysis.main(["mi-trace", "--model", student_dir, "--adapter", str(tmp_path / "adapter"), "--data", str(path),
             "--id", "q1", "--teacher", "verbose", "--out", str(tmp_path / "trace"), "--device", "cpu"])
    rows = list(csv.DictReader(open(tmp_path / "trace" / "trace.csv", encoding="utf-8")))
    assert list(rows[0]) == ["t", "token", "is_thinking", "I_t", "delta_I", "I_t_after", "delta_I_after"]
    assert len(rows) == len(tokens) and [r["token"] for r in rows] == tokens
    torch.testing.assert_close(torch.tensor([float(r["I_t"]) for r in rows]), info[1:])
    assert any(abs(float(r["I_t_after"]) - float(r["I_t"])) > 1e-4 for r in rows)
    distilled, _ = ev.load_student(student_dir, str(tmp_path / "adapter"))  # the adapter's dropout is off in eval
    after, *_ = analysis.information_trace(distilled, tok, inst, "verbose")
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
    analysis.main(["weights", str(tmp_path)])
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
    dyn = analysis.main(["weights", str(tmp_path / "run")])
    assert sorted(dyn) == sorted(demo.POOLS["premise"]) and os.path.isfile(tmp_path / "run" / "weights.png")
    assert all(len(d["steps"]) <= 3 and 0 < d["weight_first"] < 1 for d in dyn.values())


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
    analysis.main(["table", "--run", f"base={base}", "--run", f"compact={tmp_path / 'c0'},{tmp_path / 'c1' / 'preds.summary.json'}",
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


def test_table_gains_only_over_groups_both_runs_hold():
    runs = {"base": [{"gsm8k": {"a": 1, "b": 0}, "svamp": {"c": 0}, "csqa": {"d": 1}}],
            "part": [{"gsm8k": {"a": 1, "b": 1}, "csqa": {"d": 0}}]}  # no svamp: no in-distribution gain
    t = analysis.table1(runs, "base")
    assert list(t["runs"]["part"]["gains"]) == ["out-of-distribution"]
    assert t["runs"]["part"]["gains"]["out-of-distribution"]["gain"] == pytest.approx(-1.0)


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
            analysis.main(["table", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, (args, err)


# --- the score command ---

def test_score_cli(tmp_path, tiny_tokenizer_dir, capsys):
    import json
    import os
    import shutil

    import analysis
    import tokenizer
    import demo
    from conftest import random_model, tiny_config

    model_dir = str(tmp_path / "student")
    random_model(tiny_config(vocab_size=tokenizer.Tokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size)).save_pretrained(model_dir)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), model_dir)
    demo.synth_pool(str(tmp_path / "pool"), n_train=3, n_test=1)
    out = str(tmp_path / "scores.jsonl")
    analysis.main(["score", "--model", model_dir, "--data", str(tmp_path / "pool" / "train.jsonl"), "--out", out,
                  "--batch-size", "2", "--mi-budget", "10"])
    rows = [json.loads(line) for line in open(out)]
    teachers = sorted({r["teacher"] for r in rows})
    assert len(rows) == 3 * len(teachers) and set(rows[0]) == {"id", "teacher", "s_mi", "s_g", "s_d", "weight"}
    for i in {r["id"] for r in rows}:
        assert abs(sum(r["weight"] for r in rows if r["id"] == i) - 1) < 1e-5
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["teacher", "n", "weight", "s_mi", "s_g", "s_d", "top", "dropped"]
    assert [line.split()[0] for line in table[1:]] == teachers
    assert sum(int(line.split()[-2]) for line in table[1:]) == 3  # one top teacher per instance

    with pytest.raises(SystemExit) as e:  # bad input: a message and exit 2, no traceback
        analysis.main(["score", "--model", str(tmp_path / "nowhere"), "--data", out, "--out", out])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        analysis.main(["score", "--model", model_dir, "--data", str(tmp_path / "missing.jsonl"), "--out", out])
    assert e.value.code == 2


# --- what each score catches ---

def test_within_instance_auroc_by_hand():
    # question 1: clean 0.9, 0.2 against flawed 0.5 -> 1 + 0 of 2; question 2: a tie (½) and a win (1)
    groups = [[(0.9, False), (0.5, True), (0.2, False)], [(0.4, False), (0.4, True), (0.1, True)], [(0.3, False)]]
    assert analysis.within_auroc(groups) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert analysis.within_auroc(groups, higher=False) == pytest.approx((0 + 1 + 0.5 + 0) / 4)  # S_D: lower is better
    assert analysis.within_auroc([[(1.0, False)], [(0.0, True)]]) is None  # no question holds both


def test_auroc_standard_error_by_hand():
    # pairs won 1/1, 0/1, 1/2 (AUROC 2/4); leaving each out: 1/3, 2/3, 1/2, mean 1/2, squares 1/36 + 1/36 + 0
    groups = [[(0.9, False), (0.1, True)], [(0.2, False), (0.8, True)], [(0.5, False), (0.4, True), (0.6, True)],
              [(0.3, False)]]  # no pair: left out
    assert analysis.auroc_se(groups) == pytest.approx(((3 - 1) / 3 * 2 / 36) ** 0.5)  # = 1/√27
    assert analysis.auroc_se(groups[:1]) is None


def test_gsm8k_flaw_set_labels_match_the_rationales(benchmarks_dir):
    import re
    for inst in analysis.gsm8k_flaw_set(os.path.join(benchmarks_dir, "gsm8k_test.jsonl"), 30):
        r = dict(inst.rationales)
        assert inst.flaws == {"carried": "hallucination", "terse": "filler"} and "<<" not in r["human"]
        nums = lambda t: re.findall(r"\d[\d,.]*\d|\d", t)
        a, b = nums(r["human"]), nums(r["carried"])
        assert len(a) == len(b) and a != b and a[-1] == b[-1]  # numbers changed, the final answer kept
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert len({x for x, y in zip(a, b) if x != y}) == 1 and b[first] not in a[first:first + 1]  # one value, carried
        assert data.extract_answer(r["human"] + "\n#### " + inst.answer, "gsm8k") == inst.answer
        assert not re.search(r"[-+*/=]", r["terse"]) and r["terse"].endswith(f"{inst.answer}.")


def test_gsm8k_flaw_set_carries_a_thousands_value_and_keeps_the_final_answer(tmp_path):
    import re
    row = {"question": "Ann has 3 jars of 400 cents. How many dollars?", "answer":
           "3*400=<<3*400=1200>>1,200 cents. 1,200/100=<<1200/100=12>>12. She keeps 12*1=<<12*1=12>>12.\n#### 12"}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    for seed in range(4):
        inst = analysis.gsm8k_flaw_set(str(tmp_path / "g.jsonl"), 1, seed)[0]
        r = dict(inst.rationales)
        changed = sorted(set(re.findall(r"\d[\d,]*", r["carried"])) - set(re.findall(r"\d[\d,]*", r["human"])))
        assert len(changed) == 1 and r["carried"].endswith(".") and r["carried"].endswith("=12.")
        if "1,200" not in r["carried"]:  # the thousands value changed: written as it was, with commas
            assert changed[0] == f"{int(changed[0].replace(',', '')):,}" and r["carried"].count(changed[0]) == 2


def test_readings_command_writes_every_reading_for_each_set(tmp_path, student_dir, capsys):
    rows = [{"id": f"q{i}", "question": f"What is {i} + 3?", "answer": str(i + 3), "rationales": [
        {"teacher": "a", "text": f"So {i} + 3 = {i + 3}."}, {"teacher": "b", "text": f"First, {i} + 3 = {i + 4}.",
                                                            "flaw": "hallucination"},
        {"teacher": "c", "text": "Hmm, okay, so.", "flaw": "filler" if i % 2 else None}]} for i in range(5)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "readings"
    sets = analysis.main(["readings", "--set", f"pool={student_dir}:{tmp_path / 'pool.jsonl'}",
                          "--out", str(out), "--batch-size", "3", "--device", "cpu"])
    assert list(sets["pool"]) == list(analysis.READINGS)
    for reading, row in sets["pool"].items():
        assert all(row[k] is None or 0 <= row[k] <= 1 for k in analysis.HIGHER_IS_CLEAN), reading
    assert sets["pool"]["default"]["s_d"] is not None and sets["pool"]["default"]["weight/filler"] is not None
    same = ("S_G with self-loops", "S_G at the rationale mean", "temperature 2")
    assert all(sets["pool"][r]["s_d"] == sets["pool"]["default"]["s_d"] for r in same)  # S_D reads no flag
    assert sets["pool"]["temperature 2"]["weight"] is not None
    table = capsys.readouterr().out
    first, per_flaw = table.split("\n\n")[:2]
    assert table == (out / "readings.md").read_text() and first.count("\n| ") == len(analysis.READINGS) + 1
    assert per_flaw.count("\n| pool: ") == 2 and " ± " in first  # hallucination, filler; SEs shown
    with pytest.raises(SystemExit) as e:
        analysis.main(["readings", "--set", "nope", "--out", str(out)])
    assert e.value.code == 2
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        analysis.main(["readings", "--set", f"e={student_dir}:{tmp_path / 'empty.jsonl'}",
                       "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "empty.jsonl holds no lines" in err and "Traceback" not in err


def test_readings_shortcuts_equal_scoring_each_reading_in_full(tmp_path, student_dir):
    """reading_aurocs reuses one probe pass for every reading: its AUROCs equal those of scoring the instances
    under each reading's own CompactConfig (exact S_MI), rationales of different lengths included."""
    from compact import CompactConfig
    from analysis import rationale_scores, reading_aurocs, within_auroc
    from eval import load_student
    tok_model, tok = load_student(student_dir)
    insts = [data.Instance(f"q{i}", f"What is {i} + 2?", str(i + 2), None, [
        ("a", f"So {i} + 2 = {i + 2}, and then we check it twice: {i + 2}."), ("b", f"{i} + 2 = {i + 3}."),
        ("c", "Hmm.")], {"b": "hallucination", "c": "filler"} if i % 2 else {"b": "hallucination"}) for i in range(6)]
    readings = {k: analysis.READINGS[k] for k in ("default", "S_MI divided by its length (SPEC's Eq. 3)",
                                            "S_G at the last rationale token", "z-floor 0")}
    got = reading_aurocs(tok_model, tok, insts, 4, readings)
    encoded, info = data.encode_dataset(insts, tok, max_len=10**6)
    labels = [[i.flaws.get(info["teachers"][t]) is not None for t in e.teacher] for i, e in zip(insts, encoded)]
    for name, kw in readings.items():
        full = rationale_scores(tok_model, encoded, CompactConfig(mi_budget=0, **kw), 4)
        for k, up in analysis.HIGHER_IS_CLEAN.items():
            want = within_auroc([list(zip(s[k], ls)) for s, ls in zip(full, labels)], up)
            assert got[name][k] == pytest.approx(want, abs=1e-9), (name, k)
