"""The text side of compact-ref: tokenizer and chat, the multi-teacher data format, answer
checking, branch batches (SPEC.md §1, §8, §9), benchmark loaders and a synthetic pool.

    python data.py build --questions Q.jsonl --teacher qwq=qwq.jsonl --teacher r1=r1.jsonl \
                         --task math --out train.jsonl [--min-teachers 2]
    python data.py check train.jsonl [--model DIR]
    python data.py synth --out DIR [--seed 0 --n-train 256 --n-test 64]

Runs on torch, tokenizers, jinja2 and the standard library; transformers is only a test oracle.
Left out: sympy-grade answer checking (expressions are compared textually after
normalisation, numbers numerically), multi-turn training data, tool-calling templates
beyond what the checkpoint's own template renders, and generation itself (model.py).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import tokenizers
import torch
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

# ----------------------------------------------------------------------------------------
# tokenizer and chat

# Built-in templates for checkpoints that ship none; picked only by an explicit chat_format.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
}


def _token_str(value):
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class Tokenizer:
    """A Hugging Face tokenizer directory read with `tokenizers` and rendered with jinja2.

    Two copies of the same tokenizer: `_control` matches special-token strings (used only
    for text the chat template itself writes), `_plain` never does (every piece of data).
    """

    def __init__(self, tokenizer_json, config=None, generation_config=None, chat_template=None,
                 path=None):
        self._control = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._plain = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._plain.encode_special_tokens = True  # "<|im_end|>" in data is seven text tokens
        self.config, self.path = config or {}, path
        self.chat_template = chat_template
        self._compiled = None
        self.special_ids = {i for i, t in self._control.get_added_tokens_decoder().items()
                            if t.special}
        self.tokens = {k: _token_str(self.config.get(k))
                       for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        gen_eos = (generation_config or {}).get("eos_token_id")
        gen_eos = [] if gen_eos is None else [gen_eos] if isinstance(gen_eos, int) else gen_eos
        eos = self.token_id(self.tokens["eos_token"])
        self.eos_ids = list(dict.fromkeys(gen_eos + ([eos] if eos is not None else [])))
        pad = self.token_id(self.tokens["pad_token"])
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        # BOS only where the template writes one: encode_chat then gets it from the text.
        uses_bos = chat_template is not None and "bos_token" in chat_template
        self.bos_id = self.token_id(self.tokens["bos_token"]) if uses_bos else None
        self._eot_id = None

    @classmethod
    def from_pretrained(cls, path, chat_format=None):
        """Read tokenizer.json, tokenizer_config.json, generation_config.json and the chat
        template (chat_template.jinja, else tokenizer_config's, else chat_format's built-in;
        an explicit chat_format wins)."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are read)")
        with open(tj, encoding="utf-8") as f:
            tokenizer_json = f.read()
        config = _read_json(os.path.join(path, "tokenizer_config.json"), {})
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        if chat_format is not None:
            if chat_format not in BUILTIN_TEMPLATES:
                raise ValueError(f"chat_format {chat_format!r}: known are {list(BUILTIN_TEMPLATES)}")
            template = BUILTIN_TEMPLATES[chat_format]
        gen = _read_json(os.path.join(path, "generation_config.json"), {})
        return cls(tokenizer_json, config, gen, template, path)

    @property
    def vocab_size(self):
        return self._control.get_vocab_size(with_added_tokens=True)

    def token_id(self, token):
        return None if token is None else self._control.token_to_id(token)

    def encode(self, text):
        """Plain text to ids: special-token strings stay text, no BOS/EOS added."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """Like encode, with each token's (start, end) character span in text."""
        enc = self._plain.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens=False):
        return self._control.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt=True, **kwargs):
        """The checkpoint's own chat template rendered as transformers' apply_chat_template
        renders it (sandboxed jinja2, trim_blocks, lstrip_blocks, strftime_now, tojson)."""
        if self.chat_template is None:
            raise ValueError(f"{self.path or 'tokenizer'}: no chat template (no "
                             "chat_template in tokenizer_config.json, no chat_template.jinja); "
                             "pick a built-in one with chat_format='chatml' or 'llama3'")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**self.tokens, **kwargs})

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        """Ids of a conversation: the template's own text may hold control tokens, message
        contents are plain text, so a question holding "<|im_end|>" cannot close a turn."""
        marks = [f"\x00compact-content-{i}\x00" for i in range(len(messages))]
        if any(mark in m["content"] for m in messages for mark in marks):
            raise ValueError("message content holds encode_chat's sentinel")
        marked = [{**m, "content": s} for m, s in zip(messages, marks)]
        skeleton = re.split("(" + "|".join(map(re.escape, marks)) + ")",
                            self.render_chat(marked, add_generation_prompt, **kwargs))
        full = self.render_chat(messages, add_generation_prompt, **kwargs)
        ids, pos = [], 0
        for j, piece in enumerate(skeleton):
            if j % 2 == 0:  # template text
                if not full.startswith(piece, pos):
                    raise ValueError("the chat template's own text depends on message content")
                ids += self._control.encode(piece, add_special_tokens=False).ids if piece else []
                pos += len(piece)
                continue
            content, after = messages[marks.index(piece)]["content"], skeleton[j + 1]
            for c in (content, content.strip(), content.rstrip(), content.lstrip()):  # `| trim`
                if full.startswith(c + after, pos) and (after or pos + len(c) == len(full)):
                    break
            else:
                raise ValueError("the chat template rewrites message content beyond trimming")
            ids += self.encode(c)
            pos += len(c)
        return ids

    @property
    def eot_id(self):
        """The template's end-of-turn token: the first special token the template writes
        after an assistant message (<|im_end|> for ChatML, <|eot_id|> for Llama 3)."""
        if self._eot_id is None:
            mark = "\x00assistant\x00"
            text = self.render_chat([{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": mark}], False)
            tail = self._control.encode(text.split(mark, 1)[1], add_special_tokens=False).ids
            found = [i for i in tail if i in self.special_ids]
            if not found and not self.eos_ids:
                raise ValueError("cannot find the template's end-of-turn token")
            self._eot_id = found[0] if found else self.eos_ids[0]
        return self._eot_id


# The token split regex Qwen2 / Llama 3 tokenizers use before byte-level BPE.
_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_FAMILIES = {  # special tokens, bos, eos, pad, generation_config eos ids (as tokens)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
               "<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"], "<|begin_of_text|>",
               "<|eot_id|>", None, ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
}


def write_tokenizer(out_dir, texts, vocab_size=512, template="chatml", chat_template=None):
    """Train a tiny byte-level BPE on texts and write a complete HF tokenizer directory
    (tokenizer.json, tokenizer_config.json with a chat template, generation_config.json).
    template picks the special-token family ("chatml" or "llama3"); chat_template
    overrides the jinja text (default: the family's built-in template)."""
    specials, bos, eos, pad, gen_eos = _FAMILIES[template]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if bos is not None:  # like Llama 3: the post-processor adds BOS when asked to
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": pad, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "chat_template": chat_template or BUILTIN_TEMPLATES[template]}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}, f, indent=2)
    return out_dir


# ----------------------------------------------------------------------------------------
# multi-teacher data format (SPEC.md §8)

TASKS = ("math", "gsm8k", "svamp", "csqa", "strategyqa", "gpqa")


class DataError(ValueError):
    """Bad input data; the message names FILE:LINE. The CLI prints it and exits 2."""


@dataclass
class Instance:
    id: str
    question: str
    answer: str
    task: str | None = None  # picks answer extraction, the instruction and the cue
    rationales: list[tuple[str, str]] = field(default_factory=list)  # [(teacher, text)]


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
    if not isinstance(iid, str) or not iid:
        raise ValueError("'id' must be a non-empty string")
    question, answer = obj.get("question"), _as_answer(obj.get("answer"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("'answer' must be a non-empty string")
    task = obj.get("task")
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    rationales = obj.get("rationales", [])
    if not isinstance(rationales, list):
        raise ValueError("'rationales' must be a list")
    seen, pairs = set(), []
    for k, r in enumerate(rationales):
        if not isinstance(r, dict) or not isinstance(r.get("teacher"), str) or not r["teacher"]:
            raise ValueError(f"rationales[{k}] needs a non-empty string 'teacher'")
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise ValueError(f"rationales[{k}] ({r['teacher']}): 'text' must be a non-empty string")
        if r["teacher"] in seen:
            raise ValueError(f"teacher {r['teacher']!r} appears twice")
        seen.add(r["teacher"])
        pairs.append((r["teacher"], r["text"]))
    return Instance(iid, question, answer.strip(), task, pairs)


def _report(path, problems, limit=10):
    head = "\n".join(problems[:limit])
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} problem(s) in {path}:\n{head}{more}"


def _read_text(path):
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _jsonl(path):
    """(line number, object or the JSON error's message) per non-blank line."""
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, f"bad JSON ({e.msg}, column {e.colno})"


def read_jsonl(path):
    """[(line number, object)] of a JSONL file; bad JSON raises DataError naming the line."""
    rows = list(_jsonl(path))
    if bad := next(((n, r) for n, r in rows if isinstance(r, str)), None):
        raise DataError(f"{path}:{bad[0]}: {bad[1]}")
    return rows


def parse_multi_teacher(path):
    """All good instances of a multi-teacher JSONL file and a `FILE:LINE: message` per bad line."""
    instances, problems, first_line = [], [], {}
    for lineno, obj in _jsonl(path):
        try:
            if isinstance(obj, str):
                raise ValueError(obj)
            inst = _parse_instance(obj)
            if inst.id in first_line:
                raise ValueError(f"duplicate id {inst.id!r} (first on line {first_line[inst.id]})")
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}")
            continue
        first_line[inst.id] = lineno
        instances.append(inst)
    return instances, problems


def load_multi_teacher(path, skip_bad=False):
    """Read and validate a multi-teacher file. Bad lines raise DataError, or with
    skip_bad=True are dropped and counted on stderr."""
    instances, problems = parse_multi_teacher(path)
    if problems and not skip_bad:
        raise DataError(_report(path, problems))
    if problems:
        print(f"{path}: skipped {len(problems)} bad line(s), kept {len(instances)}", file=sys.stderr)
    return instances


def teacher_names(instances):
    """The run's teacher list: sorted, so a teacher's index means the same in every rank."""
    return sorted({t for inst in instances for t, _ in inst.rationales})


# ----------------------------------------------------------------------------------------
# answer extraction and equivalence

_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
# An answer *statement*: "The answer is", "answer: ", "**Answer:**", "**Answer**:"; not any "answer" word.
_ANSWER_PREFIX = r"(?i:answer)\s*(?:\*\*)?\s*(?:(?i:is)\b\s*[:：]?|[:：])\s*(?:\*\*)?\s*[:：]?\s*"
_ANSWER_IS = re.compile(_ANSWER_PREFIX + "(.*)")


def last_boxed(text):
    """Content of the last balanced \\boxed{...} or \\fbox{...} (also `\\boxed 5`), or None."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s\S)", text)]
    if not starts:
        return None
    m = starts[-1]
    if m.group(1) != "{":
        return re.split(r"[\s$]", text[m.end() - 1:], maxsplit=1)[0]
    depth, i = 1, m.end()
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end():i - 1].strip() if depth == 0 else None


def _unwrap(s, command):
    """Replace every \\command{x} by x (balanced braces)."""
    while (j := s.find("\\" + command + "{")) >= 0:
        k, depth = j + len(command) + 2, 1
        while k < len(s) and depth:
            depth += {"{": 1, "}": -1}.get(s[k], 0)
            k += 1
        s = s[:j] + s[j + len(command) + 2:k - 1] + s[k:]
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
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if m := re.fullmatch(r"(-?)(\d+)/(\d+)", s):
        s = f"{m[1]}\\frac{{{m[2]}}}{{{m[3]}}}"
    if m := re.fullmatch(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w+)?(?:=|\\in)(.+)", s):
        s = m[1]  # "x=5" -> "5", "x\in[-2,7]" -> "[-2,7]"
    if m := re.fullmatch(r"\(([A-Z])\)", s):
        s = m[1]
    return s


def _strip_units(s):
    """Drop unit words written as \\text{ cm}^2 / \\mbox{ inches} after a value."""
    out = re.sub(r"\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s]*\}(?:\^\{?\d\}?)?", "", s)
    return out if out.strip() else s


def parse_number(s):
    """A float from '-12', '1,000', '.5', '$3', '\\frac{3}{4}', '-3/4', '1\\frac{4}{5}' (mixed
    number), else None."""
    s = s.replace("$", "").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)", s):  # not float()'s "1_0", "nan", "1e5"
        return float(s)
    if m := re.fullmatch(r"(-?)(\d*)\\frac\{(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s) or \
            re.fullmatch(r"(-?)()(\d+)/(\d+)", s):
        if float(m[4]) == 0:
            return None
        value = (float(m[2]) if m[2] else 0.0) + float(m[3]) / float(m[4])
        return -value if m[1] else value
    return None


def _numbers_equal(a, b):
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def _split_top(s, seps=","):
    """Split on separators not nested inside (), [], {}."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch in seps and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _elements(s):
    """(kind, items) of a tuple/interval/matrix/bare list, or None for a single value."""
    if m := re.fullmatch(r"\\begin\{([pb]matrix)\}(.*)\\end\{\1\}", s):
        return "matrix", [x for row in m[2].split("\\\\") for x in row.split("&")]
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and len(items := _split_top(s[1:-1])) > 1:
        return s[0] + s[-1], items
    if len(items := _split_top(s)) > 1:
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
            if ep and eg and ep[0] == eg[0] and len(ep[1]) == len(eg[1]):
                if ep[0] == "list" and _same_multiset(ep[1], eg[1]):
                    return True
                if ep[0] != "list" and all(math_equal(a, b) for a, b in zip(ep[1], eg[1])):
                    return True
    return False


def _same_multiset(preds, golds):
    """Every pred matches a different gold (solution lists like "1, -2" have no order)."""
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
        if m := re.findall(r"####\s*(.*)", text):
            return _first_number(m[-1])
        boxed = last_boxed(text)
        if boxed is not None and _first_number(boxed):
            return _first_number(boxed)
        for said in reversed(_ANSWER_IS.findall(text)):
            if num := _first_number(said):
                return num
        nums = _NUMBER.findall(text)
        return nums[-1].replace(",", "").replace("$", "") if nums else None
    if task in ("csqa", "gpqa"):
        letters = "ABCDE" if task == "csqa" else "ABCD"
        pick = rf"\(?\s*([{letters}])\s*\)?(?![A-Za-z])"
        boxed = last_boxed(text)
        if boxed is not None and (m := re.fullmatch(pick, normalize_math(boxed))):
            return m[1]
        found = re.findall(_ANSWER_PREFIX + pick, text)
        if found:
            return found[-1]
        m = re.fullmatch(r"\s*" + pick + r"\s*\.?\s*", text)
        return m[1] if m else None
    if task == "strategyqa":  # the stated answer's first yes/no, else the last one anywhere
        yes_no = r"(?i)\b(yes|no|true|false)\b"
        said = [m[1] for a in _ANSWER_IS.findall(text) if (m := re.match(r"\W*" + yes_no[4:], a, re.I))]
        words = said or re.findall(yes_no, last_boxed(text) or text)
        return {"yes": "yes", "true": "yes", "no": "no", "false": "no"}[words[-1].lower()] \
            if words else None
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
        yes = {"yes": True, "true": True, "no": False, "false": False}
        return yes.get(pred.lower()) is not None and yes.get(pred.lower()) == yes.get(gold.lower())
    return math_equal(pred, gold)


# ----------------------------------------------------------------------------------------
# branch tokenization and batches (SPEC.md §1, §9)

# SPEC §3.1: the alphabetic head of Qian et al.'s thinking tokens, plus connectives.
THINKING_WORDS = ("so", "let", "hmm", "okay", "first", "now", "wait", "but", "then", "since",
                  "therefore", "maybe", "thus", "hence", "however", "because", "alternatively",
                  "next", "finally")

INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "gsm8k": 'Please reason step by step, and finish with "The answer is" and the final number.',
    "csqa": 'Please reason step by step, and finish with "The answer is" and the letter of the '
            'correct choice.',
    "strategyqa": 'Please reason step by step, and finish with "The answer is yes" or '
                  '"The answer is no".',
}
INSTRUCTIONS["svamp"], INSTRUCTIONS["gpqa"] = INSTRUCTIONS["gsm8k"], INSTRUCTIONS["csqa"]

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
    starts = [m.start() for m in re.finditer(
        r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", text, re.IGNORECASE)]
    marks, i = [False] * len(offsets), 0
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
    """Tokenize every branch of an instance, each segment on its own so y's ids are the same
    in every branch. Rationales of teachers not in `teachers` are left out; a branch longer
    than max_len is dropped whole (never cut) and counted in `drops` (a Counter by teacher name,
    if given). None when no branch is left."""
    prompt = tok.encode_chat([{"role": "user", "content": user_prompt(inst.question, inst.task)}])
    cue_text, close_text = answer_cue(inst.task)
    cue, y, close = tok.encode(cue_text), tok.encode(inst.answer), tok.encode(close_text)
    tail = [(cue, CUE), (y, ANSWER), (close, CLOSE), ([tok.eot_id], EOT)]
    branches, teacher, dropped = [], [], 0
    for name, text in inst.rationales:
        if name not in teachers:
            continue
        text = text.strip()
        r, offsets = tok.encode_with_offsets(text)
        segments = [(prompt, PROMPT), (r, RATIONALE)] + tail
        if sum(len(ids) for ids, _ in segments) > max_len:
            dropped += 1
            if drops is not None:
                drops[name] += 1
            continue
        think = [False] * len(prompt) + think_starts(text, offsets, thinking_words)
        think += [False] * sum(len(ids) for ids, _ in tail)
        branches.append(([i for ids, _ in segments for i in ids],
                         [code for ids, code in segments for _ in ids], think))
        teacher.append(teachers.index(name))
    if not branches:
        return None
    return EncodedInstance(inst.id, branches, teacher, cue + y, [False] * len(cue) + [True] * len(y),
                           dropped)


def encode_dataset(instances, tok, teachers=None, max_len=2048, thinking_words=THINKING_WORDS):
    """Encode instances for training; returns (encoded, stats). `teachers` (a subset, e.g.
    from --teachers) defaults to every teacher in the data; the list is sorted."""
    known = teacher_names(instances)
    teachers = sorted(teachers) if teachers else known
    if unknown := [t for t in teachers if t not in known]:
        raise DataError(f"unknown teacher(s) {', '.join(unknown)}; the data has {', '.join(known)}")
    encoded, stats, drops = [], Counter(instances=len(instances)), Counter()
    for inst in instances:
        e = encode_instance(inst, tok, teachers, max_len, thinking_words, drops)
        stats["dropped_instances"] += e is None
        if e is not None:
            encoded.append(e)
            stats["branches"] += len(e.branches)
    # Every branch dropped for max_len, per teacher, those of dropped instances included.
    stats["dropped_branches"] = sum(drops.values())
    return encoded, dict(stats, dropped_per_teacher=dict(sorted(drops.items())), teachers=teachers)


def collate(batch, pad_id):
    """EncodedInstances to the SPEC §9 dict: [B,K,T] ids and masks, right-padded; [B,K]
    branch_mask and teacher (−1 for padding); [B,P] probe_ids and probe_answer_mask."""
    B, K = len(batch), max(len(e.branches) for e in batch)
    T = max(len(ids) for e in batch for ids, _, _ in e.branches)
    P = max(len(e.probe_ids) for e in batch)
    input_ids = torch.full((B, K, T), pad_id, dtype=torch.long)
    segment = torch.full((B, K, T), -1, dtype=torch.long)  # -1 = padding
    think = torch.zeros(B, K, T, dtype=torch.bool)
    teacher = torch.full((B, K), -1, dtype=torch.long)
    probe_ids = torch.full((B, P), pad_id, dtype=torch.long)
    probe_answer_mask = torch.zeros(B, P, dtype=torch.bool)
    for b, e in enumerate(batch):
        for k, (ids, codes, marks) in enumerate(e.branches):
            input_ids[b, k, :len(ids)] = torch.tensor(ids)
            segment[b, k, :len(ids)] = torch.tensor(codes)
            think[b, k, :len(ids)] = torch.tensor(marks)
            teacher[b, k] = e.teacher[k]
        probe_ids[b, :len(e.probe_ids)] = torch.tensor(e.probe_ids)
        probe_answer_mask[b, :len(e.probe_ids)] = torch.tensor(e.probe_answer_mask)
    return {"input_ids": input_ids, "attention_mask": segment >= 0, "sft_mask": segment > PROMPT,
            "rationale_mask": segment == RATIONALE, "answer_mask": segment == ANSWER,
            "think_mask": think, "branch_mask": teacher >= 0, "teacher": teacher,
            "probe_ids": probe_ids, "probe_answer_mask": probe_answer_mask}


def shard_indices(n, epoch, seed, rank, world_size, batch_size=1):
    """This rank's item order for an epoch: one seeded permutation shared by all ranks,
    wrapped to a multiple of world_size·batch_size, then every world_size-th item from rank,
    so every rank gets the same number of items and steps."""
    if n == 0:
        return []
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    total = -(-n // (world_size * batch_size)) * world_size * batch_size
    return [perm[i % n] for i in range(total)][rank::world_size]


# ----------------------------------------------------------------------------------------
# benchmark loaders

def _choices(stem, options):
    return stem.strip() + "\nAnswer Choices:\n" + "\n".join(f"({k}) {v}" for k, v in options)


def _benchmark_row(task, i, row):
    """(id, question, answer) of one record of a benchmark's public format."""
    if task == "math":
        return row.get("unique_id", f"math-{i}"), row["problem"], row["answer"]
    if task == "gsm8k":
        return f"gsm8k-{i}", row["question"], row["answer"].split("####")[-1].strip().replace(",", "")
    if task == "svamp":
        body = row["Body"].strip()
        body += "" if body.endswith((".", "?", "!")) else "."
        return row.get("ID", f"svamp-{i}"), f"{body} {row['Question'].strip()}", _as_answer(row["Answer"])
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
        random.Random(f"gpqa:{key}").shuffle(order)  # fixed per item: runs stay comparable
        letters = "ABCD"
        labelled = [(letters[j], options[o].strip()) for j, o in enumerate(order)]
        return key, _choices(row["Question"], labelled), letters[order.index(0)]
    raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")


def load_benchmark(task, path):
    """A benchmark in its public format as [{id, question, prompt, answer, task}]; prompt is
    the user turn (question with choices and the task's CoT instruction)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if task == "gpqa":
        import csv
        import io
        rows = list(enumerate(csv.DictReader(io.StringIO(_read_text(path))), 2))  # 1: header
    elif task == "strategyqa" and not path.endswith(".jsonl"):
        try:  # a JSON list: the "line" reported is the item number
            rows = list(enumerate(json.loads(_read_text(path)), 1))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: bad JSON ({e})") from None
    else:
        rows = read_jsonl(path)
    out = []
    for n, (line, row) in enumerate(rows):
        try:
            iid, question, answer = _benchmark_row(task, n, row)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(f"{path}:{line}: not a {task} record ({type(e).__name__}: {e})") from None
        out.append({"id": str(iid), "question": question, "prompt": user_prompt(question, task),
                    "answer": str(answer), "task": task})
    return out


# ----------------------------------------------------------------------------------------
# synthetic pool
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
    _write_jsonl(os.path.join(out_dir, "train.jsonl"), rows[:n_train])
    _write_jsonl(os.path.join(out_dir, "test.jsonl"), rows[n_train:])
    return rows[:n_train], rows[n_train:]


# ----------------------------------------------------------------------------------------
# CLI

def _write_jsonl(path, rows):
    """Write atomically: a temp file beside the target, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _generation_text(path, lineno, row):
    for key in ("text", "output", "response"):
        if isinstance(row.get(key), str):
            return row[key]
    raise DataError(f"{path}:{lineno}: a generation needs a string 'text', 'output' or 'response'")


def build(questions_path, teachers, task, out_path, min_teachers=1):
    """Join questions with each teacher's generations (by id, else by exact question text),
    keep rationales whose own final answer matches the gold one; returns the report."""
    names = [name for name, _ in teachers]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"--teacher {dup[0]} is given twice: each teacher needs one name")
    if min_teachers < 1:
        raise DataError(f"--min-teachers {min_teachers}: must be at least 1 (an instance needs a rationale)")
    questions, first_line = [], {}
    for lineno, row in read_jsonl(questions_path):
        try:
            inst = _parse_instance({**row, "rationales": []} if isinstance(row, dict) else row)
            if inst.id in first_line:
                raise ValueError(f"duplicate id {inst.id!r} (first on line {first_line[inst.id]})")
            if (inst.task or task) is None:
                raise ValueError("no task: give --task")
        except ValueError as e:
            raise DataError(f"{questions_path}:{lineno}: {e}") from None
        inst.task, first_line[inst.id] = inst.task or task, lineno
        questions.append(inst)
    report = {}
    for name, path in teachers:
        by_id, by_question = {}, {}
        for lineno, row in read_jsonl(path):
            if not isinstance(row, dict) or not ("id" in row or "question" in row):
                raise DataError(f"{path}:{lineno}: a generation needs 'id' or 'question'")
            text = _generation_text(path, lineno, row)
            if "id" in row:
                by_id.setdefault(str(row["id"]), text)
            if isinstance(row.get("question"), str):
                by_question.setdefault(row["question"], text)
        counts = Counter(kept=0, wrong=0, no_answer=0, missing=0)
        for q in questions:
            text = by_id.get(q.id) or by_question.get(q.question)
            if text is None or not text.strip():
                counts["missing"] += 1
                continue
            pred = extract_answer(text, q.task)
            verdict = "no_answer" if pred is None else \
                "kept" if is_equivalent(pred, q.answer, q.task) else "wrong"
            counts[verdict] += 1
            if verdict == "kept":
                q.rationales.append((name, text))
        report[name] = dict(counts)
    kept = [q for q in questions if len(q.rationales) >= min_teachers]
    _write_jsonl(out_path, [{"id": q.id, "question": q.question, "answer": q.answer, "task": q.task,
                             "rationales": [{"teacher": t, "text": r} for t, r in q.rationales]}
                            for q in kept])
    report["instances"] = {"written": len(kept), "dropped": len(questions) - len(kept)}
    return report


def check(path, model_dir=None, skip_bad=False):
    """Validate a multi-teacher file and return its statistics as printable lines."""
    instances = load_multi_teacher(path, skip_bad)
    per_teacher = Counter(t for inst in instances for t, _ in inst.rationales)
    lines = [f"{path}: {len(instances)} instances, "
             f"{sum(per_teacher.values()) / max(len(instances), 1):.2f} branches per instance",
             "tasks: " + ", ".join(f"{t} {n}" for t, n in Counter(i.task for i in instances).items())]
    lines += [f"  {t:<24} {n:>7} branches" for t, n in sorted(per_teacher.items())]
    if model_dir:
        tok = Tokenizer.from_pretrained(model_dir)
        encoded, _ = encode_dataset(instances, tok, max_len=10**9)
        lengths = sorted(len(ids) for e in encoded for ids, _, _ in e.branches)
        if lengths:
            lines.append(f"branch tokens: min {lengths[0]}, mean {sum(lengths) / len(lengths):.0f}, "
                         f"p95 {lengths[int(0.95 * (len(lengths) - 1))]}, max {lengths[-1]}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="assemble a multi-teacher file from teacher generations")
    b.add_argument("--questions", required=True, help="JSONL of {id, question, answer[, task]}")
    b.add_argument("--teacher", action="append", required=True, metavar="NAME=FILE",
                   help="a teacher's generations, JSONL of {id or question, text}; repeat")
    b.add_argument("--task", choices=TASKS, help="answer checking for questions without a task")
    b.add_argument("--out", required=True)
    b.add_argument("--min-teachers", type=int, default=1, help="drop instances with fewer rationales")
    c = sub.add_parser("check", help="validate a multi-teacher file and print statistics")
    c.add_argument("file")
    c.add_argument("--model", help="a model/tokenizer directory, for token lengths")
    c.add_argument("--skip-bad", action="store_true", help="drop bad lines (counted) instead of stopping")
    s = sub.add_parser("synth", help="write a synthetic arithmetic pool with four teachers")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-train", type=int, default=256)
    s.add_argument("--n-test", type=int, default=64)
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            teachers = []
            for spec in args.teacher:
                name, eq, path = spec.partition("=")
                if not eq or not name or not path:
                    raise DataError(f"--teacher {spec!r}: expected NAME=FILE")
                teachers.append((name, path))
            report = build(args.questions, teachers, args.task, args.out, args.min_teachers)
            print(f"{'teacher':<24} {'kept':>6} {'wrong':>6} {'no answer':>10} {'missing':>8}")
            for name, _ in teachers:
                r = report[name]
                print(f"{name:<24} {r['kept']:>6} {r['wrong']:>6} {r['no_answer']:>10} {r['missing']:>8}")
            print(f"wrote {report['instances']['written']} instances to {args.out} "
                  f"({report['instances']['dropped']} with under {args.min_teachers} rationales dropped)")
        elif args.command == "check":
            print("\n".join(check(args.file, args.model, args.skip_bad)))
        else:
            train, test = synth_pool(args.out, args.seed, args.n_train, args.n_test)
            print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")
    except (ValueError, OSError) as e:  # DataError, a missing file, a tokenizer without template
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
