"""The porting path (examples/transformers_compact.py) against compact_loss: a transformers model
with a PEFT adapter, padded branch rows and a per-prefix probe give the same COMPACT weights and
loss as this project's packed row and one-pass probe, on the same instances and weights (tiny
random Llama and Qwen2, CPU), with exact probes and with the default budget's sample; and the
script runs, saves a PEFT adapter, and exits 2 on bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from compact import CompactConfig, compact_loss, rationale_view
from conftest import ROOT, random_model, tiny_config
from data import collate, load_data
from lora import load_adapter
from model import Transformer
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
sys.path.insert(0, os.path.join(ROOT, "examples"))
import transformers_compact as port

SCRIPT = os.path.join(ROOT, "examples", "transformers_compact.py")
STEP = "First, 3 + 4 = 7. Wait, let me check: 7 * 2 = 14. So the total is 14, then 20 - 5 = 15. "
LONG = STEP * 8  # past the default probe budget: the sampled S_MI path
ROWS = [
    {"id": "a", "question": "Tom has 5 apples. How many apples does he have now?", "answer": "14",
     "task": "gsm8k", "rationales": [{"teacher": "long", "text": LONG},
                                     {"teacher": "short", "text": "Okay, 7 * 2 = 14."},
                                     {"teacher": "mid", "text": STEP * 2}]},
    {"id": "b", "question": "Since x = 4, what is y?", "answer": "15", "task": "gsm8k",
     "rationales": [{"teacher": "short", "text": "Hence y = 8; thus 15."},
                    {"teacher": "mid", "text": "Then we subtract 5 from 20 and get 15."}]},
]
STATS = ("weight", "s_mi", "s_g", "s_d", "l_sft", "l_mcon")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory, tiny_tokenizer_dir):
    if request.param == "qwen2":
        return request.getfixturevalue("qwen2")
    return build(request.param, tmp_path_factory, tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tiny_tokenizer_dir):
    return build("qwen2", tmp_path_factory, tiny_tokenizer_dir)


def build(family, tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random checkpoint of one family with the tiny tokenizer, a random PEFT adapter on it
    (loaded by transformers + peft and by this project), and the data file."""
    root = tmp_path_factory.mktemp(family)
    base, adapter = str(root / "base"), str(root / "adapter")
    vocab = Tokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    random_model(tiny_config(family, vocab_size=vocab)).save_pretrained(base)
    for name in os.listdir(tiny_tokenizer_dir):
        shutil.copy(os.path.join(tiny_tokenizer_dir, name), base)
    data = root / "multi.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    cfg = port.ExampleConfig(model=base, data=str(data), lora_rank=4, lora_alpha=8,
                             lora_dropout=0.0)
    theirs = port.load_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(adapter)
    ours = load_adapter(Transformer.from_pretrained(base, dtype=torch.float32), adapter).eval()
    tok, encoded, _ = load_data(base, str(data), 2048)
    return theirs, ours, tok, encoded, cfg


def relative_error(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("budget", ["exact", "default"])
def test_example_equals_compact_loss(setup, budget):
    """Weights, loss and every per-branch score and loss agree to 1e-5 relative."""
    theirs, ours, tok, encoded, _ = setup
    cfg = CompactConfig(mi_budget=0) if budget == "exact" else CompactConfig()
    key = (7, 3)
    with torch.no_grad():
        loss, st = port.compact_step(theirs, port.padded_batch(encoded, tok.pad_id), cfg, key)
        batch = collate(encoded)
        want_loss, want = compact_loss(ours, batch, cfg, rng_key=key)
    n_rat = rationale_view(batch)[0]
    assert n_rat.max() + 1 > 96 and n_rat.min() + 1 <= 96  # one branch over the budget, some under
    assert (want["s_mi"] > 0).sum() >= 4 and want["s_g"].std() > 0 and want["weight"].std() > 0.05
    errors = {k: relative_error(st[k], want[k]) for k in STATS}
    errors["loss"] = relative_error(loss, want_loss)
    print(f"{theirs.config.model_type} {budget}: max relative error "
          + " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-5, errors
    assert torch.equal(st["weight"] > 0, batch["branch_mask"])


def test_default_budget_samples_and_the_key_matters(setup):
    """The default budget really samples the long branch (not exact, and another key draws
    another estimate), while the short branches stay exact."""
    theirs, ours, tok, encoded, _ = setup
    batch = collate(encoded)
    with torch.no_grad():
        exact = compact_loss(ours, batch, CompactConfig(mi_budget=0))[1]["s_mi"]
        one, two = (compact_loss(ours, batch, CompactConfig(), rng_key=(k,))[1]["s_mi"]
                    for k in (1, 2))
    assert one[0, 0] != exact[0, 0] and one[0, 0] != two[0, 0]  # "long" is branch 0 of "a"
    torch.testing.assert_close(one[:, 1:], exact[:, 1:], rtol=1e-6, atol=1e-7)


def test_three_steps_train_and_save_an_adapter(qwen2, tmp_path, capsys):
    cfg = qwen2[-1]
    out = str(tmp_path / "run")
    port.main(["--model", cfg.model, "--data", cfg.data, "--out", out, "--steps", "3",
               "--lora-rank", "4", "--lr", "1e-2", "--batch-size", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all(float(line.split(" | ")[1].split()[1]) > 0 for line in lines)
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    settings = json.load(open(os.path.join(out, "settings.json")))
    assert settings["example"]["steps"] == 3 and settings["compact"]["mi_budget"] == 96
    base = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    trained = peft.PeftModel.from_pretrained(base, out)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: the steps moved it


def test_bad_input_exits_2(qwen2, tmp_path, capsys):
    cfg = qwen2[-1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    for argv, message in (
            (["--data", str(tmp_path / "none.jsonl")], "--data"),
            (["--data", str(bad)], "bad.jsonl"),
            (["--data", cfg.data, "--steps", "0"], "--steps"),
            (["--data", cfg.data, "--model", str(tmp_path)], "--model"),
            (["--data", cfg.data, "--mi-budget", "5"], "mi_budget"),
            (["--data", cfg.data, "--out", cfg.model], "would overwrite --model")):
        argv = ["--model", cfg.model, "--out", str(tmp_path / "o")] + argv
        with pytest.raises(SystemExit) as exit_:
            port.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_help_runs_from_the_command_line():
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--model", "--data", "--steps", "--lr", "--out", "--mi-budget"):
        assert flag in done.stdout
