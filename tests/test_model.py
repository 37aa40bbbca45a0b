"""model.py against transformers (the oracle) on tiny random checkpoints, and its three callers."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from model import KVCache, ModelArgs, Transformer, generate, rope_inv_freq

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

CASES = {
    # Qwen2.5: biases on q/k/v, untied head, hub spelling (rope_theta top-level, torch_dtype).
    "qwen2-untied": tiny_config("qwen2", rope_theta=1e6),
    # Qwen2.5-1.5B ties its embeddings.
    "qwen2-tied": tiny_config("qwen2", tie_word_embeddings=True),
    # Llama-3.1: llama3 rope scaling, newer spelling (rope_parameters with theta inside, dtype).
    "llama31-new-spelling": {**{k: v for k, v in tiny_config("llama").items() if k not in ("rope_theta", "torch_dtype")},
                             "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}, "dtype": "float32",
                             "max_position_embeddings": 512},
    # Llama-3.1 in the hub spelling (rope_scaling + rope_theta), with attention and MLP biases.
    "llama31-hub-bias": tiny_config("llama", rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE),
                                    attention_bias=True, mlp_bias=True),
    # SmolLM2: Llama with tied embeddings and MHA; explicit head_dim differing from hidden/heads.
    "smollm2-tied-headdim": tiny_config("llama", tie_word_embeddings=True, num_key_value_heads=4, head_dim=32),
}


def hf_logits(path, input_ids, attention_mask=None):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    cfg = CASES[name]
    random_model(cfg).save_pretrained(str(tmp_path))
    ids = torch.randint(0, cfg["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(1))
    ours = Transformer.from_pretrained(str(tmp_path), dtype=torch.float32)
    with torch.no_grad():
        got = ours(ids)
    want = hf_logits(str(tmp_path), ids)
    assert (got - want).abs().max() < 1e-4


def test_sharded_and_bf16_checkpoints_match_transformers(tmp_path):
    cfg = tiny_config("llama", rope_scaling=dict(LLAMA31_ROPE), rope_theta=500000.0)
    model = random_model(cfg).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path), max_shard_bytes=40_000)  # several shards + index
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    ours = Transformer.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert ours.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        got = ours(ids)
    assert (got - hf_logits(str(tmp_path), ids)).abs().max() < 1e-4
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == "bfloat16"


def test_llama3_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = CASES["llama31-hub-bias"]
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(ModelArgs.from_hf_config(cfg)), want.float())


def test_right_padding_leaves_real_positions_unchanged():
    model = random_model(tiny_config())
    ids = torch.randint(0, 256, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :12], model(ids))


def test_prefix_kv_with_mask_equals_full_forward():
    """Caller 3 (the MI probe): past K/V + explicit mask + explicit positions."""
    model = random_model(tiny_config())
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(ids)
        _, aux = model(ids[:, :13], return_aux=True)
        cache = [KVCache.from_kv(k, v, extra=7) for k, v in aux.kv]
        T, S = 7, 20
        mask = torch.ones(T, S, dtype=torch.bool).tril(13).expand(2, T, S)
        pos = torch.arange(13, 20).expand(2, T)
        tail = model(ids[:, 13:], position_ids=pos, mask=mask, cache=cache)
    torch.testing.assert_close(tail, full[:, 13:], atol=1e-5, rtol=1e-5)


def test_block_mask_hides_keys():
    """A key the mask hides has no effect on the query: one branch of a block-sparse probe."""
    model = random_model(tiny_config())
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        _, aux = model(ids[:, :6], return_aux=True)
        mask = torch.ones(1, 4, 10, dtype=torch.bool).tril(6)
        mask[:, :, 3:6] = False  # probe tokens see main positions 0..2 only
        pos = torch.arange(3, 7)[None]
        got = model(ids[:, 6:], position_ids=pos, mask=mask, cache=[KVCache.from_kv(k, v, 4) for k, v in aux.kv])
        short = torch.cat([ids[:, :3], ids[:, 6:]], dim=1)
        want = model(short)[:, 3:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_aux_final_attn_input_and_kv():
    model = random_model(tiny_config())
    ids = torch.randint(0, 256, (2, 9))
    seen = {}
    last = model.model.layers[-1]
    hook = last.input_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    with torch.no_grad():
        logits, aux = model(ids, return_aux=True)
        hidden = model(ids, return_hidden=True)
    hook.remove()
    torch.testing.assert_close(aux.final_attn_input, seen["x"])
    torch.testing.assert_close(model.lm_head(hidden), logits)
    assert len(aux.kv) == 2 and aux.kv[0][0].shape == (2, 2, 9, 16)


def test_attention_matches_explicit_softmax():
    """SDPA with GQA equals a slow explicit-softmax attention with repeated KV heads."""
    model = random_model(tiny_config())
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 7, 64)
    cos, sin = __import__("model").rope_cos_sin(model.inv_freq, torch.arange(7).expand(2, 7))
    with torch.no_grad():
        got, (k, v) = attn(x, cos, sin)
        q = __import__("model").apply_rope(attn.q_proj(x).view(2, 7, 4, 16).transpose(1, 2), cos, sin)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(16)
        scores = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 64))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def argmax_loop(model, prompt, n, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t in eos:
                break
    return out


def test_generate_equals_no_cache_loop_and_batching():
    model = random_model(tiny_config(), seed=3)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]
    want = [argmax_loop(model, p, 12, eos=set()) for p in prompts]
    assert generate(model, prompts, max_new_tokens=12) == want
    assert [generate(model, [p], max_new_tokens=12)[0] for p in prompts] == want


def test_generate_stops_each_row_at_its_eos():
    model = random_model(tiny_config(), seed=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free = generate(model, prompts, max_new_tokens=10)
    eos = free[0][3]  # a token row 0 produces at its 4th step
    out = generate(model, prompts, max_new_tokens=10, eos_ids=[eos])
    assert out[0] == free[0][:free[0].index(eos) + 1]
    assert out[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    model = random_model(tiny_config(), seed=5)
    prompts = [[1, 2, 3], [9, 8]]
    a = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, prompts, max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b
    assert generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=1) == \
        generate(model, prompts, max_new_tokens=8)


def test_gradient_checkpointing_same_gradients():
    model = random_model(tiny_config()).train()
    ids = torch.randint(0, 256, (2, 10))

    def grads():
        model.zero_grad()
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_type 'dynamic'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config({**tiny_config("qwen2"), **change})


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(FileNotFoundError, match="not a model directory"):
        Transformer.from_pretrained(str(tmp_path))
    random_model(tiny_config()).save_pretrained(str(tmp_path))
    file = str(tmp_path / "model.safetensors")
    state = load_file(file)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, file)
    with pytest.raises(KeyError, match="missing"):
        Transformer.from_pretrained(str(tmp_path))
    save_file({**state, "model.extra.weight": torch.zeros(2)}, file)
    with pytest.raises(KeyError, match="model.extra.weight"):
        Transformer.from_pretrained(str(tmp_path))
    save_file({**state, "model.norm.weight": torch.zeros(65)}, file)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\)"):
        Transformer.from_pretrained(str(tmp_path))
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Transformer.from_pretrained(str(tmp_path))


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = random_model(tiny_config("llama", rope_scaling=dict(LLAMA31_ROPE), rope_theta=500000.0))
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(model.args), rtol=0, atol=0)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_config_and_weight_file_problems_name_the_file(tmp_path):
    cfg = {**tiny_config("llama"), "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ValueError, match="llama3 rope scaling needs low_freq_factor"):
        ModelArgs.from_hf_config(cfg)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelArgs.from_hf_config({**tiny_config(), "partial_rotary_factor": 0.5})
    random_model(tiny_config()).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: "):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in tiny_config().items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match="config.json: missing 'vocab_size'"):
        Transformer.from_pretrained(str(tmp_path))
    for key, value in (("hidden_size", "64"), ("num_hidden_layers", 2.0), ("rms_norm_eps", "1e-6"), ("vocab_size", -5)):
        (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), key: value}))
        with pytest.raises(ValueError, match=f"config.json: {key}: expected"):  # not a TypeError from deep inside
            Transformer.from_pretrained(str(tmp_path))
    for heads in ((0, 2), (4, 3)):  # a zero was a ZeroDivisionError from inside (0 KV heads reads as absent: H)
        (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "num_attention_heads": heads[0],
                                                          "num_key_value_heads": heads[1]}))
        with pytest.raises(ValueError, match=rf"config.json: num_attention_heads must be a positive .*{re.escape(str(heads))}"):
            Transformer.from_pretrained(str(tmp_path))


def test_generate_refuses_empty_prompts():
    model = random_model(tiny_config())
    for prompts in ([], [[1, 2], []]):
        with pytest.raises(ValueError, match="prompt"):
            generate(model, prompts, max_new_tokens=2)
    assert len(generate(model, [[1, 2]], max_new_tokens=2, eos_ids=None)[0]) == 2


def test_per_prompt_seeds_sample_a_row_whatever_shares_its_batch():
    model = random_model(tiny_config(), seed=5)
    a, b, c = [1, 2, 3], [9, 8], [4, 4, 4, 4, 4, 4]
    alone = generate(model, [a], max_new_tokens=8, temperature=1.0, seed=[11])[0]
    assert generate(model, [c, a, b], max_new_tokens=8, temperature=1.0, seed=[3, 11, 5])[1] == alone
    assert generate(model, [a, a], max_new_tokens=8, temperature=1.0, seed=[12, 11])[1] == alone
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        generate(model, [a, b, c], max_new_tokens=2, temperature=1.0, seed=[1, 2])


# --- hub ids: resolved by tokenizer.resolve_model_dir through a stand-in huggingface_hub ---

class RepositoryNotFoundError(Exception):
    pass


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_tokenizer_dir):
    """A huggingface_hub stand-in whose snapshot_download copies a tiny model directory (with files we never
    read) into a cache, honouring allow_patterns as the real one does."""
    import fnmatch
    import shutil
    import sys
    import types
    import tokenizer
    repo = tmp_path / "repo"
    vocab = tokenizer.Tokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    random_model(tiny_config(vocab_size=vocab)).save_pretrained(str(repo))
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), repo)
    (repo / "pytorch_model.bin").write_bytes(b"not read")
    (repo / "README.md").write_text("model card")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(repo_id)
        if repo_id != "org/tiny":
            raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: .../{repo_id}")
        dst = tmp_path / "hub-cache" / repo_id.replace("/", "--")
        dst.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(repo):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(repo / name, dst / name)
        return str(dst)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    tokenizer.resolve_model_dir.cache_clear()
    yield str(repo), calls
    tokenizer.resolve_model_dir.cache_clear()


def test_hub_id_is_fetched_once_with_only_the_files_we_read(fake_hub, tmp_path, monkeypatch):
    import eval as ev
    import lora
    import tokenizer
    repo, calls = fake_hub
    monkeypatch.chdir(tmp_path)  # "org/tiny" is not a local path here
    model = Transformer.from_pretrained("org/tiny", dtype=torch.float32)
    local = Transformer.from_pretrained(repo, dtype=torch.float32)
    for (k, v), (_, w) in zip(model.state_dict().items(), local.state_dict().items()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    tok = tokenizer.Tokenizer.from_pretrained("org/tiny")
    assert tok.encode("So 12") == tokenizer.Tokenizer.from_pretrained(repo).encode("So 12")
    cache = tokenizer.resolve_model_dir("org/tiny")
    assert calls == ["org/tiny"] and not {"pytorch_model.bin", "README.md"} & set(os.listdir(cache))
    model, _ = ev.load_student("org/tiny")
    lora.apply_lora(model, rank=2, alpha=4)
    lora.save_adapter(model, "adapter", base_model="org/tiny")
    lora.main(["merge", "--model", "org/tiny", "--adapter", "adapter", "--out", "merged"])  # tokenizer files copied too
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir("merged"))


def test_unknown_hub_id_and_missing_package_exit_2_saying_what_to_do(fake_hub, tmp_path, monkeypatch, capsys):
    import sys
    import eval as ev
    import lora
    import tokenizer
    import train
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        lora.main(["merge", "--model", "org/nope", "--adapter", "a", "--out", "merged"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "org/nope" in err and "RepositoryNotFoundError" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: importing it fails
    tokenizer.resolve_model_dir.cache_clear()
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    for main, argv in [(train.main, ["--model", "org/tiny", "--data", "d.jsonl", "--out", "run"]),
                       (ev.main, ["accuracy", "--model", "org/tiny", "--task", "gsm8k", "--data", "g.jsonl",
                                  "--out", "p.jsonl", "--device", "cpu"])]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "pip install huggingface_hub" in err, err
        assert "huggingface-cli download org/tiny --local-dir DIR" in err
    assert not os.path.exists("run") and not os.path.exists("merged")


def test_compile_blocks_keeps_names_and_logits():
    """torch.compile of each block in place: Hugging Face names unchanged, the same logits (a CPU needs a C compiler)."""
    from model import compile_blocks
    model = random_model(tiny_config())
    keys, ids = list(model.state_dict()), torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids)
        compile_blocks(model)
        got = model(ids)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
