"""The demo's paired verdict: the arithmetic on fixed per-seed accuracies, against hand-computed
values."""
import json
import os

import pytest

import demo


@pytest.mark.parametrize("acc_a, acc_b, diff, se, call", [
    # diffs .02 .05 .07: mean .14/3; se sqrt((.026667² + .003333² + .023333²) / 2 / 3)
    ([0.80, 0.85, 0.90], [0.78, 0.80, 0.83], 0.046667, 0.014530, "a better"),
    # diffs -.10 -.06: mean -.08; se sqrt((.02² + .02²) / 1 / 2) = .02; |-.08| > .04
    ([0.70, 0.72], [0.80, 0.78], -0.08, 0.02, "b better"),
    # diffs .05 -.03: mean .01; se sqrt((.04² + .04²) / 1 / 2) = .04; .01 < .08
    ([0.85, 0.77], [0.80, 0.80], 0.01, 0.04, "no difference"),
    # diffs .05 .03 .07: mean .05, se sqrt((.02² + 0 + .02²) / 2 / 3) = .011547; .05 > .023094
    ([0.65, 0.63, 0.67], [0.60, 0.60, 0.60], 0.05, 0.011547, "a better"),
    # diffs .04 0 .02: mean .02, se sqrt((.02² + .02²) / 2 / 3) = .011547: more than one se,
    # less than two
    ([0.84, 0.80, 0.82], [0.80, 0.80, 0.80], 0.02, 0.011547, "no difference"),
])
def test_paired_verdict_over_seeds(acc_a, acc_b, diff, se, call):
    v = demo.paired_verdict("compact", "direct-avg", acc_a, acc_b)
    assert v["diff"] == pytest.approx(diff, abs=1e-6) and v["se"] == pytest.approx(se, abs=1e-6)
    assert v["call"] == call and v["n_seeds"] == len(acc_a)
    assert (v["a"], v["b"]) == ("compact", "direct-avg")


def test_one_seed_takes_its_se_over_questions():
    # per question a's 0/1 minus b's: mean .1; deviations .9 .9 -1.1 and seven -.1: Σ² = 2.9;
    # se sqrt(2.9 / 9 / 10) = .179505
    question_diffs = [1, 1, 0, 0, -1, 0, 0, 0, 0, 0]
    v = demo.paired_verdict("compact", "base", [0.6], [0.5], question_diffs)
    assert v["diff"] == pytest.approx(0.1) and v["se"] == pytest.approx(0.179505, abs=1e-6)
    assert v["call"] == "no difference" and v["n_seeds"] == 1


def write_predictions(out, name, correct):
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    with open(os.path.join(out, "eval", name + ".jsonl"), "w", encoding="utf-8") as f:
        for i, c in enumerate(correct):
            f.write(json.dumps({"id": f"test-{i:05d}", "correct": bool(c)}) + "\n")


def test_verdicts_pair_seeds_and_the_base_student(tmp_path):
    table = {"base": {"seeds": [None], "per_seed": [0.15]},
             "compact": {"seeds": [0, 1], "per_seed": [0.8, 0.9]},
             "direct-avg": {"seeds": [0], "per_seed": [0.6]},  # a stopped run: seed 1 missing
             "sbs-stepwise": {"seeds": [0, 1], "per_seed": [0.5, 0.5]}}  # no claim
    write_predictions(str(tmp_path), "compact-seed-0", [1, 1, 1, 1, 0])
    write_predictions(str(tmp_path), "direct-avg-seed-0", [1, 0, 1, 0, 1])
    found = {(v["a"], v["b"]): v for v in demo.verdicts(str(tmp_path), table)}
    assert sorted(found) == [("compact", "base"), ("compact", "direct-avg")]
    # base pairs with both seeds: diffs .65 .75, mean .70, se sqrt((.05² + .05²) / 1 / 2) = .05
    base = found[("compact", "base")]
    assert base["diff"] == pytest.approx(0.70) and base["se"] == pytest.approx(0.05)
    assert base["n_seeds"] == 2 and base["call"] == "a better"
    # seed 0 alone: .8 - .6; per question 0 1 0 1 -1: mean .2, Σ² = .04·2 + .64·2 + 1.44 = 2.8,
    # se sqrt(2.8 / 4 / 5) = .374166
    direct = found[("compact", "direct-avg")]
    assert direct["diff"] == pytest.approx(0.2) and direct["se"] == pytest.approx(0.374166, abs=1e-6)
    assert direct["n_seeds"] == 1 and direct["call"] == "no difference"


def test_one_seed_against_the_base_student_reads_its_predictions(tmp_path):
    table = {"base": {"seeds": [None], "per_seed": [0.25]},
             "compact": {"seeds": [7], "per_seed": [0.75]}}
    write_predictions(str(tmp_path), "base", [0, 0, 1, 0])
    write_predictions(str(tmp_path), "compact-seed-7", [1, 1, 1, 0])
    [v] = demo.verdicts(str(tmp_path), table)
    # per question 1 1 0 0: mean .5, Σ² = 4 · .25 = 1, se sqrt(1 / 3 / 4) = .288675
    assert v["diff"] == pytest.approx(0.5) and v["se"] == pytest.approx(0.288675, abs=1e-6)
    assert v["n_seeds"] == 1 and v["call"] == "no difference"
