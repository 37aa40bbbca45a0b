"""Shared fixtures: tiny seeded models, nothing downloaded."""
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BENCHMARKS = os.path.join(ROOT, "..", "shared", "benchmarks")

# One thread: tiny models gain nothing from more, and spawned ranks would oversubscribe 2 cores.
torch.set_num_threads(1)


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
    """A tiny byte-level BPE tokenizer directory with a ChatML template (tokenizer.write_tokenizer)."""
    import tokenizer
    texts = ["So the answer is 12. First, 3 + 4 = 7. Wait, let me check: 7 * 2 = 14.",
             "Okay, then we subtract 5 from 20 and get 15. Therefore the total is 15.",
             "Tom has 5 apples. How many apples does he have now? Please reason step by step.",
             "The answer is $\\boxed{\\frac{1}{2}}$. Since x = 4, hence y = 8; thus z = 9."] * 4
    return tokenizer.write_tokenizer(str(tmp_path_factory.mktemp("tiny_tokenizer")), texts, vocab_size=400)


@pytest.fixture
def student_dir(tmp_path, tiny_tokenizer_dir):
    """A random tiny Qwen2 student whose vocabulary covers the tiny tokenizer, with its tokenizer files."""
    import tokenizer
    vocab = tokenizer.Tokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    path = str(tmp_path / "student")
    random_model(tiny_config(vocab_size=vocab)).save_pretrained(path)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), path)
    return path
