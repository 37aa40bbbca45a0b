"""train.py: outputs, DDP equivalence (gloo, two spawned ranks), exact resume after SIGKILL."""
import math
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
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


def test_help_gives_every_flag_its_field_comment_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    assert "--warmup WARMUP linear warmup, as a fraction of all steps (default: 0.03)" in text
    assert "--mi-norm MI_NORM S_MI the plain sum of Eq. 3" in text and "(default: 'none')" in text
    assert "--resume continue from the last complete checkpoint in OUT/checkpoints --max-bad-steps" in text


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
    micro = [data.collate([encoded[j] for j in mine[m * batch_size:(m + 1) * batch_size]])
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
    import common
    import train as t
    common.setup_dist()
    try:
        if job[0] == "train":
            cfg, ccfg = t.parse_args(job[1])
            state = {k: v for k, v in t.train(cfg, ccfg, rank, world)["model"].state_dict().items() if "lora_" in k}
        else:
            state = sgd_update(*job[1], rank, world, *job[2])
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        common.cleanup_dist()


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


# --- interrupted runs: SIGKILL, SIGTERM/SIGINT, one rank of two; the lock; what a resume accepts ---

COMMON = ["--max-steps", "10", "--batch-size", "2", "--grad-accum", "1", "--save-every", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def straight(run_inputs, tmp_path_factory):
    """The adapter of an uninterrupted run with COMMON, which every interrupted and resumed run must end at."""
    out = tmp_path_factory.mktemp("straight")
    train(*parse_args(flags(*run_inputs, out, *COMMON)))
    return adapter_state(out)


def command(model_dir, data_file, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *flags(model_dir, data_file, out, *extra)]


def wait_until(ready, procs, timeout=120):
    deadline = time.time() + timeout
    while not ready() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.01)


def metric_steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if line.endswith("\n")]


def test_resume_after_sigkill_matches_uninterrupted(run_inputs, straight, tmp_path):
    out = tmp_path / "killed"
    cmd = command(*run_inputs, out, *COMMON)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until((out / "checkpoints" / "step-4" / "trainer.pt").exists, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists(), "the run finished before the kill; the test proves nothing"
    assert (out / "train.lock").exists()  # left behind, but the kernel dropped its lock with the process
    resumed = subprocess.run(cmd + ["--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    got = adapter_state(out)
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=1e-6)
    assert metric_steps(out) == list(range(1, 11))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_stops_after_the_step_with_a_checkpoint_and_resume_ends_equal(run_inputs, straight, tmp_path,
                                                                                       capsys, sig):
    out = tmp_path / "run"
    cmd = command(*run_inputs, out, *COMMON)
    proc = subprocess.Popen(cmd + ["--save-every", "0"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # no periodic checkpoint: the only one is the signal's
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(metric_steps(out)) >= 3, [proc])
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    stopped = metric_steps(out)[-1]
    assert proc.returncode == 128 + sig and 3 <= stopped < 10, err
    assert f"{sig.name}: stopped after step {stopped}/10 with a checkpoint" in err and "Traceback" not in err
    assert os.listdir(out / "checkpoints") == [f"step-{stopped}"] and not (out / "adapter").exists()
    train(*parse_args(flags(*run_inputs, out, *COMMON, "--resume")))  # in this process: no second start-up
    assert f"resumed from {out}/checkpoints/step-{stopped}" in capsys.readouterr().out
    got = adapter_state(out)
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=1e-6)
    assert metric_steps(out) == list(range(1, 11))


def test_two_ranks_stop_together_on_a_lock_held_elsewhere_and_on_a_sigterm_to_one(run_inputs, tmp_path):
    import contextlib
    import socket
    import train as t
    out = tmp_path / "ddp"
    cmd = command(*run_inputs, out, "--max-steps", "12", "--batch-size", "1", "--grad-accum", "1", "--save-every", "0")

    def two_ranks(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [subprocess.Popen(cmd + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**ENV, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
                                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]

    with contextlib.ExitStack() as held:
        assert common.lock_file(held, str(out / "train.lock")) is None
        procs = two_ranks()
        errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2] and f"{out}: another run (pid {os.getpid()})" in errs[0], errs
    assert "Traceback" not in errs[0] + errs[1] and not (out / "metrics.jsonl").exists()
    procs = two_ranks()
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(metric_steps(out)) >= 3, procs)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 alone: rank 0 learns of it in the step's all-reduce
    errs = [p.communicate(timeout=120)[1] for p in procs]
    stopped = metric_steps(out)[-1]
    assert [p.returncode for p in procs] == [143, 143] and stopped < 12, errs
    assert os.listdir(out / "checkpoints") == [f"step-{stopped}"]


def test_cleanup_dist_frees_the_ddp_model_an_error_holds_before_it_destroys_the_group(tmp_path, monkeypatch):
    """The model in a failed job's traceback, freed only at the interpreter's exit after the group, once hung
    a rank there (gloo's destructor joined its worker with the GIL held); it must be gone first."""
    import gc
    import weakref
    import torch.distributed as dist
    import common
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    model, alive, destroy = [], [], dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (alive.append(model[0]() is not None), destroy()))

    def job():
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp.__dict__["cycle"] = [ddp]  # as a process's first DDP sits in one (a traceback torch keeps)
        model.append(weakref.ref(ddp))
        raise common.DataError("bad input")

    gc.disable()  # DDP's cycles must go in cleanup_dist's own collection
    try:
        with pytest.raises(SystemExit):
            try:
                with common.user_errors("train.py"):
                    job()
            finally:
                common.cleanup_dist()
    finally:
        gc.enable()
    assert alive == [False] and not dist.is_initialized()


def test_lock_file_is_exclusive_names_its_holder_and_ends_with_its_stack(tmp_path):
    import contextlib
    import common
    path = str(tmp_path / "out" / "train.lock")
    with contextlib.ExitStack() as first:
        assert common.lock_file(first, path) is None
        with contextlib.ExitStack() as second:
            assert common.lock_file(second, path) == str(os.getpid())
    with contextlib.ExitStack() as third:
        assert common.lock_file(third, path) is None


def test_a_second_run_on_the_same_out_exits_2_naming_the_directory_and_the_first_runs_pid(run_inputs, tmp_path,
                                                                                         monkeypatch, capsys):
    import train as t
    argv = flags(*run_inputs, tmp_path, "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1")
    real, second = t.train_step, []

    def step_and_start_a_second_run(*args, **kwargs):
        if not second:
            with pytest.raises(SystemExit) as e:
                t.main(argv)
            second.append((e.value.code, capsys.readouterr().err))
        return real(*args, **kwargs)

    monkeypatch.setattr(t, "train_step", step_and_start_a_second_run)
    t.main(argv)
    assert second[0][0] == 2 and f"{tmp_path}: another run (pid {os.getpid()}) writes there" in second[0][1]
    assert metric_steps(tmp_path) == [1, 2] and (tmp_path / "adapter").is_dir()  # the first run went on


@pytest.mark.parametrize("flag,change", [(["--lr", "2e-2"], "lr 0.01 → 0.02"), (["--mi-budget", "16"], "mi_budget 12 → 16"),
                                         (["--teachers", "stepwise"], "teachers ["), (["--seed", "1"], "seed 0 → 1"),
                                         (["--thinking-words", "so"], "thinking_words '' → 'so'"),
                                         (["--lora-dropout", "0"], "lora_dropout 0.1 → 0.0"),
                                         (["--batch-size", "1", "--grad-accum", "2"], "batch_size 2 → 1; grad_accum 1 → 2"),
                                         (["--no-consensus"], "beta 1.0 → 0.0"), (["--max-len", "390"], "max_len 400 → 390"),
                                         (["--data", "SAME-SIZE"], "data '")])
def test_resume_refuses_what_changes_the_updates_naming_it(run_inputs, finished, tmp_path, flag, change):
    model_dir, data_file = run_inputs
    if flag[-1] == "SAME-SIZE":  # other data of the very same size: only its content tells
        text = open(data_file).read()
        flag = ["--data", str(tmp_path / "same-size.jsonl")]
        open(flag[1], "w").write(re.sub(r"\d", lambda m: "7" if m[0] != "7" else "8", text, count=1))
    with pytest.raises(ValueError, match=re.escape(f"step-2 was made with other settings: {change}")) as e:
        train(*parse_args(flags(model_dir, data_file, finished, *FINISHED, "--resume", *flag)))
    assert f"--init-adapter {finished}/checkpoints/step-2" in str(e.value)


FINISHED = ["--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--save-every", "1"]


@pytest.fixture(scope="module")
def finished(run_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    train(*parse_args(flags(*run_inputs, out, *FINISHED)))
    return out


def test_resume_accepts_other_outputs_settings_and_keeps_the_config_of_the_recorded_steps(run_inputs, finished, capsys):
    config = (finished / "config.json").read_bytes()
    train(*parse_args(flags(*run_inputs, finished, *FINISHED, "--resume", "--save-every", "7", "--keep-checkpoints", "5",
                            "--max-bad-steps", "9", "--epochs", "3")))
    assert "already finished at step 2" in capsys.readouterr().out and (finished / "config.json").read_bytes() == config


def test_resume_refuses_another_batch_layout(run_inputs, tmp_path):
    model_dir, data_file = run_inputs
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "2", "--batch-size", "2",
                                 "--grad-accum", "1"))
    train(cfg, ccfg)
    cfg, ccfg = parse_args(flags(model_dir, data_file, tmp_path, "--max-steps", "4", "--batch-size", "3",
                                 "--grad-accum", "1", "--resume"))
    with pytest.raises(ValueError, match="other settings: batch_size 2 → 3; total_steps 2 → 4"):
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
    import demo
    demo.main(["--out", str(tmp_path), "--max-steps", "2", "--pretrain-steps", "2", "--seeds", "2", "--arms",
            "base,sbs-stepwise,compact,clean-only", "--n-train", "24", "--n-test", "12", "--n-pretrain", "24"])
    printed = capsys.readouterr().out
    for name in ("data/train.jsonl", "data/test.jsonl", "data/pretrain.jsonl", "base/config.json", "base/tokenizer.json",
                 "base/model.safetensors", "eval/base.jsonl", "eval/base.json", "eval/compact-seed-1.jsonl",
                 "runs/compact/seed-0/metrics.jsonl", "runs/compact/seed-1/result.json", "runs/sbs-stepwise/seed-1/model/model.safetensors", "report.json"):
        assert (tmp_path / name).exists(), name
    report = json.load(open(tmp_path / "report.json"))
    assert list(report["arms"]) == ["base", "sbs-stepwise", "compact", "clean-only"]
    assert report["best_sbs"] == "sbs-stepwise"
    arm = report["arms"]["compact"]
    assert arm["seeds"] == [0, 1] and arm["n_per_seed"] == 12 and len(arm["per_seed"]) == 2 and arm["sem"] >= 0
    assert set(arm["teachers"]) == set(demo.POOLS["premise"])
    assert all(0 <= w["weight_first"] <= 1 and 0 <= w["weight_last"] <= 1 for w in arm["teachers"].values())
    for when in ("early", "late"):  # what each score caught, as within-instance AUROC, per flaw too
        auroc = arm["auroc"][when]
        assert {"s_mi", "s_g", "s_d", "weight", "s_d/form", "weight/filler"} <= set(auroc)
        assert all(v is None or 0 <= v <= 1 for k, v in auroc.items() if k != "se") and auroc["s_d"] is not None
    clean = [r for line in open(tmp_path / "data" / "train_clean.jsonl") for r in json.loads(line)["rationales"]]
    assert clean and not any(r["flaw"] for r in clean) and "auroc" not in report["arms"]["clean-only"]
    assert "± SEM" in printed and "compact: mean weight per teacher" in printed and "AUROC" in printed
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
    with pytest.raises(ValueError, match="other settings: total_steps 2 → 4"):
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
    batch = data.collate(encoded[:8])
    with torch.no_grad():
        _, s = compact_loss(student, batch, CompactConfig(alpha=0.0, beta=0.0))  # the weights follow S_D alone
    mean = {name: s["s_d"][batch["teacher"] == i].mean().item() for i, name in enumerate(stats["teachers"])}
    weight = {name: s["weight"][batch["teacher"] == i].mean().item() for i, name in enumerate(stats["teachers"])}
    assert mean["stepwise"] < mean["reversed"], mean
    assert weight["stepwise"] > weight["reversed"], weight


# --- starting from an adapter; MoT rounds; teacher rationales to a trained student ---

def student_logits(model_dir, adapter=None, ids=torch.arange(3, 40)[None]):
    from eval import load_student
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


# --- damaged checkpoints, a full disk, bad files, outputs over inputs, a huge rationale ---

class Payload:
    """A pickle that would create the file `path` when unpickled: weights_only loading must never run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def damage(path, how):
    """Cut a file in half, fill it with random bytes, or make it text that is no JSON."""
    raw = path.read_bytes()
    path.write_bytes({"torn": raw[:len(raw) // 2], "random": os.urandom(len(raw)), "garbage": b"{not json"}[how])


@pytest.fixture(scope="module")
def six_steps(run_inputs, tmp_path_factory):
    """Finished runs of 6 steps (LoRA) and 4 steps (--full-ft), each with its last two checkpoints."""
    lora, full = tmp_path_factory.mktemp("lora"), tmp_path_factory.mktemp("full")
    train(*parse_args(flags(*run_inputs, lora, *SIX)))
    train(*parse_args(flags(*run_inputs, full, *FULL)))
    return {"lora": lora, "full": full}


SIX = ["--max-steps", "6", "--batch-size", "2", "--grad-accum", "1", "--save-every", "2"]
FULL = ["--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--save-every", "2", "--full-ft",
        "--weighting", "uniform"]


def weights(out, kind):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors") if kind == "lora" else
                     os.path.join(out, "model", "model.safetensors"))


@pytest.mark.parametrize("kind,file,how", [("lora", "trainer.pt", "torn"), ("lora", "trainer.pt", "random"),
                                           ("lora", "trainer.pt", "pickle"), ("lora", "adapter_model.safetensors", "torn"),
                                           ("lora", "adapter_config.json", "garbage"), ("full", "model.safetensors", "torn"),
                                           ("full", "config.json", "garbage")])
def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes_to_the_same_end(run_inputs, six_steps, tmp_path, capsys,
                                                                               kind, file, how):
    import pickle
    import train as t
    out, marker = tmp_path / "run", tmp_path / "the-pickle-ran"
    shutil.copytree(six_steps[kind], out)
    newest = out / "checkpoints" / ("step-6" if kind == "lora" else "step-4")
    if how == "pickle":
        (newest / file).write_bytes(pickle.dumps(Payload(str(marker))))
    else:
        damage(newest / file, how)
    t.main(flags(*run_inputs, out, *(SIX if kind == "lora" else FULL), "--resume"))
    captured = capsys.readouterr()
    assert f"warning: {newest} does not load (" in captured.err and "weights_only" not in captured.err, captured.err
    assert "Traceback" not in captured.err and not marker.exists()
    assert f"resumed from {out}/checkpoints/step-{4 if kind == 'lora' else 2}" in captured.out
    want, got = weights(six_steps[kind], kind), weights(out, kind)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_without_an_intact_checkpoint_resume_exits_2_with_advice(run_inputs, six_steps, tmp_path, capsys):
    import pickle
    import train as t
    out = tmp_path / "run"
    shutil.copytree(six_steps["lora"], out)
    for step in (4, 6):
        (out / "checkpoints" / f"step-{step}" / "trainer.pt").write_bytes(pickle.dumps(Payload(str(tmp_path / "x"))))
    with pytest.raises(SystemExit) as e:
        t.main(flags(*run_inputs, out, *SIX, "--resume"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"no checkpoint in {out}/checkpoints loads" in err and "--init-adapter" in err
    assert "Traceback" not in err and "weights_only" not in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("error", ["ENOSPC", "safetensors"])
def test_a_full_disk_at_a_checkpoint_exits_2_naming_it_and_the_one_before_is_intact(run_inputs, straight, tmp_path,
                                                                                 monkeypatch, capsys, error):
    import errno
    import train as t
    from safetensors import SafetensorError
    real = t.save_adapter

    def full_at_step_4(model, path, base_model=""):
        if os.path.basename(path) == ".step-4.tmp":
            raise OSError(errno.ENOSPC, "No space left on device") if error == "ENOSPC" else \
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(model, path, base_model)

    monkeypatch.setattr(t, "save_adapter", full_at_step_4)
    with pytest.raises(SystemExit) as e:
        t.main(flags(*run_inputs, tmp_path, *COMMON))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{tmp_path}/checkpoints/step-4: cannot write it (" in err, err
    assert "No space left on device" in err and "Traceback" not in err
    assert os.listdir(tmp_path / "checkpoints") == ["step-2"]  # and nothing half-written beside it
    monkeypatch.undo()
    t.main(flags(*run_inputs, tmp_path, *COMMON, "--resume"))
    got = adapter_state(tmp_path)
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=1e-6)


def test_a_bad_byte_or_a_deep_line_exits_2_naming_it_and_skip_bad_counts_it_in_config(run_inputs, tmp_path, capsys):
    import train as t
    model_dir, data_file = run_inputs
    lines = open(data_file, "rb").read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines[:3] + [b'{"id": "x", "question": "\xff"}', b"[" * 100_000] + lines[3:]) + b"\n")
    with pytest.raises(SystemExit) as e:
        t.main(flags(model_dir, str(bad), tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{bad}:4: not UTF-8 text" in err and f"{bad}:5: bad JSON (nested too deeply)" in err
    assert "Traceback" not in err
    t.main(flags(model_dir, str(bad), tmp_path / "out", "--skip-bad", "--max-steps", "1", "--batch-size", "2",
                 "--grad-accum", "1"))
    stats = json.load(open(tmp_path / "out" / "config.json"))["data_stats"]
    assert stats["skipped_lines"] == 2 and stats["instances"] == 18


@pytest.mark.parametrize("name,content", [("tokenizer.json", b"\xff\xfe garbage"), ("tokenizer.json", b'{"model": 1}'),
                                          ("tokenizer_config.json", b"{"), ("config.json", b"[" * 100_000),
                                          ("config.json", b"\x00\xff"), ("config.json", b'{"model_type": "qwe')])
def test_a_garbage_model_file_exits_2_naming_it(run_inputs, tmp_path, capsys, name, content):
    import train as t
    model_dir, data_file = run_inputs
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
        t.main(flags(str(model), data_file, tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{model}/{name}" in err and "Traceback" not in err, err


def test_an_instance_without_a_rationale_of_the_teachers_is_reported_as_such(run_inputs, tmp_path, capsys):
    import train as t
    model_dir, data_file = run_inputs
    rows = [json.loads(line) for line in open(data_file)]
    rows[0]["rationales"] = [r for r in rows[0]["rationales"] if r["teacher"] != "stepwise"]
    common.write_jsonl(str(tmp_path / "d.jsonl"), rows)
    _, encoded, stats = t.load_data(model_dir, str(tmp_path / "d.jsonl"), 400, teachers="stepwise")
    assert len(encoded) == 17 and stats["without_teacher"] == 1 and stats["dropped_instances"] == 0
    assert "dropped 1 instances without a rationale of --teachers, 0 instances" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["model", "inside-model", "symlink-to-model", "relative", "init-adapter", "data",
                                   "symlinked-adapter"])
def test_an_out_over_an_input_or_a_symlinked_adapter_exits_2_before_anything_is_written(run_inputs, tmp_path, capsys,
                                                                                      monkeypatch, where):
    import train as t
    model_dir, data_file = run_inputs
    before = {f: open(os.path.join(model_dir, f), "rb").read() for f in os.listdir(model_dir)}
    (tmp_path / "link").symlink_to(model_dir)
    (tmp_path / "adapter-in").mkdir()
    (tmp_path / "run" / "adapter").parent.mkdir()
    (tmp_path / "run" / "adapter").symlink_to(tmp_path / "adapter-in")
    monkeypatch.chdir(os.path.dirname(model_dir))
    out, extra = {"model": (model_dir, []), "inside-model": (os.path.join(model_dir, "run"), []),
                  "symlink-to-model": (str(tmp_path / "link"), []), "relative": ("student/../student", []),
                  "init-adapter": (str(tmp_path / "adapter-in" / "x"), ["--init-adapter", str(tmp_path / "adapter-in")]),
                  "data": (data_file, []), "symlinked-adapter": (str(tmp_path / "run"), [])}[where]
    with pytest.raises(SystemExit) as e:
        t.main(flags(model_dir, data_file, out, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("would overwrite" in err or "a file" in err or "symlink" in err), err
    assert {f: open(os.path.join(model_dir, f), "rb").read() for f in os.listdir(model_dir)} == before
    assert os.listdir(tmp_path / "run") == ["adapter"] and os.listdir(tmp_path / "adapter-in") == []


def test_a_6mb_rationale_costs_under_half_as_much_memory_again(run_inputs, tmp_path):
    """Peak RSS of load_data in a fresh process, with and without one 6 MB rationale (dropped untokenized)."""
    model_dir, data_file = run_inputs
    rows = [json.loads(line) for line in open(data_file)]
    rows[0]["rationales"][0]["text"] = "So we add 8 and 2, then take away 4. " * 165_000
    common.write_jsonl(str(tmp_path / "huge.jsonl"), rows)
    code = ("import resource, sys, train; train.load_data(sys.argv[1], sys.argv[2], 400); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    rss = [int(subprocess.run([sys.executable, "-c", code, model_dir, path], cwd=ROOT, env=ENV, capture_output=True,
                              text=True, timeout=120).stdout.split()[-1]) for path in (data_file, str(tmp_path / "huge.jsonl"))]
    assert rss[1] < 1.5 * rss[0], rss  # measured: 230 MB vs 252 MB here (2.3 GB when it was tokenized whole)


def test_step_batches_give_each_rank_its_share_of_every_epoch_once_and_reshuffle(monkeypatch):
    import train as t
    monkeypatch.setattr(t, "collate", list)  # the instances a micro-batch holds
    cfg = TrainConfig(model="m", data="d", batch_size=2, grad_accum=3)
    encoded = list(range(24))  # 2 ranks x 6 per rank: 2 steps per epoch

    def epoch(e):
        return [[x for mb in t.step_batches(encoded, step, 2, cfg, rank, 2) for x in mb]
                for step in (2 * e, 2 * e + 1) for rank in (0, 1)]

    for e in (0, 1):
        assert all(len(share) == 6 for share in epoch(e))
        assert sorted(x for share in epoch(e) for x in share) == encoded
    assert epoch(0) != epoch(1)


def test_run_settings_name_the_inputs_by_their_real_paths(tmp_path):
    import train as t
    real = tmp_path / "model"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    stats = {"sha256": "abc", "teachers": ["a", "b"]}
    got = [t.run_settings(TrainConfig(model=str(m), data="d", save_every=s), CompactConfig(), stats, 7, 2)
           for m, s in ((real, 1), (tmp_path / "link", 2))]
    assert got[0] == got[1] and got[0]["model"] == os.path.realpath(real)
    assert got[0]["data"] == "abc" and got[0]["total_steps"] == 7 and "save_every" not in got[0]
