"""Multi-teacher format, branch batches (SPEC §9), sharding, benchmark loaders, the synthetic
pool and the CLI."""
import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import data
import tokenizer
import demo
from data import DataError, Instance


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return str(path)


def _row(i, **kw):
    row = {"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1), "task": "gsm8k",
           "rationales": [{"teacher": "a", "text": f"{i} + 1 = {i + 1}."}]}
    return {**row, **kw}


# ---- multi-teacher format ---------------------------------------------------------------

def test_load_multi_teacher_good(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_row(0), "", _row(1, answer=2, rationales=[
        {"teacher": "b", "text": "x", "flaw": "form"}, {"teacher": "a", "text": "y", "flaw": None}])])
    insts = data.load_multi_teacher(path)
    assert [i.id for i in insts] == ["q0", "q1"] and insts[1].answer == "2"
    assert insts[1].rationales == [("b", "x"), ("a", "y")]
    assert insts[0].flaws == {} and insts[1].flaws == {"b": "form"}  # an optional label, kept where given
    assert data.teacher_names(insts) == ["a", "b"]


BAD = [
    ("{not json", "bad JSON"), ('["a list"]', "JSON object"), (_row(2, id=""), "'id'"),
    (_row(3, question=5), "'question'"), (_row(4, answer="  "), "'answer'"),
    (_row(5, task="poetry"), "unknown task"), (_row(6, rationales={"a": "x"}), "must be a list"),
    (_row(7, rationales=[{"teacher": "a", "text": ""}]), "'text'"),
    (_row(8, rationales=[{"text": "x"}]), "'teacher'"),
    (_row(9, rationales=[{"teacher": "a", "text": "x"}, {"teacher": "a", "text": "y"}]), "twice"),
    (_row(10, rationales=[{"teacher": "a", "text": "x", "flaw": "typo"}]), "'flaw' must be null or one of"),
    (_row(0), "duplicate id 'q0' (first on line 1)"),
]


def test_load_multi_teacher_reports_file_and_line(tmp_path, capsys):
    path = _write(tmp_path / "bad.jsonl", [_row(0)] + [line for line, _ in BAD])
    with pytest.raises(DataError) as err:
        data.load_multi_teacher(path)
    message = str(err.value)
    problems = data.parse_multi_teacher(path)[1]
    assert problems[:10] == message.splitlines()[1:11]
    for lineno, (_, expected) in enumerate(BAD, 2):
        assert re.fullmatch(rf"{re.escape(path)}:{lineno}: .*{re.escape(expected)}.*",
                            problems[lineno - 2]), expected
    assert message.startswith(f"{len(BAD)} problem(s)") and f"... and {len(BAD) - 10} more" in message
    kept = data.load_multi_teacher(path, skip_bad=True)
    assert [i.id for i in kept] == ["q0"] and f"skipped {len(BAD)} bad line(s)" in capsys.readouterr().err
    with pytest.raises(DataError, match="cannot read"):
        data.load_multi_teacher(str(tmp_path / "missing.jsonl"))


def test_a_bad_byte_or_a_deep_nesting_names_its_line_and_skip_bad_skips_that_line_alone(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_row(0)).encode() + b"\n" + b'{"id": "q1", "question": "caf\xe9?"}\n'
                     + b"[" * 100_000 + b"\n" + json.dumps(_row(3)).encode() + b"\n")
    with pytest.raises(DataError) as err:
        data.load_multi_teacher(str(path))
    assert f"{path}:2: not UTF-8 text (byte 0xe9 at column 30)" in str(err.value)
    assert f"{path}:3: bad JSON (nested too deeply)" in str(err.value)
    stats = {}
    assert [i.id for i in data.load_multi_teacher(str(path), skip_bad=True, stats=stats)] == ["q0", "q3"]
    assert stats == {"skipped_lines": 2, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    bench = tmp_path / "b.json"  # whole-file readers name the line of a bad byte too
    bench.write_bytes(b'[{"qid": "s1",\n "question": "\xff", "answer": true}]')
    with pytest.raises(DataError, match=r"b.json:2: not UTF-8 text \(byte 0xff\)"):
        data.load_benchmark("strategyqa", str(bench))
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(DataError, match="deep.json: not valid JSON"):
        common.read_json(str(tmp_path / "deep.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(DataError, match="list.json: not a JSON object"):
        common.read_json(str(tmp_path / "list.json"))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return tokenizer.Tokenizer.from_pretrained(tiny_tokenizer_dir)


def test_think_starts():
    text = "So, wait... Somehow a Wait, but"
    offsets = [(0, 2), (2, 3), (3, 8), (8, 11), (11, 16), (16, 19), (19, 21), (21, 26), (26, 27),
               (27, 31)]
    assert data.think_starts(text, offsets) == [True, False, True, False, False, False, False,
                                                True, False, True]
    assert data.think_starts(text, offsets, words=("somehow",)) == [False] * 4 + [True] + [False] * 5


def test_branches_match_spec_by_hand(tok):
    inst = Instance("x", "What is 3 + 4?", "7", "gsm8k",
                    [("t2", "So, first 3 + 4. Wait, that is 7."), ("t1", "3 + 4 = 7.")])
    enc = data.encode_instance(inst, tok, ["t1", "t2"], max_len=512)
    prompt = tok.encode_chat([{"role": "user", "content": data.user_prompt(inst.question, "gsm8k")}])
    cue, y, close = tok.encode("\nThe answer is "), tok.encode("7"), tok.encode(".")
    assert enc.teacher == [1, 0] and enc.probe_ids == cue + y
    assert enc.probe_answer_mask == [False] * len(cue) + [True] * len(y)
    one = Instance("y", "What is 1 + 1?", "2", "gsm8k", [("t1", "1 + 1 = 2.")])
    enc_one = data.encode_instance(one, tok, ["t1", "t2"], 512)
    batch = data.collate([enc, enc_one])
    assert batch["teacher"].tolist() == [[1, 0], [0, -1]] and batch["branch_mask"].tolist() == [[True, True], [True, False]]
    p, lay = len(prompt), batch["layout"]
    # the packed row: instance 0's prompt once, then each of its branches; then instance 1's prompt and branch
    tails = [tok.encode(text) + cue + y + close + [tok.eot_id] for _, text in inst.rationales]
    prompt1 = tok.encode_chat([{"role": "user", "content": data.user_prompt(one.question, "gsm8k")}])
    tail1 = tok.encode("1 + 1 = 2.") + cue + tok.encode("2") + close + [tok.eot_id]
    assert batch["input_ids"].tolist() == prompt + tails[0] + tails[1] + prompt1 + tail1
    starts = [p, p + len(tails[0]), p + len(tails[0]) + len(tails[1]) + len(prompt1)]
    assert lay["prompts"] == [(0, p), (starts[1] + len(tails[1]), starts[2])]
    assert lay["branches"] == [(starts[0], starts[1]), (starts[1], starts[1] + len(tails[1])), (starts[2], starts[2] + len(tail1))]
    assert batch["slot"].tolist() == [0, 1, 2] and batch["last_rows"].tolist() == [e - 1 for _, e in lay["branches"]]
    assert lay["probes"] == [(cue + y, enc.probe_answer_mask), (enc_one.probe_ids, enc_one.probe_answer_mask)]
    for k, (_, text) in enumerate(inst.rationales):
        r, (c0, c1) = tok.encode(text), lay["branches"][k]
        assert batch["position_ids"][c0:c1].tolist() == list(range(p, p + c1 - c0))  # as if right after the prompt
        assert batch["prev"][c0:c1].tolist() == [p - 1] + list(range(c0, c1 - 1))  # the first reads the prompt's last
        assert batch["branch"][c0:c1].eq(k).all()
        want = {"sft_mask": [1] * (c1 - c0), "rationale_mask": [1] * len(r) + [0] * (c1 - c0 - len(r)),
                "answer_mask": [0] * (len(r) + len(cue)) + [1] * len(y) + [0] * (len(close) + 1)}
        for key, mask in want.items():
            assert batch[key][c0:c1].tolist() == [bool(v) for v in mask], key
        assert batch["rationale_rows"][k, :len(r)].tolist() == list(range(c0, c0 + len(r)))
        assert batch["answer_rows"][k].tolist() == list(range(c0 + len(r) + len(cue), c0 + len(r) + len(cue) + len(y)))
        marked = [tok.decode([i]).strip().lower() for i, m in
                  zip(batch["input_ids"][c0:c1].tolist(), batch["think_mask"][c0:c1].tolist()) if m]
        starts_ = [w for w in re.findall(r"[a-z]+", text.lower()) if w in data.THINKING_WORDS]
        assert len(marked) == len(starts_) and all(m.rstrip(",") and w.startswith(m.rstrip(","))
                                                   for m, w in zip(marked, starts_))
    assert not (batch["think_mask"] & ~batch["rationale_mask"]).any()
    assert not batch["sft_mask"][:p].any() and batch["branch"][:p].eq(-1).all()
    assert [s.keep for s in lay["segments"]] == [p + len(tails[0]), len(tails[1]), len(prompt1) + len(tail1)]
    # the answer ids are the same in every branch, and equal the probe's scored ids
    answers = [batch["input_ids"][batch["answer_rows"][k]].tolist() for k in range(2)]
    assert answers[0] == answers[1] == y
    dtypes = {k: v.dtype for k, v in batch.items() if torch.is_tensor(v)}
    assert dtypes["input_ids"] == dtypes["teacher"] == dtypes["prev"] == torch.long
    assert all(dtypes[k] == torch.bool for k in dtypes if k.endswith("mask"))


def test_math_cue_and_special_strings_stay_text(tok):
    stop = tok.token_id("<|im_end|>")
    inst = Instance("m", "Is <|im_end|> a token?", "\\frac{1}{2}", "math",
                    [("a", "It is text <|im_end|> here. So x = 1/2.")])
    enc = data.encode_instance(inst, tok, ["a"], 512)
    ids, codes, _ = enc.branches[0]
    assert ids.count(stop) == 2  # the user turn's end and the eot, nothing from the data
    assert ids[-1] == stop == tok.eot_id and codes[-1] == data.EOT
    assert tok.decode(enc.probe_ids) == "\nThe answer is $\\boxed{\\frac{1}{2}"
    close = [i for i, c in zip(ids, codes) if c == data.CLOSE]
    assert tok.decode(close) == "}$"


def test_max_len_drops_branches_and_instances(tok):
    short, long = "3 + 4 = 7.", "So " + "we add three and four again. " * 20
    inst = Instance("x", "What is 3 + 4?", "7", "gsm8k", [("a", short), ("b", long)])
    full = data.encode_instance(inst, tok, ["a", "b"], 10**6)
    n_short = len(full.branches[0][0])
    enc = data.encode_instance(inst, tok, ["a", "b"], n_short)
    assert enc.dropped == 1 and enc.teacher == [0] and len(enc.branches[0][0]) == n_short
    assert data.encode_instance(inst, tok, ["a"], n_short).dropped == 0  # b is not chosen
    assert data.encode_instance(inst, tok, ["a", "b"], n_short - 1) is None  # never cut
    encoded, stats = data.encode_dataset([inst, inst], tok, max_len=n_short)
    assert len(encoded) == 2 and stats["dropped_branches"] == 2 and stats["branches"] == 2
    assert stats["dropped_per_teacher"] == {"b": 2}
    encoded, stats = data.encode_dataset([inst], tok, teachers=["b"], max_len=n_short)
    assert encoded == [] and stats["dropped_instances"] == 1 and stats["teachers"] == ["b"]
    assert stats["dropped_per_teacher"] == {"b": 1} == {"b": stats["dropped_branches"]}  # a dropped instance's too
    encoded, stats = data.encode_dataset([inst], tok, teachers=["a"])  # the --teachers filter
    assert encoded[0].teacher == [0] and stats["branches"] == 1
    with pytest.raises(DataError, match="unknown teacher"):
        data.encode_dataset([inst], tok, teachers=["zed"])


def test_an_instance_without_a_rationale_of_the_chosen_teachers_is_not_called_too_long(tok):
    insts = [Instance("q0", "What is 1?", "1", "gsm8k", [("a", "So 1.")]), Instance("q1", "What?", "1", "gsm8k", [("b", "1.")])]
    encoded, stats = data.encode_dataset(insts, tok, teachers=["a"], max_len=400)
    assert [e.id for e in encoded] == ["q0"] and (stats["without_teacher"], stats["dropped_instances"]) == (1, 0)


def test_a_huge_rationale_or_question_is_dropped_before_it_is_tokenized(tok, monkeypatch):
    huge = "So we add one and one again. " * 250_000  # 7 MB
    insts = [Instance("q0", "What is 1 + 1?", "2", "gsm8k", [("a", huge), ("b", "1 + 1 = 2.")]),
             Instance("q1", huge, "2", "gsm8k", [("a", "1 + 1 = 2."), ("b", "So 2.")])]
    real_encode, real_chat = tok.encode_with_offsets, tok.encode_chat
    monkeypatch.setattr(tok, "encode_with_offsets", lambda t: real_encode(t) if len(t) < 10**5 else pytest.fail("tokenized"))
    monkeypatch.setattr(tok, "encode_chat", lambda m: real_chat(m) if len(m[0]["content"]) < 10**5 else pytest.fail("chat"))
    encoded, stats = data.encode_dataset(insts, tok, max_len=400)
    assert [len(e.branches) for e in encoded] == [1] and stats["dropped_per_teacher"] == {"a": 2, "b": 1}
    assert stats["dropped_instances"] == 1 and tok.min_tokens(huge) > 400


def test_shard_indices():
    n, world, bs = 10, 3, 2
    shards = [data.shard_indices(n, epoch=1, seed=7, rank=r, world_size=world, batch_size=bs)
              for r in range(world)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 10 wrapped to 12 = 3 ranks × 2 steps × 2
    assert set(sum(shards, [])) == set(range(n))
    assert shards == [data.shard_indices(n, 1, 7, r, world, bs) for r in range(world)]
    assert data.shard_indices(n, 2, 7, 0, 1) != data.shard_indices(n, 1, 7, 0, 1)
    assert sorted(data.shard_indices(n, 0, 0, 0, 1)) == list(range(n))


# ---- benchmark loaders ------------------------------------------------------------------

def test_real_benchmarks_load(benchmarks_dir):
    for task, name, count, first in [("math", "math500_test.jsonl", 500, r"\left( 3, \frac{\pi}{2} \right)"),
                                     ("gsm8k", "gsm8k_test.jsonl", 1319, "18"),
                                     ("svamp", "svamp_test.jsonl", 1000, "145")]:
        rows = data.load_benchmark(task, os.path.join(benchmarks_dir, name))
        assert len(rows) == count and rows[0]["answer"] == first and rows[0]["task"] == task
        assert len({r["id"] for r in rows}) == count
        assert rows[0]["prompt"] == data.user_prompt(rows[0]["question"], task)
    assert "\\boxed{}" in data.load_benchmark("math", os.path.join(benchmarks_dir, name.replace(
        "svamp", "math500")))[0]["prompt"]
    svamp = data.load_benchmark("svamp", os.path.join(benchmarks_dir, "svamp_test.jsonl"))
    assert svamp[0]["question"].endswith("93 groups. How big is each group of bananas?")


def test_small_format_loaders(tmp_path):
    csqa = _write(tmp_path / "csqa.jsonl", [{"id": "c1", "answerKey": "B", "question": {
        "stem": "Where do you keep milk cold?", "choices": [
            {"label": l, "text": t} for l, t in zip("ABCDE", ["oven", "fridge", "desk", "car", "sun"])]}}])
    row = data.load_benchmark("csqa", csqa)[0]
    assert row["answer"] == "B" and "(B) fridge" in row["question"] and row["id"] == "c1"
    sqa = tmp_path / "strategyqa.json"
    sqa.write_text(json.dumps([{"qid": "s1", "question": "Can a fish climb a tree?", "answer": False},
                               {"qid": "s2", "question": "Is ice cold?", "answer": True}]))
    assert [r["answer"] for r in data.load_benchmark("strategyqa", str(sqa))] == ["no", "yes"]
    gpqa = tmp_path / "gpqa.csv"
    with open(gpqa, "w", newline="") as f:
        w = csv.DictWriter(f, ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1",
                               "Incorrect Answer 2", "Incorrect Answer 3"])
        w.writeheader()
        for i in range(8):  # made-up questions
            w.writerow({"Record ID": f"rec{i}", "Question": f"Which colour is number {i}?",
                        "Correct Answer": f"right{i}", "Incorrect Answer 1": f"wrong{i}a",
                        "Incorrect Answer 2": f"wrong{i}b", "Incorrect Answer 3": f"wrong{i}c"})
    rows = data.load_benchmark("gpqa", str(gpqa))
    for i, r in enumerate(rows):
        assert f"({r['answer']}) right{i}\n" in r["question"] + "\n"
    assert rows == data.load_benchmark("gpqa", str(gpqa))  # fixed per-item shuffle
    assert len({r["answer"] for r in rows}) > 1
    bad = _write(tmp_path / "bad.jsonl", [{"id": "c1", "question": {"stem": "x"}}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: not a csqa record"):
        data.load_benchmark("csqa", bad)


# ---- synthetic pool ---------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["premise", "stress"])
def test_synth_pool(tmp_path, pool):
    train, test = demo.synth_pool(str(tmp_path), seed=3, n_train=40, n_test=10, n_pretrain=30, pool=pool)
    insts = data.load_multi_teacher(str(tmp_path / "train.jsonl"))
    held = data.load_multi_teacher(str(tmp_path / "test.jsonl"))
    pre = data.load_multi_teacher(str(tmp_path / "pretrain.jsonl"))
    assert len(insts) == 40 and len(held) == 10 and len(pre) == len(demo.one_step_facts()) + 30 and all(not h.rationales for h in held)
    questions = [{i.question for i in x} for x in (insts, held, pre)]
    assert sum(map(len, questions)) == len(set.union(*questions))  # no question twice, no question in two files
    assert data.teacher_names(insts) == sorted(demo.POOLS[pool])
    assert data.teacher_names(pre) == (sorted(demo.STYLES) if pool == "premise" else ["stepwise"])
    assert all(len(i.rationales) == 1 and not i.flaws for i in pre)  # pretraining is clean
    for inst in insts + held:  # three steps; the answer is the question read left to right
        assert len(re.findall(r"[-+*]", inst.question)) == 3 and inst.task is None
        assert left_to_right(inst.question) == int(inst.answer) == eval(inst.question)  # × only comes first
    assert {len(re.findall(r"[-+*]", i.question)) for i in pre} == {1, 2}
    assert all(left_to_right(i.question) == int(i.answer) for i in pre)
    for row, inst in zip(train, insts):  # every written rationale carries its label; the parser keeps it
        assert all("flaw" in r for r in row["rationales"]) and inst.flaws == {
            r["teacher"]: r["flaw"] for r in row["rationales"] if r["flaw"]}
    assert demo.synth_pool(str(tmp_path / "again"), 3, 40, 10, 30, pool) == (train, test)


def left_to_right(question):
    value, *rest = re.findall(r"[-+*]?\d+", question)
    value = int(value)
    for term in rest:
        value = demo.apply_op(value, term[0], int(term[1:]))
        assert 0 <= value <= demo.MAX_VALUE
    return value


def test_each_stress_teacher_has_its_defining_property(tmp_path):
    demo.synth_pool(str(tmp_path), seed=5, n_train=60, n_test=1, n_pretrain=1, pool="stress")
    for inst in data.load_multi_teacher(str(tmp_path / "train.jsonl")):
        r = dict(inst.rationales)
        assert inst.flaws == {"hallucinated": "hallucination", "reversed": "form", "oracle": "filler"}
        eqs = {t: re.findall(r"(\d+)([-+*])(\d+)=(\d+)", r[t]) for t in ("stepwise", "hallucinated")}
        # stepwise: every step true, chained, ending on the answer
        assert all(eval(f"{a}{op}{b}") == int(c) for a, op, b, c in eqs["stepwise"])
        assert [int(a) for a, *_ in eqs["stepwise"][1:]] == [int(c) for *_, c in eqs["stepwise"][:-1]]
        assert eqs["stepwise"][-1][3] == inst.answer and "then" in r["stepwise"]
        # hallucinated: the same steps, every intermediate result wrong, the final one right
        assert [e[:3] for e in eqs["hallucinated"]] == [e[:3] for e in eqs["stepwise"]]
        assert all(eval(f"{a}{op}{b}") != int(c) for a, op, b, c in eqs["hallucinated"][:-1])
        assert eqs["hallucinated"][-1] == eqs["stepwise"][-1]
        # reversed: the same true equations, the answer first
        rev = re.findall(r"(\d+)=(\d+)([-+*])(\d+)", r["reversed"])
        assert [(a, op, b, c) for c, a, op, b in reversed(rev)] == eqs["stepwise"] and rev[0][0] == inst.answer
        # oracle: the answer, thinking words, no arithmetic at all
        assert not re.search(r"[-+*=]", r["oracle"]) and data.extract_answer(r["oracle"], None) is None
        assert r["oracle"].endswith(f" {inst.answer}.")
        assert sum(w in data.THINKING_WORDS for w in re.findall(r"[a-z]+", r["oracle"].lower())) >= 2


def shown_flaw(text, question, answer):
    """The flaw a synthetic rationale shows, read from its text and the question alone (None: clean),
    asserting what every rationale of that kind must hold."""
    start, ops = int(re.match(r"\d+", question)[0]), re.findall(r"([-+*])(\d+)", question)
    words = re.findall(r"[a-z]+", text.lower())
    if not re.search(r"[-+*=]", text):  # filler: no arithmetic, thinking words, then the answer
        assert text.endswith(f" {answer}.") and any(w in data.THINKING_WORDS for w in words)
        return "filler"
    if answer_first := bool(re.match(r"\D*\d+=\d+[-+*]", text)):  # form: the chain read from its end
        eqs = [(a, op, b, c) for c, a, op, b in reversed(re.findall(r"(\d+)=(\d+)([-+*])(\d+)", text))]
        assert re.match(r"\D*(\d+)", text)[1] == answer
    else:
        eqs = re.findall(r"(\d+)([-+*])(\d+)=(\d+)", text)
    assert [(op, b) for _, op, b, _ in eqs] == ops and int(eqs[0][0]) == start and eqs[-1][3] == answer
    assert [a for a, *_ in eqs[1:]] == [c for *_, c in eqs[:-1]]  # chained: each step starts from the last result
    wrong = [j for j, (a, op, b, c) in enumerate(eqs) if demo.apply_op(int(a), op, int(b)) != int(c)]
    if answer_first:
        assert not wrong  # the true equations, answer first
        return "form"
    assert not wrong or (len(wrong) == 2 and wrong[0] < len(eqs) - 1 == wrong[1])  # one result changed, carried
    return "hallucination" if wrong else None


def test_premise_flaw_labels_match_the_rationales(tmp_path):
    """Every label is what its text shows; only a minority of a question's rationales is flawed;
    each teacher is flawed on its own subset of questions, in every way, and writes its own style."""
    demo.synth_pool(str(tmp_path), seed=5, n_train=400, n_test=1, n_pretrain=1)
    insts, flawed = data.load_multi_teacher(str(tmp_path / "train.jsonl")), {t: set() for t in demo.STYLES}
    for inst in insts:
        assert len(inst.flaws) <= 2 and [t for t, _ in inst.rationales] == list(demo.STYLES)
        for t, text in inst.rationales:
            assert shown_flaw(text, inst.question, inst.answer) == inst.flaws.get(t), (t, text, inst.flaws)
            flawed[t] |= {(inst.id, inst.flaws[t])} if t in inst.flaws else set()
        clean = {t: text for t, text in inst.rationales if t not in inst.flaws}
        if inst.flaws:  # a flaw is written in its teacher's style
            assert all(text.startswith(demo.STYLES[t][0]) for t, text in inst.rationales)
        if len(clean) == 4:  # lengths and thinking-word density differ between the styles
            think = [sum(w in data.THINKING_WORDS for w in re.findall(r"[a-z]+", clean[t].lower())) for t in demo.STYLES]
            assert [len(clean[t]) for t in demo.STYLES] == sorted(len(clean[t]) for t in demo.STYLES) and think == sorted(think)
    ids = {t: {i for i, _ in f} for t, f in flawed.items()}
    for t in demo.STYLES:  # about 20% each (FLAW_COUNTS), every flaw type, and not the same questions
        assert 0.1 < len(ids[t]) / len(insts) < 0.35 and {f for _, f in flawed[t]} == set(data.FLAWS)
        assert all(len(ids[t] & ids[u]) < len(ids[t]) / 2 for u in demo.STYLES if u != t)
    assert sum(not inst.flaws for inst in insts) > len(insts) / 4


def test_the_demo_tokenizer_reads_like_any_checkpoint(tmp_path):
    import tokenizer
    assert demo.write_tokenizer(str(tmp_path)) == tokenizer.Tokenizer.from_pretrained(str(tmp_path)).vocab_size
    tok = tokenizer.Tokenizer.from_pretrained(str(tmp_path))
    text = "Okay, now 7*3=21. Next 21-5=16.\nThe answer is 16."
    ids, offsets = tok.encode_with_offsets(text)
    assert [text[a:b] for a, b in offsets] == ["Okay", ",", " now", " ", "7", "*", "3", "=", "2", "1", ".", " Next", " ",
                                               "2", "1", "-", "5", "=", "1", "6", ".", "\n", "The", " answer", " is", " ",
                                               "1", "6", "."]  # a word is one token, a digit is one token
    assert tok.decode(ids) == text and data.think_starts(text, offsets) == [t in (0, 2, 11) for t in range(len(ids))]
    prompt = tok.encode_chat([{"role": "user", "content": "7*3-5"}])
    assert tok.decode(prompt) == "<|im_start|>user\n7*3-5<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eot_id == tok.token_id("<|im_end|>") and tok.eos_ids == [tok.eot_id]
    for pool in demo.POOLS:  # every text the pools write reads back; every word of it is one token
        rows, _ = demo.synth_pool(str(tmp_path / pool), seed=0, n_train=100, n_test=1, n_pretrain=1, pool=pool)
        for text in {r["text"] + "\nThe answer is 1." for row in rows for r in row["rationales"]}:
            ids, offsets = tok.encode_with_offsets(text)
            pieces = [text[a:b] for a, b in offsets]
            assert tok.decode(ids) == text and [p for p in pieces if p.strip(" ").isalpha()] == re.findall(r" ?[A-Za-z]+", text)
            assert all(len(p) == 1 for p in pieces if not p.strip(" ").isalpha())


def is_answer(text, answer):
    return data.is_equivalent(data.extract_answer(text, "gsm8k"), answer, "gsm8k")


# ---- CLI --------------------------------------------------------------------------------

def test_cli_build_reports_per_teacher(tmp_path, capsys):
    questions = _write(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": f"What is {i} + 1?",
                                               "answer": str(i + 1)} for i in range(4)])
    good = _write(tmp_path / "good.jsonl", [{"id": f"q{i}", "text": f"So the answer is {i + 1}."}
                                            for i in range(4)])
    mixed = _write(tmp_path / "mixed.jsonl", [
        {"question": "What is 0 + 1?", "output": "The answer is 1."},  # joined by question text
        {"id": "q1", "response": "The answer is 5."}, {"id": "q2", "text": "I do not know."}])
    out = str(tmp_path / "out.jsonl")
    data.main(["build", "--questions", questions, "--teacher", f"good={good}", "--teacher",
               f"mixed={mixed}", "--task", "gsm8k", "--out", out, "--min-teachers", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["teacher", "kept", "wrong", "no", "answer", "too", "long", "missing"]
    assert lines[1].split() == ["good", "4", "0", "0", "0", "0"]
    assert lines[2].split() == ["mixed", "1", "1", "1", "0", "1"]
    insts = data.load_multi_teacher(out)
    assert [i.id for i in insts] == ["q0"] and [t for t, _ in insts[0].rationales] == ["good", "mixed"]
    assert "1 instances" in lines[3] and "3 with under 2 rationales dropped" in lines[3]


def test_cli_bad_input_exits_2(tmp_path, capsys, tiny_tokenizer_dir):
    bad = _write(tmp_path / "bad.jsonl", [_row(0), "{oops"])
    for argv, expected in [(["check", bad], f"{bad}:2: bad JSON"),
                           (["build", "--questions", bad, "--teacher", "x=" + bad, "--task", "math",
                             "--out", str(tmp_path / "o.jsonl")], f"{bad}:2: bad JSON"),
                           (["build", "--questions", bad, "--teacher", "nofile", "--out", "o"],
                            "--teacher 'nofile': expected NAME=FILE"),
                           (["check", str(tmp_path / "none.jsonl")], "cannot read")]:
        with pytest.raises(SystemExit) as err:
            data.main(argv)
        assert err.value.code == 2
        assert expected in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.jsonl")
    good = _write(tmp_path / "good.jsonl", [_row(0), _row(1)])
    data.main(["check", good, "--model", tiny_tokenizer_dir])
    out = capsys.readouterr().out
    assert "2 instances" in out and "branch tokens: min" in out and re.search(r"a\s+2 branches", out)


def test_cli_bad_file_exits_2_without_traceback(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", ["{oops"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "data.py"), "check", bad],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and f"{bad}:1:" in done.stderr


def test_build_joins_by_question_text_when_the_id_is_unknown_and_refuses_a_name_twice(tmp_path, capsys):
    questions = _write(tmp_path / "q.jsonl", [{"id": "q0", "question": "What is 1 + 1?", "answer": "2"}])
    gens = _write(tmp_path / "g.jsonl", [{"id": "gen-7", "question": "What is 1 + 1?", "text": "The answer is 2."}])
    out = str(tmp_path / "out.jsonl")
    data.main(["build", "--questions", questions, "--teacher", f"a={gens}", "--task", "gsm8k", "--out", out])
    assert capsys.readouterr().out.splitlines()[1].split() == ["a", "1", "0", "0", "0", "0"]
    for argv, message in [(["--teacher", f"a={gens}", "--teacher", f"a={gens}"], "given twice"),
                          (["--teacher", f"a={gens}", "--min-teachers", "0"], "--min-teachers 0")]:
        with pytest.raises(SystemExit) as err:
            data.main(["build", "--questions", questions, "--task", "gsm8k", "--out", out + "2", *argv])
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_cli_check_skip_bad_counts_dropped_lines(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [_row(0), "{oops", _row(1)])
    data.main(["check", bad, "--skip-bad"])
    captured = capsys.readouterr()
    assert "2 instances" in captured.out and "1" in captured.err


def batch_line(custom_id, *contents, finish="stop", reasoning=None):
    """One line of OpenAI-style batch output (what OpenAI's and vLLM's batch runners write)."""
    choices = [{"index": j, "message": {"role": "assistant", "content": c, **({"reasoning_content": reasoning}
                                                                               if reasoning else {})},
                "finish_reason": finish, "logprobs": None} for j, c in enumerate(contents)]
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": "r", "body": {"object": "chat.completion", "choices": choices}}}


def test_build_keeps_the_first_correct_sample_and_reads_openai_batch_output(tmp_path, capsys, tiny_tokenizer_dir):
    questions = _write(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}
                                              for i in range(5)])
    said = lambda i, n: f"So {i} + 1 = {n}. The answer is {n}."
    ours = _write(tmp_path / "ours.jsonl", [  # eval.py rationales records, samples out of order
        {"id": "q0", "sample": 2, "text": said(0, 1) + " (third)", "stopped": True},
        {"id": "q0", "sample": 0, "text": said(0, 7), "stopped": True},
        {"id": "q0", "sample": 1, "text": said(0, 1), "stopped": True},  # the first correct sample
        {"id": "q1", "sample": 0, "text": said(1, 2), "stopped": False},  # cut off by max_new_tokens
        {"id": "q2", "sample": 0, "text": "I am not sure.", "stopped": True},
        {"id": "q4", "sample": 0, "text": "Let me think. " * 40 + said(4, 5), "stopped": True}])  # over --max-len
    batch = _write(tmp_path / "batch.jsonl", [
        batch_line("q0", said(0, 1), reasoning="Hmm, 0 plus 1."),
        batch_line("q1#1", said(1, 2)), batch_line("q1#0", said(1, 9)),  # one request per sample: ID#S
        {"id": "batch_req_q2", "custom_id": "q2", "response": None, "error": {"code": "server_error", "message": "x"}},
        batch_line("q3", said(3, 4)[:8], finish="length"),
        batch_line("q4", said(4, 6), said(4, 5))])  # n = 2 choices: the second is the first correct one
    out = str(tmp_path / "multi.jsonl")
    data.main(["build", "--questions", questions, "--teacher", f"ours={ours}", "--teacher", f"api={batch}",
               "--task", "gsm8k", "--out", out, "--max-len", "120", "--model", tiny_tokenizer_dir])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["ours", "1", "0", "1", "2", "1"]  # kept q0; q2 no answer; q1, q4 too long; q3 missing
    assert lines[2].split() == ["api", "3", "0", "0", "1", "1"]  # kept q0, q1, q4; q3 cut off; q2 failed: missing
    got = {i.id: dict(i.rationales) for i in data.load_multi_teacher(out)}
    assert got["q0"] == {"ours": said(0, 1), "api": "Hmm, 0 plus 1.\n\n" + said(0, 1)}
    assert got["q1"] == {"api": said(1, 2)} and got["q4"] == {"api": said(4, 5)} and set(got) == {"q0", "q1", "q4"}
    hashed = _write(tmp_path / "hashed.jsonl", [{"id": "q#1", "question": "What is 1 + 1?", "answer": "2"}])
    reply = _write(tmp_path / "reply.jsonl", [batch_line("q#1", said(1, 2))])  # an id ending in #N
    data.main(["build", "--questions", hashed, "--teacher", f"api={reply}", "--task", "gsm8k", "--out", out])
    assert [i.id for i in data.load_multi_teacher(out)] == ["q#1"]


def test_build_bad_batch_lines_and_a_teacher_with_nothing_usable_exit_2_and_write_nothing(tmp_path, capsys):
    questions = _write(tmp_path / "q.jsonl", [{"id": "q0", "question": "What is 1 + 1?", "answer": "2"}])
    good = _write(tmp_path / "good.jsonl", [batch_line("q0", "The answer is 2.")])
    out = tmp_path / "multi.jsonl"
    out.write_text("an earlier build\n")
    broken = {**batch_line("q0", "x"), "response": {"status_code": 200, "body": {"choices": [{"text": "x"}]}}}
    cases = [([batch_line("q0", "The answer is 2."), broken], "bad.jsonl:2: a batch output line needs response.body"),
             ([batch_line("q0", None), {**batch_line("q0", "x"), "custom_id": 7}], "bad.jsonl:2: 'custom_id' must be"),
             ([{"id": "q0", "sample": "first", "text": "The answer is 2."}], "bad.jsonl:1: 'sample' must be an integer"),
             ([batch_line("zz", "The answer is 2."), batch_line("q0", "The answer is 3.")],
              "bad.jsonl: teacher bad has no usable rationale for any of the 1 questions (missing 0, no answer 0, "
              "wrong 1, too long 0, kept 0)")]
    for lines, message in cases:
        bad = _write(tmp_path / "bad.jsonl", lines)
        with pytest.raises(SystemExit) as e:
            data.main(["build", "--questions", questions, "--teacher", f"good={good}", "--teacher", f"bad={bad}",
                       "--task", "gsm8k", "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (message, err)
        assert out.read_text() == "an earlier build\n"
    with pytest.raises(SystemExit) as e:
        data.main(["build", "--questions", questions, "--teacher", f"good={good}", "--out", str(out), "--max-len", "9"])
    assert e.value.code == 2 and "--max-len N (>= 1) and --model DIR go together" in capsys.readouterr().err
