"""The data side of compact-ref: the multi-teacher format, answer checking, branch batches
(SPEC.md §1, §8, §9) and benchmark loaders.

    python data.py build --questions Q.jsonl --task math --out train.jsonl
        --teacher qwq=qwq.jsonl --teacher r1=r1-batch-output.jsonl
        [--min-teachers 4] [--max-len 2048 --model STUDENT]
    python data.py check train.jsonl [--model DIR]

build reads eval.py rationales' output (N samples per question), plain {id, text} lines and
OpenAI-style batch output; it keeps per teacher and question the first correct rationale in
sample order and reports per teacher how many questions were kept, wrong, without an answer,
too long, missing.

Runs on torch and the standard library (the tokenizer is tokenizer.py's).
Left out: sympy-grade answer checking (expressions are compared textually after
normalisation, numbers numerically), multi-turn training data, tool-calling templates
beyond what the checkpoint's own template renders, and generation itself (model.py).
"""
import argparse
import csv
import hashlib
import io
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

from common import (DataError, derive_seed, flag_names, jsonl_lines, read_bytes, read_json,
                    read_jsonl, read_text, user_errors, write_jsonl)
from model import packed_segments
from tokenizer import Tokenizer

# --- the multi-teacher format (SPEC.md §8) ---

TASKS = ("math", "gsm8k", "svamp", "csqa", "strategyqa", "gpqa")
# a rationale's optional "flaw" label (synthetic pools)
FLAWS = ("hallucination", "form", "filler")


@dataclass
class Instance:
    id: str
    question: str
    answer: str
    task: str | None = None  # picks answer extraction, the instruction and the cue
    rationales: list[tuple[str, str]] = field(default_factory=list)  # [(teacher, text)]
    flaws: dict[str, str] = field(default_factory=dict)  # teacher: its rationale's flaw label


def teacher_names(instances):
    """The run's teacher list: sorted, so a teacher's index means the same in every rank."""
    return sorted({t for inst in instances for t, _ in inst.rationales})


# --- validation ---


def _as_answer(value):
    """Gold answers may come as numbers (SVAMP's 27.0): write integral floats as ints."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, (int, float)) else value


def _parse_instance(obj):
    """One JSON object to an Instance, or raise ValueError naming the problem."""
    if not isinstance(obj, dict):
        raise ValueError("a line must be a JSON object")
    iid = obj.get("id")
    if isinstance(iid, int) and not isinstance(iid, bool):
        iid = str(iid)
    question = obj.get("question")
    answer = _as_answer(obj.get("answer"))
    for key, value in (("id", iid), ("question", question), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"'{key}' must be a non-empty string")
    task = obj.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    rationales = obj.get("rationales", [])
    if not isinstance(rationales, list):
        raise ValueError("'rationales' must be a list")
    pairs = []
    for k, r in enumerate(rationales):
        if not isinstance(r, dict) or not isinstance(r.get("teacher"), str) or not r["teacher"]:
            raise ValueError(f"rationales[{k}] needs a non-empty string 'teacher'")
        where = f"rationales[{k}] ({r['teacher']})"
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        if r["teacher"] in dict(pairs):
            raise ValueError(f"teacher {r['teacher']!r} appears twice")
        if r.get("flaw") not in (None, *FLAWS):
            raise ValueError(f"{where}: 'flaw' must be null or one of {', '.join(FLAWS)}")
        pairs.append((r["teacher"], r["text"]))
    flaws = {r["teacher"]: r["flaw"] for r in rationales if r.get("flaw")}
    return Instance(iid, question, answer.strip(), task, pairs, flaws)


def parse_multi_teacher(path, parse=_parse_instance):
    """All good instances of a multi-teacher JSONL file (or, with `parse`, of another file of
    Instances, as read_questions reads) and a `FILE:LINE: message` per bad line."""
    instances = []
    problems = []
    first_line = {}  # id: the line it was first seen on
    for lineno, obj in jsonl_lines(path):
        try:
            if isinstance(obj, str):
                raise ValueError(obj)
            inst = parse(obj)
            if inst.id in first_line:
                raise ValueError(f"duplicate id {inst.id!r} (first on line {first_line[inst.id]})")
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}")
            continue
        first_line[inst.id] = lineno
        instances.append(inst)
    return instances, problems


def load_multi_teacher(path, skip_bad=False, stats=None):
    """Read and validate a multi-teacher file. Bad lines raise DataError, or with skip_bad=True
    are dropped and counted on stderr and in stats["skipped_lines"] (a dict, if given; it also
    gets the file's "sha256", which names its content: train.py's resume checks it)."""
    instances, problems = parse_multi_teacher(path)
    if problems and not skip_bad:
        shown = "\n".join(problems[:10])
        if len(problems) > 10:
            shown += f"\n... and {len(problems) - 10} more"
        raise DataError(f"{len(problems)} problem(s) in {path}:\n{shown}")
    if problems:
        kept = len(instances)
        print(f"{path}: skipped {len(problems)} bad line(s), kept {kept}", file=sys.stderr)
    if stats is not None:
        digest = hashlib.sha256(read_bytes(path)).hexdigest()
        stats.update(skipped_lines=len(problems), sha256=digest)
    return instances


# --- answer checking: extraction and equivalence ---

_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# An answer *statement*: "The answer is", "answer: ", "**Answer:**", "**Answer**:";
# not any "answer" word.
_ANSWER_PREFIX = (r"(?i:answer)\s*(?:\*\*)?\s*"
                  r"(?:(?i:is)\b\s*[:：]?|[:：])\s*(?:\*\*)?\s*[:：]?\s*")
_ANSWER_IS = re.compile(_ANSWER_PREFIX + "(.*)")
# strategyqa's answers, normalised
_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}


def _brace_end(s, i):
    """The index just past the brace closing one opened before s[i] (balanced), or None."""
    depth = 1
    while i < len(s) and depth:
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        i += 1
    return i if depth == 0 else None


def last_boxed(text):
    """Content of the last balanced \\boxed{...} or \\fbox{...} (also `\\boxed 5`), or None."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s\S)", text))
    if not starts:
        return None
    m = starts[-1]
    if m.group(1) != "{":
        return re.split(r"[\s$]", text[m.end() - 1:], maxsplit=1)[0]
    end = _brace_end(text, m.end())
    return text[m.end():end - 1].strip() if end else None


def _unwrap(s, command):
    """Replace every \\command{x} by x (balanced braces)."""
    opening = "\\" + command + "{"
    while (j := s.find(opening)) >= 0:
        inner = j + len(opening)
        k = _brace_end(s, inner) or len(s)  # unbalanced: as if its last character closed it
        s = s[:j] + s[inner:k - 1] + s[k:]
    return s


def normalize_math(s):
    """MATH-style normal form: no spacing, \\left/\\right, degrees, %, $, \\text wrappers,
    thousands separators or `x =`; \\dfrac/\\tfrac as \\frac, braces around \\frac/\\sqrt args."""
    s = s.strip().replace("\n", "")
    s = re.sub(r"(?<!\\)\\[!,;:> ]|~", "", s).replace("{,}", ",")
    s = re.sub(r"\\[dt]frac", r"\\frac", s).replace("\\displaystyle", "")
    s = re.sub(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = re.sub(r"\\?[%$]", "", s)
    for command in ("text", "textbf", "textnormal", "mbox", "mathrm", "mathbf", "boxed"):
        s = _unwrap(s, command)
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\w)(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\w)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)
    s = re.sub(r"\A(-?)(\d+)/(\d+)\Z", r"\1\\frac{\2}{\3}", _drop_thousands(s))
    # "x=5" -> "5", "x\in[-2,7]" -> "[-2,7]"
    s = re.sub(r"\A(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w+)?(?:=|\\in)(.+)\Z", r"\1", s)
    return re.sub(r"\A\(([A-Z])\)\Z", r"\1", s)


def _drop_thousands(s):
    """'-1,234.5' -> '-1234.5': no thousands separators in a plain number; else s as it is."""
    return s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s


def _strip_units(s):
    """Drop unit words written as \\text{ cm}^2 / \\mbox{ inches} after a value."""
    out = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s]*\}(?:\^\{?\d\}?)?", "", s)
    return out if out.strip() else s


def parse_number(s):
    """A float from '-12', '1,000', '.5', '$3', '\\frac{3}{4}', '-3/4', '1\\frac{4}{5}' (mixed
    number), else None."""
    s = _drop_thousands(s.replace("$", "").strip())
    if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)", s):  # not float()'s "1_0", "nan", "1e5"
        return float(s)
    # (sign, whole part, numerator, denominator)
    m = re.fullmatch(r"(-?)(\d*)\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    m = m or re.fullmatch(r"(-?)()(\d+)/(\d+)", s)
    if m is None or float(m[4]) == 0:
        return None
    value = (float(m[2]) if m[2] else 0.0) + float(m[3]) / float(m[4])
    return -value if m[1] else value


def _numbers_equal(a, b):
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def _split_top(s, seps=","):
    """Split on separators not nested inside (), [], {}."""
    parts = [""]
    depth = 0
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch in seps and depth == 0:
            parts.append("")
        else:
            parts[-1] += ch
    return parts


def _elements(s):
    """(kind, items) of a tuple/interval/matrix/bare list, or None for a single value."""
    if m := re.fullmatch(r"\\begin\{([pb]matrix)\}(.*)\\end\{\1\}", s):
        return "matrix", [x for row in m[2].split("\\\\") for x in row.split("&")]
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]":
        items = _split_top(s[1:-1])
        if len(items) > 1:
            return s[0] + s[-1], items
    items = _split_top(s)
    if len(items) > 1:
        return "list", items
    return None


def math_equal(pred, gold):
    """MATH equivalence without a CAS: normal forms equal, numbers equal (rel 1e-6), or
    tuples / intervals / matrices equal element-wise (bare lists in any order)."""
    preds = {normalize_math(pred), normalize_math(_strip_units(pred))}
    golds = {normalize_math(gold), normalize_math(_strip_units(gold))}
    for p in preds:
        for g in golds:
            if p == g or _numbers_equal(p, g):
                return True
            ep, eg = _elements(p), _elements(g)
            if ep and eg and ep[0] == eg[0] and _same_elements(ep[0], ep[1], eg[1]):
                return True
    return False


def _same_elements(kind, preds, golds):
    """Element by element; a bare list matches in any order (solutions like "1, -2")."""
    if len(preds) != len(golds):
        return False
    if kind != "list":
        return all(map(math_equal, preds, golds))
    left = list(golds)
    for p in preds:
        match = next((g for g in left if math_equal(p, g)), None)
        if match is None:
            return False
        left.remove(match)
    return True


def _first_number(text):
    m = _NUMBER.search(text)
    return m[0].replace(",", "").replace("$", "") if m else None


def extract_answer(text, task):
    """The final answer a rationale states, by the task's rules (None if there is none).
    math: last \\boxed{}; numeric tasks: `#### N`, \\boxed{}, "The answer is N", last number;
    csqa/gpqa: a choice letter after "answer"; strategyqa: yes/no."""
    if task == "math" or task is None:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
        said = [a.strip().rstrip(".").strip("$ ") for a in _ANSWER_IS.findall(text)]
        return said[-1] if said and said[-1] else None
    if task in ("gsm8k", "svamp"):
        if marked := re.findall(r"####\s*(.*)", text):
            return _first_number(marked[-1])
        # by preference: the boxed answer, the stated ones from the last, the last number
        stated = _ANSWER_IS.findall(text)[::-1]
        for said in [last_boxed(text) or "", *stated, *_NUMBER.findall(text)[-1:]]:
            if num := _first_number(said):
                return num
        return None
    if task in ("csqa", "gpqa"):
        letters = "ABCDE" if task == "csqa" else "ABCD"
        pick = rf"\(?\s*([{letters}])\s*\)?(?![A-Za-z])"
        if m := re.fullmatch(pick, normalize_math(last_boxed(text) or "")):
            return m[1]
        if found := re.findall(_ANSWER_PREFIX + pick, text):
            return found[-1]
        m = re.fullmatch(r"\s*" + pick + r"\s*\.?\s*", text)
        return m[1] if m else None
    if task == "strategyqa":  # the stated answer's first yes/no, else the last one anywhere
        yes_no = r"\b(yes|no|true|false)\b"
        said = [re.match(r"\W*" + yes_no, a, re.I) for a in _ANSWER_IS.findall(text)]
        words = [m[1] for m in said if m]
        words = words or re.findall(yes_no, last_boxed(text) or text, re.I)
        return _YES_NO[words[-1].lower()] if words else None
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def is_equivalent(pred, gold, task):
    """Whether an extracted answer matches the gold answer under the task's rules."""
    if pred is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if task in ("gsm8k", "svamp"):
        return _numbers_equal(pred, gold)
    if task in ("csqa", "gpqa"):
        return pred.strip("() .").upper() == gold.strip("() .").upper()
    if task == "strategyqa":
        return pred.lower() in _YES_NO and _YES_NO[pred.lower()] == _YES_NO.get(gold.lower())
    return math_equal(pred, gold)


# --- batches: branch tokens, packed rows, shards (SPEC.md §1, §9) ---

# SPEC §3.1: the alphabetic head of Qian et al.'s thinking tokens, plus connectives.
THINKING_WORDS = ("so", "let", "hmm", "okay", "first", "now", "wait", "but", "then", "since",
                  "therefore", "maybe", "thus", "hence", "however", "because", "alternatively",
                  "next", "finally")

INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": 'Please reason step by step, and finish with "The answer is" and the final number.',
    "csqa": ('Please reason step by step, and finish with "The answer is" and the letter of the '
             'correct choice.'),
    "strategyqa": ('Please reason step by step, and finish with "The answer is yes" or '
                   '"The answer is no".'),
}
INSTRUCTIONS["svamp"] = INSTRUCTIONS["gsm8k"]
INSTRUCTIONS["gpqa"] = INSTRUCTIONS["csqa"]

# Segment codes of a branch's tokens: prompt(x) ⊕ r_k ⊕ cue ⊕ y ⊕ close ⊕ eot.
PROMPT, RATIONALE, CUE, ANSWER, CLOSE, EOT = range(6)


def user_prompt(question, task):
    """The user turn for a question: the question and its task's zero-shot CoT instruction
    (training and evaluation use this same text)."""
    return f"{question}\n{INSTRUCTIONS[task]}" if task in INSTRUCTIONS else question


def answer_cue(task):
    """(cue, close) around the gold answer: boxed for MATH, plain otherwise."""
    return ("\nThe answer is $\\boxed{", "}$") if task == "math" else ("\nThe answer is ", ".")


def think_starts(text, offsets, words=THINKING_WORDS):
    """Per token: does a thinking word (whole word, any case) start inside its char span?"""
    pattern = r"\b(?:" + "|".join(map(re.escape, words)) + r")\b"
    starts = [m.start() for m in re.finditer(pattern, text, re.IGNORECASE)]
    marks = [False] * len(offsets)
    i = 0
    for t, (a, b) in enumerate(offsets):
        while i < len(starts) and starts[i] < a:
            i += 1
        if i < len(starts) and a <= starts[i] < b:
            marks[t] = True
            i += 1
    return marks


@dataclass
class EncodedInstance:
    id: str
    branches: list  # per branch (ids, segment codes, think marks): three equal-length lists
    teacher: list  # per branch: index into the run's sorted teacher list
    probe_ids: list  # cue ⊕ y
    probe_answer_mask: list
    dropped: int = 0  # branches dropped for max_len


def encode_instance(inst, tok, teachers, max_len, thinking_words=THINKING_WORDS, drops=None):
    """Tokenize every branch, each segment on its own so y's ids are the same in every branch.
    Rationales of teachers not in `teachers` are left out; a branch over max_len is dropped whole
    (never cut) and counted in `drops` (a Counter by teacher, if given). None if no branch is
    left. A text too long by tok.min_tokens' cheap bound is dropped untokenized (a 6 MB
    rationale costs no more memory than its characters)."""
    question = user_prompt(inst.question, inst.task)
    prompt = None
    if tok.min_tokens(question) <= max_len:  # a huge question is not even tokenized
        prompt = tok.encode_chat([{"role": "user", "content": question}])
    cue_text, close_text = answer_cue(inst.task)
    cue = tok.encode(cue_text)
    y = tok.encode(inst.answer)
    tail = [(cue, CUE), (y, ANSWER), (tok.encode(close_text), CLOSE), ([tok.eot_id], EOT)]
    fixed = max_len + 1 if prompt is None else len(prompt)  # the tokens of all but r_k
    fixed += sum(len(ids) for ids, _ in tail)
    branches = []
    teacher = []
    for name, text in inst.rationales:
        if name not in teachers:
            continue
        text = text.strip()
        fits = fixed + tok.min_tokens(text) <= max_len
        if fits:
            r, offsets = tok.encode_with_offsets(text)
            fits = fixed + len(r) <= max_len
        if not fits:
            if drops is not None:
                drops[name] += 1
            continue
        segments = [(prompt, PROMPT), (r, RATIONALE)] + tail
        think = [False] * len(prompt) + think_starts(text, offsets, thinking_words)
        think += [False] * (fixed - len(prompt))  # the tail's
        ids = [i for seg, _ in segments for i in seg]
        codes = [code for seg, code in segments for _ in seg]
        branches.append((ids, codes, think))
        teacher.append(teachers.index(name))
    if not branches:
        return None
    dropped = sum(name in teachers for name, _ in inst.rationales) - len(branches)
    answer_mask = [False] * len(cue) + [True] * len(y)
    return EncodedInstance(inst.id, branches, teacher, cue + y, answer_mask, dropped)


def encode_dataset(instances, tok, teachers=None, max_len=2048, thinking_words=THINKING_WORDS):
    """Encode instances for training; returns (encoded, stats). `teachers` (a subset, e.g.
    from --teachers) defaults to every teacher in the data; the list is sorted. stats counts the
    instances without a rationale of `teachers` apart from those dropped for max_len."""
    known = teacher_names(instances)
    teachers = sorted(teachers) if teachers else known
    if unknown := [t for t in teachers if t not in known]:
        raise DataError(f"unknown teacher(s) {', '.join(unknown)}; "
                        f"the data has {', '.join(known)}")
    stats = Counter(instances=len(instances), without_teacher=0, dropped_instances=0)
    drops = Counter()  # branches dropped for max_len, per teacher, of dropped instances too
    encoded = []
    for inst in instances:
        if not any(name in teachers for name, _ in inst.rationales):
            stats["without_teacher"] += 1
            continue
        e = encode_instance(inst, tok, teachers, max_len, thinking_words, drops)
        stats["dropped_instances"] += e is None
        if e is not None:
            encoded.append(e)
            stats["branches"] += len(e.branches)
    stats["dropped_branches"] = sum(drops.values())
    per_teacher = dict(sorted(drops.items()))
    return encoded, dict(stats, dropped_per_teacher=per_teacher, teachers=teachers)


def load_data(model, data, max_len, teachers="", thinking_words="", skip_bad=False, limit=None,
              rank=0):
    """(tokenizer, encoded instances, data stats with the sorted teacher list) of a multi-teacher
    file, for --model's tokenizer; rank 0 says on stderr what was dropped, and why."""
    tok = Tokenizer.from_pretrained(model)
    stats = {}
    instances = load_multi_teacher(data, skip_bad, stats)[:limit]
    encoded, encoding = encode_dataset(instances, tok, flag_names(teachers) or None, max_len,
                                       flag_names(thinking_words) or THINKING_WORDS)
    stats.update(encoding)
    dropped = (f"dropped {stats['without_teacher']} instances without a rationale of --teachers, "
               f"{stats['dropped_instances']} instances and {stats['dropped_branches']} branches "
               f"({stats['dropped_per_teacher']}) over --max-len {max_len}")
    if not encoded:
        raise DataError(f"{data}: no instance is left: {dropped}")
    if rank == 0:
        print(f"data: {len(encoded)} instances, {stats['branches']} branches, teachers "
              f"{', '.join(stats['teachers'])} | {dropped}", file=sys.stderr, flush=True)
    return tok, encoded, stats


def collate(batch):
    """EncodedInstances -> one packed row (SPEC §9: no padding, each prompt once; model.py's
    diagram). [S] per token: ids, positions within the branch, prev (the row whose logits predict
    it), branch (−1: prompt), masks. [N] per branch: slot (b·K + k), last_rows (its eot);
    rationale_rows [N, R], answer_rows [N, J] (−1 = none). [B, K]: branch_mask, teacher.
    layout (host lists): prompt and branch (start, end) rows, probes, the model.Segments."""
    K = max(len(e.branches) for e in batch)
    teacher = torch.full((len(batch), K), -1, dtype=torch.long)
    row = {k: [] for k in ("input_ids", "codes", "think", "branch", "position_ids", "prev")}
    prompts = []  # per instance: its prompt's (start, end) rows
    spans = []  # per instance: its branches' (start, end) rows
    slot = []
    rationale = []
    answer = []

    def put(seq, first_pos, first_prev, n):
        """Append seq = (ids, codes, think) as branch n; returns its (start, end) rows."""
        start = len(row["input_ids"])
        m = len(seq[0])
        for key, values in zip(("input_ids", "codes", "think"), seq):
            row[key] += values
        row["branch"] += [n] * m
        row["position_ids"] += range(first_pos, first_pos + m)
        row["prev"] += [first_prev, *range(start, start + m - 1)]
        return start, start + m

    for b, e in enumerate(batch):
        L = e.branches[0][1].count(PROMPT)
        prompt = (e.branches[0][0][:L], [PROMPT] * L, [False] * L)
        prompts.append(put(prompt, 0, len(row["input_ids"]), -1))
        spans.append([])
        for k, seq in enumerate(e.branches):  # every branch: the same prompt, then its own
            start, end = put([x[L:] for x in seq], L, prompts[-1][1] - 1, len(slot))
            spans[-1].append((start, end))
            slot.append(b * K + k)
            teacher[b, k] = e.teacher[k]
            codes = seq[1][L:]
            rationale.append([start + i for i, c in enumerate(codes) if c == RATIONALE])
            answer.append([start + i for i, c in enumerate(codes) if c == ANSWER])
    codes = torch.tensor(row["codes"])
    flat = [span for s in spans for span in s]
    layout = {
        "prompts": prompts,
        "branches": flat,
        "probes": [(e.probe_ids, e.probe_answer_mask) for e in batch],
        "segments": packed_segments(prompts, spans),
    }
    out = {k: torch.tensor(row[k]) for k in ("input_ids", "position_ids", "prev", "branch")}
    return {
        **out,
        "sft_mask": codes > PROMPT,
        "rationale_mask": codes == RATIONALE,
        "answer_mask": codes == ANSWER,
        "think_mask": torch.tensor(row["think"], dtype=torch.bool),
        "slot": torch.tensor(slot),
        "last_rows": torch.tensor([end - 1 for _, end in flat]),
        "rationale_rows": _padded(rationale),
        "answer_rows": _padded(answer),
        "branch_mask": teacher >= 0,
        "teacher": teacher,
        "layout": layout,
    }


def _padded(rows):
    """Ragged int lists as one [N, longest] long tensor, padded with −1."""
    width = max(map(len, rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows]).long()


def to_device(batch, device):
    """A collate row's tensors on `device` (the layout's host lists stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def shard_indices(n, epoch, seed, rank, world_size, batch_size=1):
    """This rank's item order for an epoch: one seeded permutation shared by all ranks,
    wrapped to a multiple of world_size·batch_size, then every world_size-th item from rank,
    so every rank gets the same number of items and steps (none of none)."""
    # Seeded by derive_seed: this alone moves train.py's first-step loss ~1e-3 from older commits;
    # on the same batch the packed loss matches the old padded one to 2e-7.
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    perm = torch.randperm(n, generator=g).tolist()
    total = -(-n // (world_size * batch_size)) * world_size * batch_size
    return [perm[i % n] for i in range(total)][rank::world_size]


# --- benchmark loaders ---


def _choices(stem, options):
    return stem.strip() + "\nAnswer Choices:\n" + "\n".join(f"({k}) {v}" for k, v in options)


def _benchmark_row(task, i, row):
    """(id, question, answer) of one record of a benchmark's public format."""
    if task == "math":
        return row.get("unique_id", f"math-{i}"), row["problem"], row["answer"]
    if task == "gsm8k":
        answer = row["answer"].split("####")[-1].strip().replace(",", "")
        return f"gsm8k-{i}", row["question"], answer
    if task == "svamp":
        body = row["Body"].strip()
        if not body.endswith((".", "?", "!")):
            body += "."
        question = f"{body} {row['Question'].strip()}"
        return row.get("ID", f"svamp-{i}"), question, _as_answer(row["Answer"])
    if task == "csqa":
        q = row["question"]
        options = [(c["label"], c["text"]) for c in q["choices"]]
        return row.get("id", f"csqa-{i}"), _choices(q["stem"], options), row["answerKey"]
    if task == "strategyqa":
        if not isinstance(row["answer"], bool):
            raise ValueError("'answer' must be true or false")
        return row.get("qid", f"strategyqa-{i}"), row["question"], "yes" if row["answer"] else "no"
    if task == "gpqa":
        key = row.get("Record ID") or f"gpqa-{i}"
        options = [row["Correct Answer"]] + [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
        order = list(range(4))
        # fixed per item: runs stay comparable
        random.Random(derive_seed("gpqa", key)).shuffle(order)
        labelled = [("ABCD"[j], options[o].strip()) for j, o in enumerate(order)]
        return key, _choices(row["Question"], labelled), "ABCD"[order.index(0)]


def load_benchmark(task, path):
    """A benchmark in its public format as [{id, question, prompt, answer, task}]; prompt is
    the user turn (question with choices and the task's CoT instruction)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if task == "gpqa":
        rows = list(enumerate(csv.DictReader(io.StringIO(read_text(path))), 2))  # 1: header
    elif task == "strategyqa" and not path.endswith(".jsonl"):
        rows = list(enumerate(read_json(path, list), 1))  # a JSON list: "line" = item number
    else:
        rows = read_jsonl(path)
    out = []
    for n, (line, row) in enumerate(rows):
        try:
            iid, question, answer = _benchmark_row(task, n, row)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
            raise DataError(f"{path}:{line}: not a {task} record ({why})") from None
        out.append({"id": str(iid), "question": question, "prompt": user_prompt(question, task),
                    "answer": str(answer), "task": task})
    return out


# --- command line: build (teacher generations -> the multi-teacher file) and check ---


def read_questions(path, task=None):
    """A questions JSONL ({id, question, answer[, task]}) as Instances without rationales;
    `task` fills in a missing task. Bad lines raise DataError naming FILE:LINE."""
    def question(row):
        inst = _parse_instance({**row, "rationales": []} if isinstance(row, dict) else row)
        inst.task = inst.task or task
        if inst.task is None:
            raise ValueError("no task: give --task")
        return inst
    questions, problems = parse_multi_teacher(path, question)
    if problems:
        raise DataError(problems[0])
    return questions


def _batch_choices(path, lineno, row, ids):
    """(question id, None, order, text, cut off) per choice of one OpenAI-style batch output
    line."""
    cid = row["custom_id"]
    if not isinstance(cid, str) or not cid:
        raise DataError(f"{path}:{lineno}: 'custom_id' must be a non-empty string")
    m = re.fullmatch(r"(.+)#(\d+)", cid)  # ID#S: one request per sample, S-th of question ID
    qid, sample = (m[1], int(m[2])) if m and cid not in ids else (cid, 0)
    response = row.get("response")
    status = response.get("status_code", 200) if isinstance(response, dict) else 200
    if row.get("error") or response is None or status != 200:
        return []  # a failed request: its question counts as missing
    body = response.get("body") if isinstance(response, dict) else None
    choices = body.get("choices") if isinstance(body, dict) else None
    messages = isinstance(choices, list) and all(
        isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
    if not messages:
        raise DataError(f"{path}:{lineno}: a batch output line needs "
                        "response.body.choices[].message")
    out = []
    for j, c in enumerate(choices):
        parts = [c["message"].get(k) for k in ("reasoning_content", "reasoning", "content")]
        if not all(x is None or isinstance(x, str) for x in parts):
            raise DataError(f"{path}:{lineno}: choices[{j}].message: "
                            "content must be a string or null")
        text = "\n\n".join(x for x in parts if x)  # a reasoning parser's thoughts, then the reply
        order = (sample, c.get("index", j), lineno)
        out.append((qid, None, order, text, c.get("finish_reason") == "length"))
    return out


def read_generations(path, ids=()):
    """(question id, question text, order, text, cut off) per generation of one teacher's file:
    our lines ({id or question, text|output|response[, sample][, stopped]}, as eval.py
    rationales writes) or OpenAI-style batch output (custom_id = the question id, or ID#S for
    its S-th request; see docs/usage.md). order = (sample, choice, line); cut off = stopped
    false, or finish_reason "length" (the teacher ran out of tokens)."""
    out = []
    for lineno, row in read_jsonl(path):
        if isinstance(row, dict) and "custom_id" in row:
            out += _batch_choices(path, lineno, row, ids)
            continue
        if not isinstance(row, dict) or not ("id" in row or "question" in row):
            raise DataError(f"{path}:{lineno}: a generation needs 'id' or 'question' "
                            "(or batch 'custom_id')")
        sample = row.get("sample", 0)
        if not isinstance(sample, int) or isinstance(sample, bool):
            raise DataError(f"{path}:{lineno}: 'sample' must be an integer")
        question = row["question"] if isinstance(row.get("question"), str) else None
        texts = [row[k] for k in ("text", "output", "response") if isinstance(row.get(k), str)]
        if not texts:
            raise DataError(f"{path}:{lineno}: a generation needs a string 'text', 'output' "
                            "or 'response'")
        out.append((str(row["id"]) if "id" in row else None, question, (sample, 0, lineno),
                    texts[0], row.get("stopped") is False))
    return out


# how far a generation got, in order
STAGES = ("missing", "no_answer", "wrong", "too_long", "kept")


def _stage(q, name, text, cut_off, tok, max_len):
    """The index in STAGES of one generation for question q."""
    if not text.strip():
        return 0
    if cut_off:
        return 3
    pred = extract_answer(text, q.task)
    if pred is None:
        return 1
    if not is_equivalent(pred, q.answer, q.task):
        return 2
    branch = Instance(q.id, q.question, q.answer, q.task, [(name, text)])
    return 4 if tok is None or encode_instance(branch, tok, [name], max_len) is not None else 3


def build(questions_path, teachers, task, out_path, min_teachers=1, max_len=None, model_dir=None):
    """Join questions with each teacher's generations (by id, else by exact question text) and
    keep per teacher and question the first rationale in sample order that states the gold
    answer, was not cut off and, with max_len, fits max_len tokens of model_dir's tokenizer (as
    train.py --max-len counts). Returns per teacher the questions by the furthest STAGE of
    their generations. Writes nothing when a teacher keeps nothing."""
    names = [name for name, _ in teachers]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"--teacher {twice[0]} is given twice: each teacher needs one name")
    if min_teachers < 1:
        raise DataError(f"--min-teachers {min_teachers}: must be at least 1 "
                        "(an instance needs a rationale)")
    if (max_len is None) != (model_dir is None) or (max_len is not None and max_len < 1):
        raise DataError("--max-len N (>= 1) and --model DIR go together "
                        "(the student's tokenizer counts)")
    tok = Tokenizer.from_pretrained(model_dir) if model_dir else None
    questions = read_questions(questions_path, task)
    if not questions:
        raise DataError(f"{questions_path}: no questions")
    ids = {q.id for q in questions}
    report = {}
    empty = []  # a line per teacher that keeps nothing
    for name, path in teachers:
        found = {}  # ("id", id) or ("question", text): [(order, text, cut off)]
        for qid, question, order, text, cut_off in read_generations(path, ids):
            for key in (("id", qid), ("question", question)):
                if key[1] is not None:
                    found.setdefault(key, []).append((order, text, cut_off))
        counts = Counter({stage: 0 for stage in STAGES})
        for q in questions:
            best = 0
            tries = found.get(("id", q.id)) or found.get(("question", q.question)) or []
            for _, text, cut_off in sorted(tries):
                best = max(best, _stage(q, name, text, cut_off, tok, max_len))
                if best == 4:
                    q.rationales.append((name, text))
                    break
            counts[STAGES[best]] += 1
        report[name] = dict(counts)
        if not counts["kept"]:
            tally = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items())
            empty.append(f"{path}: teacher {name} has no usable rationale for any of the "
                         f"{len(questions)} questions ({tally})")
    if empty:
        raise DataError("\n".join(empty) + "\n(no ids or question texts in common with "
                        f"{questions_path}? another --task? nothing written)")
    kept = [q for q in questions if len(q.rationales) >= min_teachers]
    write_jsonl(out_path, [{"id": q.id, "question": q.question, "answer": q.answer, "task": q.task,
                            "rationales": [{"teacher": t, "text": r} for t, r in q.rationales]}
                           for q in kept])
    report["instances"] = {"written": len(kept), "dropped": len(questions) - len(kept)}
    return report


def check(path, model_dir=None, skip_bad=False):
    """Validate a multi-teacher file and return its statistics as printable lines."""
    instances = load_multi_teacher(path, skip_bad)
    per_teacher = Counter(t for inst in instances for t, _ in inst.rationales)
    per_instance = sum(per_teacher.values()) / max(len(instances), 1)
    tasks = Counter(inst.task for inst in instances)
    lines = [f"{path}: {len(instances)} instances, {per_instance:.2f} branches per instance",
             "tasks: " + ", ".join(f"{t} {n}" for t, n in tasks.items())]
    lines += [f"  {t:<24} {n:>7} branches" for t, n in sorted(per_teacher.items())]
    if model_dir:
        encoded, _ = encode_dataset(instances, Tokenizer.from_pretrained(model_dir), max_len=10**9)
        lengths = sorted(len(ids) for e in encoded for ids, _, _ in e.branches)
        if lengths:
            mean = sum(lengths) / len(lengths)
            p95 = lengths[int(0.95 * (len(lengths) - 1))]
            lines.append(f"branch tokens: min {lengths[0]}, mean {mean:.0f}, p95 {p95}, "
                         f"max {lengths[-1]}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="assemble a multi-teacher file from teacher generations")
    b.add_argument("--questions", required=True, help="JSONL of {id, question, answer[, task]}")
    b.add_argument("--teacher", action="append", required=True, metavar="NAME=FILE",
                   help="a teacher's generations: eval.py rationales output, JSONL of "
                        "{id or question, text}, or OpenAI-style batch output; repeat")
    b.add_argument("--task", choices=TASKS, help="answer checking for questions without a task")
    b.add_argument("--out", required=True)
    b.add_argument("--min-teachers", type=int, default=1,
                   help="drop instances with fewer rationales")
    b.add_argument("--max-len", type=int,
                   help="drop rationales whose branch is longer (train.py --max-len)")
    b.add_argument("--model",
                   help="the student's tokenizer directory, which counts --max-len tokens")
    c = sub.add_parser("check", help="validate a multi-teacher file and print statistics")
    c.add_argument("file")
    c.add_argument("--model", help="a model/tokenizer directory, for token lengths")
    c.add_argument("--skip-bad", action="store_true",
                   help="drop bad lines (counted) instead of stopping")
    args = p.parse_args(argv)
    with user_errors("data.py " + args.command):
        if args.command == "build":
            build_command(args)
        else:
            print("\n".join(check(args.file, args.model, args.skip_bad)))


def build_command(args):
    """data.py build: the report as a table, one row per teacher."""
    teachers = [spec.split("=", 1) for spec in args.teacher]
    for spec, pair in zip(args.teacher, teachers):
        if len(pair) < 2 or not all(pair):
            raise DataError(f"--teacher {spec!r}: expected NAME=FILE")
    report = build(args.questions, teachers, args.task, args.out, args.min_teachers,
                   args.max_len, args.model)
    columns = (("kept", 6), ("wrong", 6), ("no_answer", 10), ("too_long", 9), ("missing", 8))
    print(f"{'teacher':<24} " + " ".join(f"{k.replace('_', ' '):>{w}}" for k, w in columns))
    for name, _ in teachers:
        print(f"{name:<24} " + " ".join(f"{report[name][k]:>{w}}" for k, w in columns))
    written = report["instances"]["written"]
    dropped = report["instances"]["dropped"]
    print(f"wrote {written} instances to {args.out} "
          f"({dropped} with under {args.min_teachers} rationales dropped)")


if __name__ == "__main__":
    main()
