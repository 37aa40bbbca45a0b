"""Two processes (gloo on CPU): every rank reaches every collective, and a hang fails by a timeout.

(a) the demo through the README's torchrun command, with tiny settings, writes report.json;
(b) eval.run_sharded split over two ranks gives the records of one process.
"""
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # a hang fails here instead of blocking CI
TINY = ["--arms", "base,compact", "--max-steps", "6", "--pretrain-steps", "20", "--n-test", "40",
        "--n-train", "60", "--n-pretrain", "100", "--seeds", "2"]


def readme_demo_command():
    """The README's torchrun line for the demo, as argv (its comment dropped)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = [x for x in f if x.startswith("torchrun ") and " demo.py" in x]
    assert len(lines) == 1, "README.md holds one torchrun line for the demo"
    return shlex.split(lines[0], comments=True)


def descendants(pid):
    """The pids of every process below pid (torchrun starts its workers in their own sessions,
    so killing its process group would leave them running)."""
    parents = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found = [pid]
    for p in found:
        found += [c for c, parent in parents.items() if parent == p]
    return found[1:]


def run_with_timeout(argv, timeout, log):
    """(returncode, output) of argv, its output in the file `log`; it and every process below it
    are killed and the test fails when it runs past `timeout` seconds (a collective that one rank
    never reaches)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{' '.join(argv)} still running after {timeout}s (a hang?):\n"
                    f"{open(log, encoding='utf-8').read()[-3000:]}")
    with open(log, encoding="utf-8") as f:
        return proc.returncode, f.read()


def test_the_readme_torchrun_demo_finishes_on_two_ranks(tmp_path):
    argv = readme_demo_command()
    assert argv[0] == "torchrun" and "--nproc_per_node=2" in argv and "--out" in argv
    argv[argv.index("--out") + 1] = str(tmp_path / "demo")
    argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:], *TINY]
    rc, out = run_with_timeout(argv, TIMEOUT_S, tmp_path / "demo.log")
    assert rc == 0, out[-3000:]
    with open(tmp_path / "demo" / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    assert set(report["arms"]) == {"base", "compact"}
    assert report["arms"]["compact"]["n_per_seed"] == 40  # both ranks' shares, merged
    [verdict] = report["verdicts"]
    assert (verdict["a"], verdict["b"], verdict["n_seeds"]) == ("compact", "base", 2)
    preds = os.listdir(tmp_path / "demo" / "eval")
    assert not [p for p in preds if ".part" in p], preds  # every rank's part file folded in


def fake_work(jobs):
    """A deterministic stand-in for a model: one record per job, from its ids."""
    return [{"id": j["key"][0], "sample": j["key"][1], "output": sum(j["ids"]) % 97} for j in jobs]


def sharded_jobs(n):
    """n jobs with prompts of different lengths (run_sharded sorts each rank's share by length)."""
    return [{"key": (f"q{i}", i % 2), "ids": list(range(i % 7 + 1)), "stamp": f"s{i}"}
            for i in range(n)]


def seed_output(path, jobs):
    """An earlier, partial output: one record to reuse, one with a stale stamp to redo."""
    kept = {**fake_work(jobs[:1])[0], "stamp": jobs[0]["stamp"]}
    stale = {**fake_work(jobs[1:2])[0], "output": -1, "stamp": "old"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(kept) + "\n" + json.dumps(stale) + "\n")


def sharded_rank(rank, world, init_file, out, n):
    import eval as ev
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        records = ev.run_sharded(sharded_jobs(n), out, fake_work, 3, rank, world)
        with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump(records, f)
    finally:
        dist.destroy_process_group()


def spawn_with_timeout(fn, args, nprocs, timeout):
    """fn(rank, *args) in nprocs spawned processes; they are killed and the test fails after
    `timeout` seconds."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} on {nprocs} ranks still running after {timeout}s")


def test_run_sharded_on_two_ranks_gives_the_records_of_one(tmp_path):
    import eval as ev
    n = 11  # odd: the ranks' shares differ in size
    one = str(tmp_path / "one.jsonl")
    seed_output(one, sharded_jobs(n))
    expected = ev.run_sharded(sharded_jobs(n), one, fake_work, 3)
    two = str(tmp_path / "two.jsonl")
    seed_output(two, sharded_jobs(n))
    spawn_with_timeout(sharded_rank, (2, str(tmp_path / "pg"), two, n), 2, TIMEOUT_S)
    assert len(expected) == n and expected[1]["output"] != -1  # the stale record was redone
    for rank in (0, 1):  # every rank returns every record, in the jobs' order
        with open(f"{two}.rank{rank}.json", encoding="utf-8") as f:
            assert json.load(f) == expected
    with open(two, encoding="utf-8") as f:
        assert [json.loads(x) for x in f] == expected  # OUT holds them all, in order
    assert not [p for p in os.listdir(tmp_path) if ".part" in p]
