"""Answer extraction and equivalence: every rule, the cases that must not match, and every
reference solution of MATH500 and GSM8K."""
import json
import os

import pytest

from data import extract_answer, is_equivalent, last_boxed, normalize_math, parse_number


def test_last_boxed_is_balanced_and_last():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\fbox{x^{2}}") == "x^{2}"
    assert last_boxed(r"$\boxed 5$") == "5"
    assert last_boxed(r"\boxed{unbalanced") is None
    assert last_boxed("no box here") is None


@pytest.mark.parametrize("pred,gold", [
    (r"\dfrac{1}{2}", r"\frac12"), (r"\tfrac{3}{4}", "0.75"), ("0.5", r"\frac{1}{2}"),
    ("3/4", r"\frac{3}{4}"), (r"-\frac{3}{8}", "-0.375"), (r"\left( 3, \frac{\pi}{2} \right)",
                                                             r"(3,\frac{\pi}{2})"),
    (r"30^\circ", "30"), (r"30^{\circ}", "30°"), (r"50\%", "50"), (r"\$18.90", "18.9"),
    (r"\text{(C)}", "(C)"), (r"\mbox{east}", r"\text{east}"), (r"10\text{ inches}", "10"),
    (r"864 \mbox{ inches}^2", "864"), ("1,000", "1000"), (r"11,\! 111,\! 111,\! 100", "11111111100"),
    ("x = 5", "5"), (r"x \in [-2,7]", "[-2, 7]"), (r"\sqrt2", r"\sqrt{2}"), (r"11\sqrt2", r"11 \sqrt{2}"),
    (r"\frac 59", r"\frac{5}{9}"), (r"\frac{270}7", r"\frac{270}{7}"), ("(1, 2.0)", "(1,2)"),
    ("(3,4]", r"\left(3, 4\right]"), ("1,-2", "-2, 1"), (r"1\frac{4}{5}", "1.8"),
    (r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}", r"\begin{pmatrix} 0.2 \\ -3.6 \end{pmatrix}"),
    ("1.0000001", "1"), ("2516_{8}", "2516_8"), ("5.", "5"),
])
def test_math_equivalent(pred, gold):
    assert is_equivalent(pred, gold, "math")
    assert is_equivalent(gold, pred, "math")


@pytest.mark.parametrize("pred,gold", [
    ("3", "4"), (r"\frac{1}{3}", "0.33"), ("(1,2)", "(2,1)"), ("[1,2)", "(1,2)"),
    (r"2\sqrt{3}", r"2\sqrt{2}"), ("1,2", "1,2,3"), ("(C)", "(D)"), (r"\text{east}", r"\text{west}"),
    ("x^2+1", "x^2-1"), ("1.001", "1"), ("12", "1,2"), ("", "0"), ("2516_8", "25168"),
    ("-2,1", "(-2,1)"),
])
def test_math_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold, "math")
    assert not is_equivalent(None, gold, "math")


def test_normal_forms_and_numbers():
    assert normalize_math(r"\left( 1, \dfrac{2}{3} \right)") == r"(1,\frac{2}{3})"
    assert normalize_math(r"y = 2x + 3") == "2x+3"
    assert normalize_math("5x - 7y + 11z + 4 = 0") == "5x-7y+11z+4=0"  # an equation stays
    assert parse_number("1,234.5") == 1234.5 and parse_number(r"-\frac{3}{4}") == -0.75
    assert parse_number(r"\frac{1}{0}") is None and parse_number("x") is None


def test_math_extraction_fallbacks():
    assert extract_answer(r"So $x = \boxed{\frac{1}{2}}$.", "math") == r"\frac{1}{2}"
    assert extract_answer("The answer is 12.", "math") == "12"
    assert extract_answer("The answer is $\\boxed{7}$.", "math") == "7"
    assert extract_answer("no final statement", "math") is None


def test_gsm8k_and_svamp():
    assert extract_answer("3 + 4 = 7\n#### 1,234", "gsm8k") == "1234"
    assert extract_answer("So we get 5 apples. The answer is 12.", "gsm8k") == "12"
    assert extract_answer(r"Total is 3 then \boxed{42}. Done 7", "gsm8k") == "42"
    assert extract_answer(r"The answer is 7, or \boxed{42}", "gsm8k") == "42"  # boxed first
    assert extract_answer("First 3, then 4, finally $1,000.", "gsm8k") == "1000"
    assert extract_answer("The answer is -3.5 dollars", "gsm8k") == "-3.5"
    assert extract_answer("no numbers at all", "gsm8k") is None
    assert extract_answer("We have 10 - 3 = 7", "gsm8k") == "7"  # "- 3" is not minus three
    assert extract_answer("It drops by 3-8 to x = -4", "gsm8k") == "-4"
    assert is_equivalent("27", "27.0", "svamp") and is_equivalent("$1,000", "1000", "gsm8k")
    assert not is_equivalent("27.5", "27", "svamp") and not is_equivalent("abc", "1", "gsm8k")


def test_choice_letters():
    for text, want in [("Answer: C", "C"), ("The answer is (B).", "B"), ("**Answer:** D", "D"),
                       ("so the answer is: (a)... no wait. The answer is A", "A"),
                       (r"\boxed{\text{(C)}}", "C"), ("(B)", "B"), ("B.", "B")]:
        assert extract_answer(text, "gpqa") == want, text
    assert extract_answer("The answer is E", "csqa") == "E"
    assert extract_answer("The answer is E", "gpqa") is None  # GPQA has four choices
    assert extract_answer("The answer is Apple pie.", "csqa") is None  # a word, not a letter
    assert extract_answer("the answer is a good one", "csqa") is None  # lowercase article
    assert extract_answer("I think it is C", "csqa") is None  # no answer statement
    assert is_equivalent("(c)", "C", "csqa") and not is_equivalent("B", "C", "gpqa")


def test_strategyqa():
    assert extract_answer("Cats cannot fly. So the answer is no.", "strategyqa") == "no"
    assert extract_answer("The answer is True", "strategyqa") == "yes"
    assert extract_answer("Hmm, maybe", "strategyqa") is None
    assert is_equivalent("yes", "true", "strategyqa") and is_equivalent("no", "False", "strategyqa")
    assert not is_equivalent("yes", "no", "strategyqa") and not is_equivalent("maybe", "no", "strategyqa")


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        extract_answer("x", "trivia")


def test_math500_reference_solutions(benchmarks_dir):
    rows = [json.loads(l) for l in open(os.path.join(benchmarks_dir, "math500_test.jsonl"))]
    failed = [r["unique_id"] for r in rows
              if not is_equivalent(extract_answer(r["solution"], "math"), r["answer"], "math")]
    assert len(rows) == 500 and failed == []
    # and no two different gold answers are called equal (no over-matching)
    for a, b in zip(rows, rows[1:]):
        if normalize_math(a["answer"]) != normalize_math(b["answer"]):
            assert not is_equivalent(extract_answer(a["solution"], "math"), b["answer"], "math")


def test_gsm8k_reference_rationales(benchmarks_dir):
    rows = [json.loads(l) for l in open(os.path.join(benchmarks_dir, "gsm8k_test.jsonl"))]
    failed = []
    for r in rows:
        gold = r["answer"].split("####")[-1].strip()
        pred = extract_answer(r["answer"], "gsm8k")
        if not (is_equivalent(pred, gold, "gsm8k") and float(pred) == float(gold.replace(",", ""))):
            failed.append(r["question"][:40])
    assert len(rows) == 1319 and failed == []


@pytest.mark.parametrize("text, task, want", [
    ("To answer this we need 3 steps.\n4 + 8 = 12", "gsm8k", "12"),  # "answer" alone states nothing
    ("Let me answer carefully: 5 apples first.\nThen 5*2 = 10 apples.", "svamp", "10"),
    ("The answer is no, true fish cannot climb.", "strategyqa", "no"),  # the stated answer wins
    ("**Answer**: B", "csqa", "B"),
])
def test_only_an_answer_statement_counts(text, task, want):
    assert extract_answer(text, task) == want
