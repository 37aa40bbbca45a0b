"""Tokenizer and chat templates: a Hugging Face tokenizer directory read with `tokenizers`,
its chat template rendered with sandboxed jinja2 exactly as transformers renders it.

    tok = Tokenizer.from_pretrained("Qwen2.5-1.5B-Instruct")
    ids = tok.encode_chat([{"role": "user", "content": "2 + 2?"}])  # up to the assistant header
    tok.decode(ids), tok.eos_ids, tok.eot_id, tok.pad_id

Text inside messages is always plain text: special-token strings in data stay text, so a
question holding "<|im_end|>" cannot close a turn. Left out: slow (sentencepiece-only)
tokenizers, multi-template tool calling beyond what the checkpoint's template renders.
"""
import functools
import json
import os
import re
import shutil
from datetime import datetime

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common import read_json, read_text, write_json, write_text

# Built-in templates for checkpoints that ship none; picked only by an explicit chat_format.
BUILTIN_TEMPLATES = {
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' "
              "+ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' "
              "+ message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
              "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
}


def _read(path, as_json=False):
    """The text of a tokenizer file, or the JSON object in it; None when there is no such file.
    A file that does not read or parse raises DataError naming it (common.read_text/read_json)."""
    if not os.path.exists(path):
        return None
    return read_json(path) if as_json else read_text(path)


# Jinja globals and filters of transformers' chat-template environment.

def _raise_exception(message):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A Hugging Face tokenizer directory read with `tokenizers` and rendered with jinja2.

    Two copies of the same tokenizer: `_control` matches special-token strings (used only
    for text the chat template itself writes), `_plain` never does (every piece of data).
    """

    def __init__(self, tokenizer_json, config=None, generation_config=None, chat_template=None,
                 path=None):
        try:
            self._control = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust parser's own error type
            raise ValueError(f"{path or '.'}/tokenizer.json: not a tokenizer file ({e})") from None
        self._plain = tokenizers.Tokenizer.from_str(tokenizer_json)
        self._plain.encode_special_tokens = True  # "<|im_end|>" in data is seven text tokens
        self.config = config or {}
        self.path = path
        self.chat_template = chat_template
        added = self._control.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.tokens = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = self.config.get(key)  # a string, or an AddedToken {"content": ...}
            self.tokens[key] = token.get("content") if isinstance(token, dict) else token
        gen_eos = (generation_config or {}).get("eos_token_id")
        eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        eos = self.token_id(self.tokens["eos_token"])
        if eos is not None:
            eos_ids.append(eos)
        self.eos_ids = list(dict.fromkeys(eos_ids))  # in order, each once
        self.pad_id = self.token_id(self.tokens["pad_token"])
        if self.pad_id is None:
            self.pad_id = self.eos_ids[0] if self.eos_ids else 0
        # BOS only where the template writes one: encode_chat then gets it from the text.
        uses_bos = chat_template is not None and "bos_token" in chat_template
        self.bos_id = self.token_id(self.tokens["bos_token"]) if uses_bos else None

    @classmethod
    def from_pretrained(cls, path, chat_format=None):
        """Read tokenizer.json, tokenizer_config.json, generation_config.json and the chat
        template (chat_template.jinja, else tokenizer_config's, else chat_format's built-in;
        an explicit chat_format wins). A hub id `org/name` is fetched first (resolve_model_dir)."""
        path = resolve_model_dir(path)
        tokenizer_json = _read(os.path.join(path, "tokenizer.json"))
        if tokenizer_json is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json (only fast tokenizers are read)")
        config = _read(os.path.join(path, "tokenizer_config.json"), as_json=True) or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        template = _read(os.path.join(path, "chat_template.jinja")) or template
        if chat_format is not None:
            if chat_format not in BUILTIN_TEMPLATES:
                raise ValueError(f"chat_format {chat_format!r}: "
                                 f"known are {list(BUILTIN_TEMPLATES)}")
            template = BUILTIN_TEMPLATES[chat_format]
        generation = _read(os.path.join(path, "generation_config.json"), as_json=True) or {}
        return cls(tokenizer_json, config, generation, template, path)

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

    def min_tokens(self, text):
        """A lower bound on len(encode(text)) that costs no tokenizing (0 where none is known).
        Byte-level BPE (all 256 bytes in the vocabulary) puts every byte of the normalized text
        in one token, which covers at most L characters (L: the longest entry), and NFC, NFKC or
        lowercasing leave at least one character of every four (NFC composes at most 4 into 1,
        U+1F82): len(text) / (4 L)."""
        return len(text) // self._chars_per_token if self._chars_per_token else 0

    @functools.cached_property
    def _chars_per_token(self):
        """L (times 4 under a normalizer) where min_tokens' bound holds here, else 0."""
        t = self._plain
        vocab = t.get_vocab(with_added_tokens=True)
        pre = t.pre_tokenizer.__getstate__().decode() if t.pre_tokenizer else ""
        norm = t.normalizer.__getstate__().decode() if t.normalizer else ""
        kinds = set(re.findall(r'"type":"(\w+)"', norm)) - {"Sequence"}
        bpe = isinstance(t.model, models.BPE) and not t.model.fuse_unk
        byte_level = '"ByteLevel"' in pre and '"Removed"' not in pre
        all_bytes = set(pre_tokenizers.ByteLevel.alphabet()) <= vocab.keys()
        normalizers = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
        if not (bpe and byte_level and all_bytes and kinds <= normalizers):
            return 0
        return max(len(token) for token in vocab) * (4 if kinds else 1)

    def decode(self, ids, skip_special_tokens=False):
        return self._control.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _template(self):
        """The chat template compiled as transformers compiles it (sandboxed jinja2,
        trim_blocks, lstrip_blocks, loopcontrols, strftime_now, tojson)."""
        if self.chat_template is None:
            raise ValueError(f"{self.path or 'tokenizer'}: no chat template (none in "
                             "tokenizer_config.json, no chat_template.jinja); pick a built-in "
                             "one: chat_format='chatml' or 'llama3'")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template)

    def render_chat(self, messages, add_generation_prompt=True, **kwargs):
        """The checkpoint's own chat template rendered as transformers' apply_chat_template
        renders it."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{**self.tokens, **kwargs})

    def encode_chat(self, messages, add_generation_prompt=True, **kwargs):
        """Ids of a conversation: the template's own text may hold control tokens, message
        contents are plain text, so a question holding "<|im_end|>" cannot close a turn."""
        marks = [f"\x00compact-content-{i}\x00" for i in range(len(messages))]
        if any(mark in m["content"] for m in messages for mark in marks):
            raise ValueError("message content holds encode_chat's sentinel")
        marked = [{**m, "content": s} for m, s in zip(messages, marks)]
        rendered = self.render_chat(marked, add_generation_prompt, **kwargs)
        skeleton = re.split("(" + "|".join(map(re.escape, marks)) + ")", rendered)
        full = self.render_chat(messages, add_generation_prompt, **kwargs)
        ids = []
        pos = 0  # where in `full` the piece starts
        for j, piece in enumerate(skeleton):
            if j % 2 == 0:  # template text, control tokens and all
                if not full.startswith(piece, pos):
                    raise ValueError("the chat template's own text depends on message content")
                ids += self._control.encode(piece, add_special_tokens=False).ids if piece else []
            else:  # a sentinel: piece becomes the content as the template wrote it (`| trim`)
                content = messages[marks.index(piece)]["content"]
                after = skeleton[j + 1]
                for piece in (content, content.strip(), content.rstrip(), content.lstrip()):
                    ends = after or pos + len(piece) == len(full)  # a last piece ends `full`
                    if ends and full.startswith(piece + after, pos):
                        break
                else:
                    raise ValueError("the chat template rewrites message content beyond trimming")
                ids += self.encode(piece)
            pos += len(piece)
        return ids

    @functools.cached_property
    def eot_id(self):
        """The template's end-of-turn token: the first special token the template writes
        after an assistant message (<|im_end|> for ChatML, <|eot_id|> for Llama 3)."""
        mark = "\x00assistant\x00"
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
        text = self.render_chat(turns, False)
        tail = self._control.encode(text.split(mark, 1)[1], add_special_tokens=False).ids
        found = [i for i in tail if i in self.special_ids]
        if not found and not self.eos_ids:
            raise ValueError("cannot find the template's end-of-turn token")
        return found[0] if found else self.eos_ids[0]


# --- model directories: tokenizer files, hub ids ---

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model")
# What we read from the hub: weights, configs, tokenizer files.
HUB_FILES = ["*.safetensors", "*.json", *TOKENIZER_FILES]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")


@functools.lru_cache(maxsize=None)
def resolve_model_dir(path):
    """A model directory for `path`: the path itself when it exists or does not look like a
    Hugging Face hub id; else `org/name` fetched with huggingface_hub's snapshot_download (only
    HUB_FILES; it honours HF_HOME, HF_HUB_OFFLINE and its cache). huggingface_hub is optional:
    without it the error says how to get the files. Once per id and process."""
    if os.path.exists(path) or not _HUB_ID.fullmatch(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path}: no such directory. As a Hugging Face hub id it needs "
                                "huggingface_hub (pip install huggingface_hub), or download it "
                                f"yourself: huggingface-cli download {path} --local-dir DIR, "
                                "and pass DIR") from None
    try:
        return snapshot_download(path, allow_patterns=HUB_FILES)
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, offline and not cached
        detail = (str(e) or "no detail").splitlines()[0]
        raise FileNotFoundError(f"{path}: no such directory, and the Hugging Face hub gives no "
                                f"model of that id ({type(e).__name__}: {detail})") from None


def copy_tokenizer(src, dst):
    """Copy a model directory's tokenizer files, so `dst` is a complete model directory."""
    src = resolve_model_dir(src)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), dst)


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
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if bos is None:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # Llama 3 adds BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])
    write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))  # as tok.save
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "pad_token": pad, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "chat_template": chat_template or BUILTIN_TEMPLATES[template]}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    generation = {"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}
    write_json(os.path.join(out_dir, "generation_config.json"), generation)
    return out_dir
