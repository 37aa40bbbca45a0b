"""train.py: outputs, DDP equivalence (gloo, two spawned ranks), exact resume after SIGKILL."""
import math
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import tokenizer
import demo
from conftest import ROOT, tiny_config
from model import ModelArgs, Transformer
from train import TrainConfig, parse_args, train
from compact import CompactConfig


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A tiny synthetic pool (the stress pool: 18 questions, so batches do not divide it) and a tiny student."""
    root = tmp_path_factory.mktemp("train")
    rows, _ = demo.synth_pool(str(root / "data"), seed=1, n_train=18, n_test=2, n_pretrain=1, pool="stress")
    texts = [r["question"] + " " + x["text"] for r in rows for x in r["rationales"]]
    model_dir = str(root / "student")
    tokenizer.write_tokenizer(model_dir, texts, vocab_size=300)
    vocab = tokenizer.Tokenizer.from_pretrained(model_dir).vocab_size
    cfg = tiny_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    Transformer(ModelArgs.from_hf_config(cfg), cfg).save_pretrained(model_dir)
    return model_dir, str(root / "data" / "train.jsonl")


def flags(model_dir, data_file, out, *extra):
    return ["--model", model_dir, "--data", data_file, "--out", str(out), "--lr", "1e-2", "--max-len", "400",
            "--mi-budget", "12", "--lora-rank", "4", "--lora-dropout", "0.1", *extra]


def adapter_state(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def test_outputs_and_metrics_keys(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "3", "--batch-size", "2",
                                 "--grad-accum", "2", "--save-every", "2"))
    result = train(cfg, ccfg)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert {"step", "epoch", "loss", "sft", "mcon", "lr", "grad_norm", "tokens_per_s", "weight_entropy", "teachers"} <= set(r)
        assert 0 <= r["weight_entropy"] <= math.log(len(demo.POOLS["stress"])) + 1e-6  # mean entropy of w over instances
        assert set(r["teachers"]) <= set(demo.POOLS["stress"])
        for t in r["teachers"].values():
            assert {"weight", "s_mi", "s_g", "s_d", "n"} == set(t)
        assert sum(t["weight"] * t["n"] for t in r["teachers"].values()) == pytest.approx(4, rel=1e-4)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["train"]["batch_size"] == 2 and saved["compact"]["mi_budget"] == 12
    assert set(saved["data_stats"]["dropped_per_teacher"]) <= set(demo.POOLS["stress"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-2", "step-3"]
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert result["steps"] == 3


def test_ablation_flags_map_to_the_config():
    cfg, ccfg = parse_args(["--model", "m", "--data", "d", "--no-mi", "--no-difficulty", "--weighting", "uniform", "--mcon-lambda", "0"])
    assert (ccfg.alpha, ccfg.beta, ccfg.gamma, ccfg.weighting, ccfg.mcon_lambda) == (0, 1, 0, "uniform", 0)
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m"])  # no --data
    assert e.value.code == 2


def sgd_update(model_dir, data_file, rank, world, batch_size, grad_accum):
    """One train_step with SGD(lr=1) from a seeded LoRA with random B: the update is the gradient."""
    import contextlib

    import train as t
    from lora import lora_modules
    tok = tokenizer.Tokenizer.from_pretrained(model_dir)
    encoded, stats = data.encode_dataset(data.load_multi_teacher(data_file), tok, max_len=400)
    cfg = TrainConfig(model=model_dir, data=data_file, lora_rank=4, lora_dropout=0.0, batch_size=batch_size,
                      grad_accum=grad_accum, max_grad_norm=1.0)
    torch.manual_seed(0)
    model = t.build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(std=0.1)
    raw = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = batch_size * grad_accum
    mine = data.shard_indices(len(encoded), 0, 0, rank, world, per_rank)[:per_rank]
    micro = [data.collate([encoded[j] for j in mine[m * batch_size:(m + 1) * batch_size]], tok.pad_id)
             for m in range(grad_accum)]
    params = [p for p in raw.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    t.train_step(model, opt, micro, 1.0, per_rank * world, len(stats["teachers"]), cfg, CompactConfig(mi_budget=0),
                 torch.device("cpu"), contextlib.nullcontext)
    return {k: v for k, v in raw.state_dict().items() if "lora_" in k}


def _ddp_worker(rank, world, port, out, job):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import train as t
    t.setup_dist()
    try:
        if job[0] == "train":
            cfg, ccfg = t.parse_args(job[1])
            state = {k: v for k, v in t.train(cfg, ccfg, rank, world)["model"].state_dict().items() if "lora_" in k}
        else:
            state = sgd_update(*job[1], rank, world, *job[2])
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        t.cleanup_dist()


def spawn_two(tmp_path, job):
    port = 29500 + (os.getpid() + len(job[0])) % 1000
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path), job), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_two_ranks_with_half_the_batch_make_the_same_update_as_one_process(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    rank0, rank1 = spawn_two(tmp_path, ("step", (model_dir, data_file), (1, 2)))  # 2 ranks x 2 micro x 1
    whole = sgd_update(model_dir, data_file, 0, 1, 2, 2)  # 1 process x 2 micro x 2
    for k in whole:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0)
        torch.testing.assert_close(rank0[k], whole[k], rtol=1e-5, atol=1e-6)
    base = sgd_update(model_dir, data_file, 0, 1, 1, 1)  # another batch: a different update
    assert any((base[k] - whole[k]).abs().max() > 1e-4 for k in whole)


def test_uneven_data_does_not_hang_and_ranks_agree(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    # 18 instances, 4 per step: each epoch wraps; 2 epochs of 5 steps run through the boundary.
    argv = flags(model_dir, data_file, tmp_path / "ddp", "--epochs", "2", "--batch-size", "1", "--grad-accum", "2",
                 "--save-every", "0")
    os.makedirs(tmp_path / "ddp")
    rank0, rank1 = spawn_two(tmp_path, ("train", argv))
    for k in rank0:
        torch.testing.assert_close(rank0[k], rank1[k], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert steps == list(range(1, 11))


def test_resume_after_sigkill_matches_uninterrupted(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    common = ["--max-steps", "10", "--batch-size", "2", "--grad-accum", "1", "--save-every", "2"]
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path / "straight", *common))
    train(cfg, ccfg)
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags(model_dir, data_file, out, *common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-4" / "trainer.pt"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before the kill; the test proves nothing"
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    want, got = adapter_state(tmp_path / "straight"), adapter_state(out)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == list(range(1, 11))


def test_resume_refuses_another_batch_layout(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "2", "--batch-size", "2",
                                 "--grad-accum", "1"))
    train(cfg, ccfg)
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "4", "--batch-size", "3",
                                 "--grad-accum", "1", "--resume"))
    with pytest.raises(ValueError, match="batch layout"):
        train(cfg, ccfg)


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(run_inputs, tmp_path, monkeypatch):
    import train as t
    model_dir, data_file = run_inputs
    real = t.compact_loss

    def poisoned(model, batch, cfg, n_instances=None, **kw):
        loss, stats = real(model, batch, cfg, n_instances, **kw)
        return loss * float("nan"), stats

    monkeypatch.setattr(t, "compact_loss", poisoned)
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "10", "--batch-size", "2",
                                 "--grad-accum", "1", "--max-bad-steps", "2"))
    with pytest.raises(FloatingPointError, match="2 non-finite steps"):
        train(cfg, ccfg)
    assert os.path.isfile(tmp_path / "checkpoints" / "step-2" / "trainer.pt")


def test_bad_data_exits_2_without_traceback(run_inputs, tmp_path):
    model_dir, _ = run_inputs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "q", "answer": "1", "rationales": []}\nnot json\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", model_dir, "--data", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr


def test_demo_runs_end_to_end_on_a_few_steps(tmp_path, capsys):
    import train as t
    t.main(["--demo", "--out", str(tmp_path), "--max-steps", "2", "--pretrain-steps", "2", "--seeds", "2", "--arms",
            "base,sbs-stepwise,compact", "--n-train", "24", "--n-test", "12", "--n-pretrain", "24"])
    printed = capsys.readouterr().out
    for name in ("data/train.jsonl", "data/test.jsonl", "data/pretrain.jsonl", "base/config.json", "base/tokenizer.json",
                 "base/model.safetensors", "eval/base.jsonl", "eval/base.json", "eval/compact-seed-1.jsonl",
                 "runs/compact/seed-0/metrics.jsonl", "runs/compact/seed-1/result.json", "runs/sbs-stepwise/seed-1/model/model.safetensors", "report.json"):
        assert (tmp_path / name).exists(), name
    report = json.load(open(tmp_path / "report.json"))
    assert list(report["arms"]) == ["base", "sbs-stepwise", "compact"] and report["best_sbs"] == "sbs-stepwise"
    arm = report["arms"]["compact"]
    assert arm["seeds"] == [0, 1] and arm["n_per_seed"] == 12 and len(arm["per_seed"]) == 2 and arm["sem"] >= 0
    assert set(arm["teachers"]) == set(demo.POOLS["premise"])
    assert all(0 <= w["weight_first"] <= 1 and 0 <= w["weight_last"] <= 1 for w in arm["teachers"].values())
    assert "± SEM" in printed and "compact: mean weight per teacher" in printed
    assert any(c in printed for c in demo.BARS)
    assert len((tmp_path / "eval" / "compact-seed-0.jsonl").read_text().splitlines()) == 12
    with pytest.raises(SystemExit) as e:  # a second demo may replace the first, but never another directory
        demo.main(["--out", str(tmp_path / "runs"), "--max-steps", "1"])
    assert e.value.code == 2


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--arms", "base,nope"], ["--max-steps", "-1"], ["--flaw-counts", "0,0"],
                                  ["--flaw-counts", "a"], ["--arms", "sbs-oracle"]])  # a teacher of the stress pool only
def test_demo_bad_flags_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(flag)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_a_fresh_run_refuses_an_out_dir_with_another_runs_checkpoints(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "1", "--batch-size", "2",
                                 "--grad-accum", "1"))
    train(cfg, ccfg)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, ccfg)
    assert os.path.isfile(tmp_path / "checkpoints" / "step-1" / "trainer.pt")


def test_resume_of_a_finished_run_and_of_another_step_total(run_inputs, tmp_path, capsys):
    model_dir, data_file = run_inputs
    common = ["--batch-size", "2", "--grad-accum", "1", "--save-every", "2"]
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "2", *common))
    train(cfg, ccfg)
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "2", "--resume", *common))
    train(cfg, ccfg)
    assert "already finished at step 2" in capsys.readouterr().out
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "4", "--resume", *common))
    with pytest.raises(ValueError, match="total_steps was 2, now 4"):
        train(cfg, ccfg)


def test_full_fine_tuning_writes_a_complete_model_directory(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "1", "--batch-size", "2",
                                 "--grad-accum", "1", "--full-ft", "--weighting", "uniform"))
    before = Transformer.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    train(cfg, ccfg)
    after = Transformer.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).state_dict()
    assert any((before[k] - after[k]).abs().max() > 0 for k in before)
    assert tokenizer.Tokenizer.from_pretrained(str(tmp_path / "model")).vocab_size > 0


@pytest.mark.parametrize("flag", [["--lora-rank", "0"], ["--max-steps", "-1"], ["--keep-checkpoints", "0"]])
def test_bad_flag_values_exit_2(flag):
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", "--data", "d", *flag])
    assert e.value.code == 2


def test_on_the_synthetic_pool_the_teacher_the_student_learned_from_is_the_easiest(run_inputs, tmp_path):
    """S_D responds as intended: after a few steps on the stepwise teacher alone, the student finds
    stepwise rationales easier (lower S_D) than reversed ones, and weighs them above the reversed
    ones. (The hallucinated teacher writes in the stepwise format: about as easy.)"""
    from compact import compact_loss
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--teachers", "stepwise", "--full-ft", "--max-steps",
                                 "12", "--batch-size", "6", "--grad-accum", "1", "--lr", "3e-3", "--weighting",
                                 "uniform", "--mcon-lambda", "0"))
    train(cfg, ccfg)
    student = Transformer.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).eval()
    tok = tokenizer.Tokenizer.from_pretrained(str(tmp_path / "model"))
    encoded, stats = data.encode_dataset(data.load_multi_teacher(data_file), tok, max_len=400)
    batch = data.collate(encoded[:8], tok.pad_id)
    with torch.no_grad():
        _, s = compact_loss(student, batch, CompactConfig(alpha=0.0, beta=0.0))  # the weights follow S_D alone
    mean = {name: s["s_d"][batch["teacher"] == i].mean().item() for i, name in enumerate(stats["teachers"])}
    weight = {name: s["weight"][batch["teacher"] == i].mean().item() for i, name in enumerate(stats["teachers"])}
    assert mean["stepwise"] < mean["reversed"], mean
    assert weight["stepwise"] > weight["reversed"], weight


# --- starting from an adapter; MoT rounds; teacher rationales to a trained student ---

def student_logits(model_dir, adapter=None, ids=torch.arange(3, 40)[None]):
    from lora import load_student
    model, _ = load_student(model_dir, adapter)
    with torch.no_grad():
        return model(ids)


def test_init_adapter_continues_the_adapter_exactly(run_inputs, tmp_path):
    from train import build_model
    model_dir, data_file = run_inputs
    train(*parse_args(flags(model_dir, data_file, tmp_path / "first", "--max-steps", "2", "--batch-size", "2",
                            "--grad-accum", "1")))
    adapter = str(tmp_path / "first" / "adapter")
    cfg, _ = parse_args(flags(model_dir, data_file, tmp_path / "next", "--init-adapter", adapter, "--lora-rank", "8"))
    model = build_model(cfg, torch.device("cpu")).eval()  # the adapter's rank 4, not --lora-rank 8
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(3, 40)[None]), student_logits(model_dir, adapter), rtol=0, atol=0)
    train(*parse_args(flags(model_dir, data_file, tmp_path / "next", "--init-adapter", adapter, "--max-steps", "1",
                            "--batch-size", "2", "--grad-accum", "1", "--lr", "0")))
    before, after = adapter_state(tmp_path / "first"), adapter_state(tmp_path / "next")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(SystemExit) as e:
        parse_args(flags(model_dir, data_file, tmp_path / "x", "--init-adapter", adapter, "--full-ft"))
    assert e.value.code == 2


def test_mot_runs_rounds_of_per_teacher_sft_then_an_exact_merge(run_inputs, tmp_path, capsys):
    import train as t
    model_dir, data_file = run_inputs
    argv = ["--mot-rounds", "2", *flags(model_dir, data_file, tmp_path / "mot", "--teachers", "stepwise,reversed",
                                    "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--save-every", "0")]
    t.main(argv)
    r1, r2 = tmp_path / "mot" / "round-1", tmp_path / "mot" / "round-2"
    for k in ("stepwise", "reversed"):  # round 2 trains a fresh LoRA on round 1's merged model
        assert json.load(open(r1 / k / "config.json"))["teachers"] == [k]
        assert json.load(open(r2 / k / "adapter" / "adapter_config.json"))["base_model_name_or_path"] == str(r1 / "model")
    # M_2 = M_1 + the exact mean of round 1's adapters (one-shot MoT when R = 1)
    torch.testing.assert_close(student_logits(str(r1 / "model")), student_logits(model_dir, str(r1 / "average")),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student_logits(str(r2 / "model")), student_logits(str(r1 / "model"), str(r2 / "average")),
                               rtol=1e-5, atol=1e-5)
    assert json.load(open(r1 / "average" / "adapter_config.json"))["r"] == 8  # 2 teachers × rank 4
    assert "the student is " + str(r2 / "model") in capsys.readouterr().out
    stamp = os.path.getmtime(r2 / "model" / "model.safetensors")
    t.main(argv)  # finished: nothing is trained or merged again
    assert os.path.getmtime(r2 / "model" / "model.safetensors") == stamp and "MoT round" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        t.main(["--mot-rounds", "1", *flags(model_dir, data_file, tmp_path / "bad", "--teachers", "nobody")])
    assert e.value.code == 2 and "unknown teacher(s) nobody" in capsys.readouterr().err


def test_teacher_rationales_to_build_to_a_trained_student(run_inputs, tmp_path, monkeypatch, capsys):
    """eval.py rationales for two teachers (generation scripted by the sample's seed) -> data.py build -> train.py."""
    import eval as ev
    model_dir, data_file = run_inputs
    rows = [json.loads(line) for line in open(data_file)][:6]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({**{k: r[k] for k in ("id", "question", "answer")}, "task": "gsm8k"}) + "\n"
                                 for r in rows))
    tok = tokenizer.Tokenizer.from_pretrained(model_dir)
    answer_of = {tuple(ev.chat_prompt(tok, data.user_prompt(r["question"], "gsm8k"))[1]): r["answer"] for r in rows}

    def scripted(right):  # a teacher that is right when right(seed) holds, and ends with the stop token
        def generate(model, prompts, max_new_tokens, eos_ids, temperature, top_p, seed):
            return [tok.encode(f"So we add. The answer is {answer_of[tuple(p)] if right(s) else 'unclear'}.")
                    + [tok.eot_id] for p, s in zip(prompts, seed)]
        return generate

    seeds = {(r["id"], s): ev.sample_seed(0, r["id"], s) for r in rows for s in range(2)}
    for name, right in (("odd", lambda s: s % 2 == 1), ("all", lambda s: True)):
        monkeypatch.setattr(ev, "generate", scripted(right))
        ev.main(["rationales", "--model", model_dir, "--questions", str(questions), "--samples", "2", "--device", "cpu",
                 "--out", str(tmp_path / f"{name}.jsonl")])
    out = str(tmp_path / "multi.jsonl")
    data.main(["build", "--questions", str(tmp_path / "odd.questions.jsonl"), "--teacher", f"odd={tmp_path / 'odd.jsonl'}",
               "--teacher", f"all={tmp_path / 'all.jsonl'}", "--out", out, "--min-teachers", "2"])
    solved = sorted({q for (q, _), seed in seeds.items() if seed % 2})
    assert [i.id for i in data.load_multi_teacher(out)] == [r["id"] for r in rows if r["id"] in solved]
    result = train(*parse_args(flags(model_dir, out, tmp_path / "run", "--max-steps", "1", "--batch-size", "2",
                                     "--grad-accum", "1")))
    assert result["teachers"] == ["all", "odd"] and os.path.isfile(tmp_path / "run" / "adapter" / "adapter_config.json")
