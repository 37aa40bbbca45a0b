"""Shared fixtures: tiny seeded models, nothing downloaded."""
import json
import os
import sys

import pytest
import tokenizers
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCHMARKS = os.path.join(ROOT, "..", "shared", "benchmarks")

from tokenizer import BUILTIN_TEMPLATES  # noqa: E402  (after the path insert)

# One thread: tiny models gain nothing from more, and spawned ranks would oversubscribe 2 cores.
torch.set_num_threads(1)


# --- a tiny byte-level BPE tokenizer (test helper) ---

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



@pytest.fixture
def benchmarks_dir():
    if not os.path.isdir(BENCHMARKS):
        pytest.skip("../shared/benchmarks is absent (a fresh clone has no shared/)")
    return BENCHMARKS


def tiny_config(model_type="qwen2", **overrides) -> dict:
    """A Hugging Face config.json dict for a tiny random model of one family."""
    cfg = {
        "model_type": model_type,
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    if model_type == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None)
    cfg.update(overrides)
    return cfg


def random_model(cfg: dict, seed: int = 0):
    """Our Transformer with every parameter random (norms and biases too), fp32."""
    from model import ModelArgs, Transformer

    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_hf_config(cfg), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved random tiny Qwen2 checkpoint directory (config.json + model.safetensors)."""
    path = tmp_path / "tiny-qwen2"
    random_model(tiny_config()).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer directory with a ChatML template (write_tokenizer)."""
    texts = ["So the answer is 12. First, 3 + 4 = 7. Wait, let me check: 7 * 2 = 14.",
             "Okay, then we subtract 5 from 20 and get 15. Therefore the total is 15.",
             "Tom has 5 apples. How many apples does he have now? Please reason step by step.",
             "The answer is $\\boxed{\\frac{1}{2}}$. Since x = 4, hence y = 8; thus z = 9."] * 4
    return write_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")), texts, vocab_size=400)
