"""lora.py: behaviour on tiny models (identity, round trips, merge, exact MoT averaging), PEFT parity both ways, CLI."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import lora
from conftest import ROOT, random_model, tiny_config
from lora import LoRALinear, apply_lora, average_adapters, load_adapter, merge_lora, save_adapter
from model import Transformer

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(ids)


def randomize_lora(model, seed=1, std=0.05):
    """Non-zero B (and a fresh A), so an adapter changes the logits and a test means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


def lora_keys(model):
    return {k for k in model.state_dict() if ".lora_" in k}


def test_fresh_adapter_leaves_logits_unchanged_even_with_dropout():
    model = random_model(tiny_config())
    base_keys, want = set(model.state_dict()), logits(model)
    names = apply_lora(model, rank=4, alpha=8, dropout=0.5)
    assert len(names) == 2 * 7 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert set(model.state_dict()) - lora_keys(model) == base_keys  # base names kept
    assert "model.layers.1.mlp.down_proj.lora_A.weight" in lora_keys(model)
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    with torch.no_grad():  # dropout sits on the LoRA input only: with B = 0 training mode is exact too
        torch.testing.assert_close(model.train()(IDS), want, rtol=0, atol=0)


def test_trainable_count_and_base_unchanged_after_optimizer_step():
    cfg = tiny_config("llama", attention_bias=True)
    model = random_model(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    want = sum(4 * (m.in_features + m.out_features) for m in map(model.get_submodule, names))
    assert trainable == want and len(names) == 2 * 3
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()(IDS).logsumexp(-1).mean().backward()
    opt.step()
    after = model.state_dict()
    for k, v in base.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    assert after["model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0  # B moved off zero


def test_save_load_roundtrip_with_peft_key_names(tmp_path):
    model = random_model(tiny_config())
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "gate_proj"))
    randomize_lora(model)
    save_adapter(model, str(tmp_path), base_model="tiny-qwen2")
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    want = {f"base_model.model.model.layers.{i}.{block}.{name}.lora_{ab}.weight"
            for i in range(2) for block, name in (("self_attn", "q_proj"), ("mlp", "gate_proj")) for ab in "AB"}
    assert keys == want and metadata == {"format": "pt"}
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias", "use_rslora", "fan_in_fan_out",
                                "modules_to_save", "base_model_name_or_path")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "bias": "none", "use_rslora": False,
         "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": "tiny-qwen2"}
    assert sorted(cfg["target_modules"]) == ["gate_proj", "q_proj"]
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left

    fresh = random_model(tiny_config())
    load_adapter(fresh, str(tmp_path))
    assert fresh.lora_config["target_modules"] == cfg["target_modules"]
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_gives_the_unmerged_logits(use_rslora):
    model = random_model(tiny_config())
    base_keys = set(model.state_dict())
    apply_lora(model, rank=8, alpha=16, use_rslora=use_rslora)
    randomize_lora(model)
    want = logits(model)
    assert (want - logits(random_model(tiny_config()))).abs().max() > 1e-2  # the adapter matters
    merge_lora(model)
    assert not lora.lora_modules(model) and not hasattr(model, "lora_config")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear and set(model.state_dict()) == base_keys
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


def merged_delta(adapter_dir):
    """ΔW per weight key, by merging the adapter into the (random but seeded) base: the slow reference."""
    base, model = random_model(tiny_config()).state_dict(), random_model(tiny_config())
    merge_lora(load_adapter(model, adapter_dir))
    return {k: v - base[k] for k, v in model.state_dict().items()}


def test_average_is_the_exact_mean_of_merged_deltas(tmp_path):
    # Different ranks, alphas and rsLoRA: the averaged adapter must still be exact.
    settings = [dict(rank=4, alpha=8), dict(rank=8, alpha=4, use_rslora=True), dict(rank=2, alpha=16)]
    dirs = []
    for i, s in enumerate(settings):
        model = random_model(tiny_config())
        apply_lora(model, targets=("q_proj", "v_proj", "up_proj", "down_proj"), **s)
        randomize_lora(model, seed=10 + i)
        dirs.append(str(tmp_path / f"teacher{i}"))
        save_adapter(model, dirs[-1])
    weights = [3.0, 1.0, 1.0]
    average_adapters(dirs, str(tmp_path / "mot"), weights=weights)
    cfg = json.load(open(tmp_path / "mot" / "adapter_config.json"))
    assert cfg["r"] == 14 and cfg["lora_alpha"] == 14 and cfg["use_rslora"] is False

    deltas = [merged_delta(d) for d in dirs]
    reference = random_model(tiny_config())
    with torch.no_grad():
        for k, p in reference.state_dict().items():
            p += sum(w / sum(weights) * d[k] for w, d in zip(weights, deltas))
    averaged = load_adapter(random_model(tiny_config()), str(tmp_path / "mot"))
    torch.testing.assert_close(logits(averaged), logits(reference), rtol=1e-5, atol=1e-5)


def test_average_rejects_adapters_that_do_not_match(tmp_path):
    for name, cfg, targets in (("a", tiny_config(), ("q_proj",)), ("b", tiny_config(), ("k_proj",)),
                               ("c", tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1), ("q_proj",))):
        model = random_model(cfg)
        apply_lora(model, rank=4, targets=targets)
        save_adapter(model, str(tmp_path / name))
    with pytest.raises(ValueError, match="targets or layers differ"):
        average_adapters([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight has shape \(4, 32\).*\(4, 64\)"):
        average_adapters([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "out"))


def test_loading_onto_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    model = random_model(tiny_config())
    apply_lora(model, rank=4, targets=("gate_proj",))
    save_adapter(model, str(tmp_path))
    other = random_model(tiny_config(intermediate_size=96))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.lora_B\.weight has shape \(128, 4\)"
                                         r" but the model expects \(96, 4\)"):
        load_adapter(other, str(tmp_path))
    deeper = random_model(tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="2 tensors missing"):
        load_adapter(deeper, str(tmp_path))


@pytest.mark.parametrize("edit, match", [
    (None, "adapter_config.json is missing"),
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"bias": "all"}, "bias='all'"),
    ({"target_modules": ["q_proj", "lm_head"]}, "unknown target_modules"),
    ({"use_dora": True}, "use_dora=True"),
])
def test_load_rejects_bad_adapter_directories(tmp_path, edit, match):
    model = random_model(tiny_config())
    apply_lora(model, rank=4)
    save_adapter(model, str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    if edit is None:
        config_file.unlink()
    else:
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **edit}))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_adapter(random_model(tiny_config()), str(tmp_path))


def test_apply_lora_rejects_unknown_targets_and_double_wrapping():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=r"\['lm_head', 'qproj'\]"):
        apply_lora(model, targets=("q_proj", "qproj", "lm_head"))
    apply_lora(model)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model)


def test_bf16_base_with_fp32_lora():
    model = random_model(tiny_config()).to(torch.bfloat16)
    want = logits(model)
    apply_lora(model, rank=4, alpha=8)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.weight.dtype == q.lora_B.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model), want, rtol=0, atol=0)
    randomize_lora(model)
    out = model.train()(IDS)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    assert q.lora_B.weight.grad.dtype == torch.float32 and q.weight.grad is None
    unmerged = logits(model)
    w = (q.weight.float() + q.scale * q.lora_B.weight @ q.lora_A.weight).to(torch.bfloat16)
    merge_lora(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w, rtol=0, atol=0)
    torch.testing.assert_close(logits(model).float(), unmerged.float(), rtol=0.05, atol=0.05)  # bf16 rounding only


def test_lora_under_bf16_autocast_matches_the_fp32_path():
    """Under autocast the LoRA branch skips its fp32 input copy: output and LoRA grads stay within
    bf16 rounding of the fp32 computation, and the LoRA weights keep fp32 grads for the optimizer."""
    base = nn.Linear(32, 48)
    m = LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(3, 5, 32)
    want = base(x) + m.scale * x @ m.lora_A.weight.T @ m.lora_B.weight.T
    torch.testing.assert_close(m(x), want)
    wrt = [m.lora_A.weight, m.lora_B.weight]
    ref = torch.autograd.grad(want.square().sum(), wrt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    grads = torch.autograd.grad(got.float().square().sum(), wrt)
    assert all(g.dtype == torch.float32 for g in grads)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=0.05 * r.abs().max().item(), rtol=0.05)


# --- PEFT as the oracle ---

def hf_model(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def adapter_warnings(caught):
    return [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("adapter", "missing", "unexpected", "lora"))]


@pytest.mark.parametrize("family, kw", [
    ("qwen2", dict(rank=4, alpha=8)),
    ("llama", dict(rank=8, alpha=16, use_rslora=True, targets=("q_proj", "o_proj", "up_proj"))),
])
def test_adapter_saved_here_loads_in_peft(tmp_path, family, kw):
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    cfg = tiny_config(family, attention_bias=True) if family == "llama" else tiny_config(family)
    random_model(cfg).save_pretrained(base_dir)
    ours = Transformer.from_pretrained(base_dir, dtype=torch.float32)
    apply_lora(ours, **kw)
    randomize_lora(ours)
    save_adapter(ours, adapter_dir, base_model=base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter_dir).eval()
    assert not adapter_warnings(caught)
    with torch.no_grad():
        want = theirs(input_ids=IDS).logits
        with theirs.disable_adapter():
            assert (theirs(input_ids=IDS).logits - want).abs().max() > 1e-2  # PEFT did apply our weights
    diff = (logits(ours) - want).abs().max().item()
    print(f"ours -> PEFT max |dlogit| {diff:.2e}")
    assert diff < 1e-5


def test_adapter_saved_by_peft_loads_here(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    random_model(tiny_config()).save_pretrained(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = peft.get_peft_model(hf_model(base_dir), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(adapter_dir)
    with torch.no_grad():
        want = theirs.eval()(input_ids=IDS).logits
        with theirs.disable_adapter():
            assert (theirs(input_ids=IDS).logits - want).abs().max() > 1e-2
    ours = load_adapter(Transformer.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    assert ours.lora_config["use_rslora"] and ours.model.layers[0].mlp.up_proj.scale == 8.0
    diff = (logits(ours) - want).abs().max().item()
    print(f"PEFT -> ours max |dlogit| {diff:.2e}")
    assert diff < 1e-5


def test_averaged_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base_dir = str(tmp_path / "base")
    random_model(tiny_config()).save_pretrained(base_dir)
    for i, kw in enumerate([dict(rank=4, alpha=8), dict(rank=2, alpha=4, use_rslora=True)]):
        model = Transformer.from_pretrained(base_dir, dtype=torch.float32)
        apply_lora(model, targets=("k_proj", "down_proj"), **kw)
        randomize_lora(model, seed=i)
        save_adapter(model, str(tmp_path / f"t{i}"), base_model=base_dir)
    average_adapters([str(tmp_path / "t0"), str(tmp_path / "t1")], str(tmp_path / "mot"))
    ours = load_adapter(Transformer.from_pretrained(base_dir, dtype=torch.float32), str(tmp_path / "mot"))
    theirs = peft.PeftModel.from_pretrained(hf_model(base_dir), str(tmp_path / "mot")).eval()
    with torch.no_grad():
        assert (logits(ours) - theirs(input_ids=IDS).logits).abs().max() < 1e-5


# --- CLI ---

def test_merge_cli_writes_a_model_transformers_loads(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", str(tmp_path / "adapter"), tmp_path / "merged"
    random_model(tiny_config()).save_pretrained(str(base_dir))
    extras = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "chat_template.jinja": "{{ messages }}",
              "generation_config.json": json.dumps({"eos_token_id": 1})}
    for name, text in extras.items():
        (base_dir / name).write_text(text)
    model = Transformer.from_pretrained(str(base_dir), dtype=torch.float32)
    apply_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    save_adapter(model, adapter_dir)
    want = logits(merge_lora(model))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "merge", "--model", str(base_dir),
                          "--adapter", adapter_dir, "--out", str(out), "--dtype", "float32"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name, text in extras.items():
        assert (out / name).read_text() == text
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # temp dirs renamed away
    with torch.no_grad():
        got = hf_model(str(out))(input_ids=IDS).logits
    assert (got - want).abs().max() < 1e-4  # transformers vs model.py, as in test_model.py

    # --overwrite swaps the whole directory: no stale shard of an older model survives.
    (out / "model-00001-of-00002.safetensors").write_text("stale")
    lora.main(["merge", "--model", str(base_dir), "--adapter", adapter_dir, "--out", str(out), "--overwrite"])
    assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", *extras])
    torch.testing.assert_close(logits(Transformer.from_pretrained(str(out), dtype=torch.float32)), want, rtol=0, atol=0)


def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys):
    model = random_model(tiny_config())
    apply_lora(model, rank=4)
    save_adapter(model, str(tmp_path / "a"))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    cases = [
        (["merge", "--model", str(tmp_path / "nope"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")], "nope"),
        (["average", str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "missing"),
        (["average", str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--weights", "1,x"], "--weights"),
        (["average", str(tmp_path / "a"), "--out", str(foreign), "--overwrite"], "refusing"),
        (["average", str(tmp_path / "a"), "--out", str(tmp_path / "a")], "--overwrite"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            lora.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and "Traceback" not in err, (argv, err)
    assert (foreign / "todo.txt").read_text() == "keep me"
    lora.main(["average", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--weights", "1,3"])
    assert json.load(open(tmp_path / "o" / "adapter_config.json"))["r"] == 8


def test_lora_follows_the_models_train_or_eval_mode(tmp_path):
    from lora import apply_lora, lora_modules, load_adapter, save_adapter
    model = random_model(tiny_config()).eval()
    apply_lora(model, rank=4, alpha=8, dropout=0.5)
    assert not any(m.training for _, m in lora_modules(model))
    save_adapter(model, str(tmp_path))
    fresh = random_model(tiny_config()).eval()
    load_adapter(fresh, str(tmp_path))
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), fresh(ids))  # no dropout noise
    assert not any(m.training for _, m in lora_modules(fresh))


@pytest.mark.parametrize("change, message", [({"r": "4"}, "r must be a positive integer"), ({"r": 0}, "r must be"),
                                             ({"lora_alpha": None}, "lora_alpha must be")])
def test_bad_adapter_config_values_are_named(tmp_path, change, message):
    from lora import apply_lora, load_adapter, save_adapter
    model = random_model(tiny_config())
    apply_lora(model, rank=4, alpha=8)
    save_adapter(model, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    json.dump({**cfg, **change}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=message):
        load_adapter(random_model(tiny_config()), str(tmp_path))
