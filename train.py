"""Distil several teachers into one student with COMPACT: the DDP training loop.

    torchrun --nproc_per_node=2 train.py --model Qwen2.5-1.5B-Instruct --data multi.jsonl --out out

One process per device (nccl on CUDA, gloo on CPU, or a plain single process). Every rank
reads its own share of a seeded per-epoch permutation; every instance of an optimizer step
counts once, however the step is split over micro-batches and ranks. Rank 0 alone writes:
OUT/config.json, OUT/metrics.jsonl (one line per step), OUT/checkpoints/step-N/ (atomic),
OUT/adapter/ (the final PEFT adapter; OUT/model/ with --full-ft), holding OUT/train.lock
meanwhile. SIGTERM or SIGINT stops the run after the step under way, with a checkpoint (exit
143 or 130).

Read top-down: TrainConfig, train_step and the loop (train), then their helpers: the model,
the logs, the schedule, checkpoints and resume, the MoT baseline, the command line.
Left out: tensor/pipeline parallelism, FSDP, mixed-precision other than bf16 autocast.
"""
import argparse
import contextlib
import functools
import math
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from compact import TEACHER_STATS, CompactConfig, compact_loss, teacher_means, teacher_sums
from common import (STOP, DataError, add_config_args, all_sum, append_jsonl, atomic_path, barrier,
                    check_outputs, config_from_args, derive_seed, duration, flag_names, hold_lock,
                    print0, read_jsonl, run_job, write_json, write_jsonl)
from data import collate, load_data, load_multi_teacher, shard_indices, teacher_names, to_device
from lora import (apply_lora, average_adapters, load_adapter, merge_to_dir, read_adapter,
                  save_adapter)
from model import Transformer, compile_blocks
from tokenizer import copy_tokenizer


@dataclass
class TrainConfig:
    model: str = ""  # Hugging Face model directory of the student
    data: str = ""  # multi-teacher JSONL (SPEC.md §8)
    out: str = "runs/compact"  # output directory
    teachers: str = ""  # comma-separated subset of teachers ("" = all; one name = SbS baseline)
    epochs: int = 8  # the paper's setting for students of up to 2B parameters
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    lr: float = 2e-4  # peak learning rate (LoRA); full fine-tuning wants ~1e-5
    warmup: float = 0.03  # linear warmup, as a fraction of all steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    batch_size: int = 4  # instances per device per micro-step (each has K branches)
    grad_accum: int = 4  # micro-steps per optimizer step
    max_len: int = 2048  # tokens per branch; longer branches are dropped, never cut
    lora_rank: int = 16  # LoRA on q,k,v,o,gate,up,down
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    full_ft: bool = False  # train every weight instead of LoRA
    init_adapter: str = ""  # start LoRA from this PEFT adapter (with its own rank and alpha)
    mot_rounds: int = 0  # the MoT baseline: R rounds of per-teacher SFT, each closed by a merge
    grad_checkpointing: bool = False  # recompute each layer in backward (less memory)
    compile: bool = False  # torch.compile each block (a slow first step; a CPU needs a C compiler)
    seed: int = 0
    save_every: int = 200  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    resume: bool = False  # continue from the last complete checkpoint in OUT/checkpoints
    max_bad_steps: int = 3  # stop (with a checkpoint) after this many non-finite steps in a row
    skip_bad: bool = False  # drop malformed data lines (counted) instead of stopping at them
    thinking_words: str = ""  # S_MI's thinking words, comma-separated ("" = data.THINKING_WORDS)

    def __post_init__(self):
        for low, flags in ((1, "batch_size grad_accum epochs lora_rank keep_checkpoints max_len"),
                           (0, "max_steps save_every max_bad_steps warmup lr max_grad_norm")):
            for flag in flags.split():
                if getattr(self, flag) < low:
                    raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}")
        if os.path.isfile(self.out):
            raise ValueError(f"--out {self.out} is a file, not a directory")
        for sub in ("adapter", "model"):
            if os.path.islink(os.path.join(self.out, sub)):
                raise ValueError(f"--out {self.out}: {sub}/ is a symlink, which the end of the "
                                 "run would replace")
        inputs = [("--model", self.model), ("--init-adapter", self.init_adapter),
                  ("--data", self.data)]
        check_outputs([("--out", self.out)], inputs)
        if self.init_adapter and self.full_ft:
            raise ValueError("--init-adapter continues a LoRA adapter; --full-ft trains no adapter")
        if self.mot_rounds < 0 or (self.mot_rounds and (self.full_ft or self.init_adapter)):
            raise ValueError("--mot-rounds must be >= 0, and MoT trains fresh LoRA runs "
                             "(no --full-ft, no --init-adapter)")


# --- the step and the loop ---

SUMS = ("loss", "sft", "mcon", "tokens", "weight_entropy")  # tokens: the supervised ones


def train_step(model, optimizer, micro_batches, lr, n_instances, n_teachers, cfg, ccfg, device,
               autocast, rng_key=(), stop=False):
    """One optimizer step over this rank's micro-batches; returns its stats summed over ranks:
    {loss, sft, mcon, tokens, weight_entropy, teachers: [n_teachers, |TEACHER_STATS|+1],
    grad_norm, stop (whether any rank passed stop=True), finite}.
    Each micro-batch loss is Σ w L / n_instances (all instances of the step, all ranks), times
    world_size because DDP averages gradients over ranks: so the update is the same however the
    step is split. Only the last micro-step all-reduces gradients."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = torch.zeros(len(SUMS), device=device)
    teachers = torch.zeros(n_teachers, len(TEACHER_STATS) + 1, device=device)
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        sync = not ddp or i == len(micro_batches) - 1
        # no_sync around forward and backward both: DDP's forward decides if backward syncs
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
            loss, stats = compact_loss(model, batch, ccfg, n_instances=n_instances,
                                       rng_key=(*rng_key, i))
            (loss * world).backward()
        totals += torch.stack([stats[k].float() for k in SUMS])
        teachers += teacher_sums(stats, batch["teacher"], batch["branch_mask"], n_teachers)
    params = [p for p in model.parameters() if p.requires_grad]
    # With --max-grad-norm 0 the norm is only measured: the scale inf / norm is clamped to 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    flag = torch.tensor([float(stop)], device=device)
    summed = all_sum(torch.cat([totals, teachers.flatten(), flag]))
    # the norm is already global, so it is not summed; .cpu() is the step's one host sync
    summed = torch.cat([summed, grad_norm.float().view(1)]).cpu()
    out = dict(zip(SUMS, summed[:len(SUMS)].tolist()))
    out["teachers"] = summed[len(SUMS):-2].view_as(teachers)
    out["grad_norm"] = summed[-1].item()
    out["stop"] = summed[-2].item() > 0
    out["finite"] = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    if out["finite"]:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def train(cfg: TrainConfig, ccfg: CompactConfig, rank=0, world=1, device=torch.device("cpu")):
    """Run one training job in an already set-up process group; rank 0 writes every file,
    holding OUT's lock from the first write (hold_lock). SIGTERM or SIGINT (stop_on_signals)
    ends it after the step under way, with a checkpoint, in SystemExit(128 + the signal)."""
    t_start = time.time()
    _, encoded, data_stats = load_data(cfg.model, cfg.data, cfg.max_len, cfg.teachers,
                                       cfg.thinking_words, cfg.skip_bad, rank=rank)
    teachers = data_stats["teachers"]
    n_step = cfg.batch_size * cfg.grad_accum * world  # instances per step, all ranks together
    steps_per_epoch = -(-len(encoded) // n_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    run = run_settings(cfg, ccfg, data_stats, total, world)
    start, resume_dir, state = find_resume(cfg, run, device)
    raw, model, optimizer = build_training(cfg, device, world, resume_dir, state)
    n_all = sum(p.numel() for p in raw.parameters())
    n_trained = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    print0(f"model: {n_all / 1e6:.1f}M parameters, {n_trained / 1e6:.2f}M trained | {total} "
           f"steps of {n_step} instances ({steps_per_epoch}/epoch) on {world} × {device.type}")
    bf16 = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    autocast = bf16 if device.type == "cuda" else contextlib.nullcontext
    with hold_lock(cfg.out, rank, device):  # one run per --out, from its first write to its last
        metrics = os.path.join(cfg.out, "metrics.jsonl")
        if rank == 0:
            start_logs(metrics, cfg, ccfg, data_stats, world, start)
        model.train()
        bad = 0  # non-finite steps in a row
        last = None  # the last finite step's metrics
        t_loop = time.time()
        tokens_seen = 0
        for step in range(start, total):
            micro = step_batches(encoded, step, steps_per_epoch, cfg, rank, world)
            lr = lr_at(step, total, cfg)
            torch.manual_seed(derive_seed(cfg.seed, step, rank))  # dropout: (seed, step, rank)
            t0 = time.time()
            # S_MI's sample, like dropout, is a function of (step, rank); a signal to any rank
            # reaches every rank in the step's own all-reduce (stop).
            s = train_step(model, optimizer, micro, lr, n_step, len(teachers), cfg, ccfg, device,
                           autocast, rng_key=(cfg.seed, step, rank), stop="signal" in STOP)
            bad = 0 if s["finite"] else bad + 1
            if bad:
                print0(f"warning: step {step + 1}: non-finite loss or gradient, update skipped "
                       f"({bad} in a row)", file=sys.stderr)
            else:
                tokens_seen += s["tokens"]
                last = step_record(step, s, time.time() - t0, t_start, lr, teachers,
                                   steps_per_epoch, n_step)
            if rank == 0 and not bad:
                append_jsonl(metrics, [last])
                print0(log_line(last, start, total, tokens_seen, t_loop, device))
            stop = s["stop"] and step + 1 < total  # at the last step, finish() writes it all
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
            give_up = bad >= max(1, cfg.max_bad_steps)
            if rank == 0 and (stop or give_up or periodic and step + 1 < total):
                save_checkpoint(raw, optimizer, step + 1, cfg, run)  # the last one is finish()'s
            if stop or periodic:
                barrier()  # nobody races ahead of a checkpoint it might be killed after
            if give_up:
                raise FloatingPointError(f"{bad} non-finite steps in a row; stopped with a "
                                         f"checkpoint at step {step + 1}")
            if stop:
                raise stopped(step + 1, total)
        if rank == 0:
            finish(raw, optimizer, cfg, run, start, last, t_start)
        barrier()
    return {"steps": total, "last": last, "teachers": teachers, "model": raw}


# --- the run's parts: model, data, logs ---


def build_model(cfg, device, resume_dir=None):
    """Build → load → apply_lora (freezes the base) → device. The caller wraps it in DDP."""
    # A frozen base can sit in bf16; trained weights stay fp32 (bf16 autocast does the matmuls).
    dtype = torch.bfloat16 if device.type == "cuda" and not cfg.full_ft else torch.float32
    source = resume_dir if (cfg.full_ft and resume_dir) else cfg.model
    model = Transformer.from_pretrained(source, dtype=dtype, device=device)
    adapter = resume_dir or cfg.init_adapter
    if not cfg.full_ft and adapter:
        # its settings and weights with this run's dropout: step 0 is the adapter's model
        load_adapter(model, adapter, cfg.lora_dropout)
    elif not cfg.full_ft:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model = model.to(device)
    return compile_blocks(model) if cfg.compile else model


def build_training(cfg, device, world, resume_dir=None, state=None):
    """(raw model, the model a step calls: DDP over ranks, AdamW over the trained weights)."""
    torch.manual_seed(cfg.seed)  # LoRA's A init: the same on every rank and every run of a seed
    raw = build_model(cfg, device, resume_dir)
    model = raw
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=device_ids)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.999))
    if state:
        optimizer.load_state_dict(state["optimizer"])
    return raw, model, optimizer


def step_batches(encoded, step, steps_per_epoch, cfg, rank, world):
    """This rank's micro-batches of a step: its share of the epoch's seeded permutation (a
    function of the step alone, so a resumed run reads what the first one would have)."""
    per_rank = cfg.batch_size * cfg.grad_accum
    epoch, pos = divmod(step, steps_per_epoch)
    order = shard_indices(len(encoded), epoch, cfg.seed, rank, world, per_rank)
    mine = order[pos * per_rank:(pos + 1) * per_rank]
    starts = range(0, per_rank, cfg.batch_size)
    return [collate([encoded[j] for j in mine[m:m + cfg.batch_size]]) for m in starts]


def start_logs(metrics, cfg, ccfg, data_stats, world, start):
    """Rank 0: OUT/config.json (a resume keeps the first start's: the same updates) and the
    metrics file, cut back to the steps up to `start`."""
    config = os.path.join(cfg.out, "config.json")
    if not (start and os.path.isfile(config)):
        stats = {k: v for k, v in data_stats.items() if k != "teachers"}
        write_json(config, {"train": asdict(cfg), "compact": asdict(ccfg),
                            "teachers": data_stats["teachers"], "world_size": world,
                            "data_stats": stats})
    kept = []
    if start and os.path.isfile(metrics):
        kept = read_jsonl(metrics, torn_tail=True)
    write_jsonl(metrics, [r for _, r in kept if r["step"] <= start])


def step_record(step, s, dt, t_start, lr, teachers, steps_per_epoch, n_step):
    """One metrics.jsonl line from train_step's stats."""
    return {
        "step": step + 1,
        "epoch": round((step + 1) / steps_per_epoch, 4),
        "loss": s["loss"],
        "sft": s["sft"],
        "mcon": s["mcon"],
        "lr": lr,
        "grad_norm": s["grad_norm"],
        "tokens_per_s": s["tokens"] / dt,
        "instances": n_step,
        "weight_entropy": s["weight_entropy"],
        "time": round(time.time() - t_start, 3),
        "teachers": teacher_means(s["teachers"], teachers),
    }


def log_line(record, start, total, tokens_seen, t_loop, device):
    """The printed line of a step: loss, each teacher's mean weight, speed since the loop
    started (at step `start`, time t_loop), eta, peak memory."""
    elapsed = time.time() - t_loop
    eta = duration(elapsed / (record["step"] - start) * (total - record["step"]))
    w = " ".join(f"{n} {v['weight']:.2f}" for n, v in record["teachers"].items())
    return (f"step {record['step']}/{total} | loss {record['loss']:.4f} | w {w} | "
            f"{tokens_seen / elapsed:,.0f} tok/s | eta {eta} | mem {memory_mb(device):,.0f}MB")


def memory_mb(device):
    """Peak memory: CUDA's allocated bytes on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stopped(step, total):
    """The SystemExit(128 + signal) of a run a signal stopped; a rank told by another (through
    train_step's stop) stops as if by SIGTERM."""
    signum = STOP.get("signal", signal.SIGTERM)
    print0(f"{signal.Signals(signum).name}: stopped after step {step}/{total} with a "
           f"checkpoint; --resume continues it", file=sys.stderr)
    return SystemExit(128 + signum)


def finish(raw, optimizer, cfg, run, start, last, t_start):
    """The final weights first, then the final checkpoint: a kill in between resumes from the
    last periodic checkpoint and writes both again."""
    total = run["total_steps"]
    if total <= start:
        print0(f"{cfg.out}: the run already finished at step {total}; nothing to do")
        return
    final = os.path.join(cfg.out, "model" if cfg.full_ft else "adapter")
    with atomic_path(final) as tmp:
        save_weights(raw, tmp, cfg)
    save_checkpoint(raw, optimizer, total, cfg, run)
    loss = last["loss"] if last else float("nan")
    print0(f"done: {total} steps in {duration(time.time() - t_start)} | final loss {loss:.4f} | "
           f"wrote {final}")


# --- the schedule ---


def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to 0 (a function of the step alone)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# --- checkpoints and resume ---


def save_checkpoint(raw, optimizer, step, cfg, run):
    """OUT/checkpoints/step-N/: weights, optimizer and the run's settings (run_settings), written
    beside and renamed in: a kill (or a full disk) at any moment leaves the old or the new one
    complete; trainer.pt, written last, marks it complete. The learning rate, the RNG and the
    data position are functions of the step (see train()): they need no saved state."""
    with atomic_path(os.path.join(cfg.out, "checkpoints", f"step-{step}")) as tmp:
        trainer = {"step": step, "optimizer": optimizer.state_dict(), "run": run}
        save_weights(raw, tmp, cfg, trainer)
    for old in sorted(checkpoint_steps(cfg.out))[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(cfg.out, "checkpoints", f"step-{old}"), ignore_errors=True)


def save_weights(raw, path, cfg, trainer=None):
    """The trained weights into `path`: a PEFT adapter, or with --full-ft a complete model
    directory; then a checkpoint's `trainer` state as trainer.pt. Callers replace the directory
    whole (atomic_path), once."""
    with write_errors(path, SafetensorError):  # how safetensors says a write failed (disk full)
        if cfg.full_ft:
            raw.save_pretrained(path)
            copy_tokenizer(cfg.model, path)
        else:
            save_adapter(raw, path, base_model=cfg.model)
    if trainer is not None:
        # how torch.save says it; only around it: elsewhere a RuntimeError is a bug
        with write_errors(path, RuntimeError):
            torch.save(trainer, os.path.join(path, "trainer.pt"))


@contextlib.contextmanager
def write_errors(path, error):
    """`error` (a failed write: a full disk) as an OSError naming the bytes free at `path`."""
    try:
        yield
    except error as e:
        free = shutil.disk_usage(os.path.dirname(path)).free
        raise OSError(f"{free:,} bytes free there; {e}") from e


def checkpoint_steps(out):
    """The steps of OUT's complete checkpoints (trainer.pt is written last), in no order."""
    root = os.path.join(out, "checkpoints")
    dirs = os.listdir(root) if os.path.isdir(root) else []
    done = [d for d in dirs if os.path.isfile(os.path.join(root, d, "trainer.pt"))]
    return [int(d[5:]) for d in done if d.startswith("step-") and d[5:].isdigit()]


# What a resumed run may change: where and how often it writes, and how a step is computed,
# not what.
RESUME_FREE = ("out", "resume", "save_every", "keep_checkpoints", "max_bad_steps", "skip_bad",
               "compile", "grad_checkpointing", "epochs", "max_steps")


def run_settings(cfg, ccfg, data_stats, total, world):
    """What fixes a run's updates, as its checkpoints record it: every flag but RESUME_FREE, with
    paths resolved, --data as the sha256 of its bytes, --teachers as used, --epochs/--max-steps
    as the step total, and the number of ranks (dropout and S_MI's sample are drawn per rank
    and micro-batch)."""
    run = {k: v for k, v in {**asdict(cfg), **asdict(ccfg)}.items() if k not in RESUME_FREE}
    for key in ("model", "init_adapter"):
        if run[key] and os.path.exists(run[key]):
            run[key] = os.path.realpath(run[key])
    run.update(data=data_stats["sha256"], teachers=data_stats["teachers"], total_steps=total,
               world_size=world)
    return run


def find_resume(cfg, run, device):
    """(start step, checkpoint dir or None, its trainer state or None): the newest checkpoint
    whose files all load (trainer.pt, then the adapter or model; a warning names each one that
    does not), if it is one of this run."""
    done = sorted(checkpoint_steps(cfg.out), reverse=True)
    if done and not cfg.resume:
        raise ValueError(f"--out {cfg.out} holds the checkpoints of another run: pass --resume "
                         "to continue it, or choose another --out")
    if cfg.resume and not done:
        print0(f"--resume: no checkpoint in {cfg.out}/checkpoints, starting fresh")
    for step in done:
        path = os.path.join(cfg.out, "checkpoints", f"step-{step}")
        try:
            # torch's words on the pickle are left out (ours below never advise running it)
            with warnings.catch_warnings(action="ignore"):
                trainer_pt = os.path.join(path, "trainer.pt")
                state = torch.load(trainer_pt, map_location=device, weights_only=True)
            old = state.get("run", {})
            # read every file of the adapter or model
            if cfg.full_ft:
                Transformer.from_pretrained(path, device="meta")
            else:
                read_adapter(path)
        except Exception as e:  # a torn, random or foreign file: EOFError, UnpicklingError, ...
            why = type(e).__name__ if "weights_only" in str(e) else str(e).partition("\n")[0]
            print0(f"warning: {path} does not load ({why}); trying an earlier checkpoint",
                   file=sys.stderr)
            continue
        diff = [f"{k} {old.get(k, '-')!r} → {run.get(k, '-')!r}"
                for k in sorted(old.keys() | run.keys()) if old.get(k) != run.get(k)]
        if diff:
            more = " ..." if len(diff) > 6 else ""
            raise DataError(f"{path} was made with other settings: {'; '.join(diff[:6])}{more}."
                            " --resume continues a run as it was; for other settings, start a new"
                            f" run on another --out from this checkpoint: --init-adapter {path}"
                            f" (with --full-ft: --model {path})")
        redone = f" (steps after {step} are redone)" if step != done[0] else ""
        print0(f"resumed from {path}{redone}")
        return step, path, state
    if done:
        raise DataError(f"--resume: no checkpoint in {cfg.out}/checkpoints loads (see above); "
                        "move them away to start over, or start a new run from an earlier "
                        "adapter with --init-adapter")
    return 0, None, None


# --- the MoT baseline ---


def mot(cfg, ccfg, rank=0, world=1, device=torch.device("cpu")):
    """The MoT baseline as published (Merge-of-Thought, arXiv 2509.08814); returns the
    student's directory. Round r trains a fresh LoRA on M_r (M_1 = --model) per teacher k on its
    rationales alone (--teachers k: plain SFT), then M_{r+1} = M_r + mean_k ΔW_{r,k} (lora.py's
    exact average, merged in fp32). Outputs: OUT/round-r/TEACHER/, OUT/round-r/average/,
    OUT/round-r/model/ (M_{r+1}). A rerun skips finished rounds and resumes started runs; every
    other flag applies to each per-teacher run (docs/usage.md)."""
    teachers = flag_names(cfg.teachers)
    if not teachers:
        teachers = teacher_names(load_multi_teacher(cfg.data, skip_bad=cfg.skip_bad))
    bad = [t for t in teachers if os.sep in t or t.startswith(".")]
    if bad:
        raise DataError(f"teacher name {bad[0]!r} cannot name a run directory")
    # one branch per instance: plain SFT
    single = replace(ccfg, weighting="uniform", mcon_lambda=0.0)
    model = cfg.model
    with hold_lock(cfg.out, rank, device):  # the rounds' averages and merges too
        for r in range(1, cfg.mot_rounds + 1):
            root = os.path.join(cfg.out, f"round-{r}")
            merged = os.path.join(root, "model")
            # config.json is written last, atomically
            if not os.path.isfile(os.path.join(merged, "config.json")):
                for k in teachers:
                    out = os.path.join(root, k)
                    print0(f"MoT round {r}/{cfg.mot_rounds}: teacher {k} from {model}")
                    sft = replace(cfg, model=model, out=out, teachers=k, mot_rounds=0,
                                  resume=bool(checkpoint_steps(out)))
                    train(sft, single, rank, world, device)
                if rank == 0:
                    adapters = [os.path.join(root, k, "adapter") for k in teachers]
                    average_adapters(adapters, os.path.join(root, "average"))
                    merge_to_dir(model, os.path.join(root, "average"), merged, dtype="float32")
                barrier()
            model = merged
    print0(f"MoT: {cfg.mot_rounds} round(s) over {', '.join(teachers)} | the student is {model}")
    return model


# --- command line ---


def parse_args(argv=None):
    """TrainConfig and CompactConfig from the command line; one flag per dataclass field."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, TrainConfig)
    add_config_args(p, CompactConfig)
    for name, key in (("mi", "alpha"), ("consensus", "beta"), ("difficulty", "gamma")):
        p.add_argument(f"--no-{name}", action="store_const", const=0.0, dest=key,
                       default=argparse.SUPPRESS, help=f"ablation: {key} = 0")
    a = p.parse_args(argv)
    if not (a.model and a.data):
        p.error("--model and --data are required (python demo.py runs the CPU demo)")
    try:
        return config_from_args(TrainConfig, a), config_from_args(CompactConfig, a)
    except ValueError as e:
        p.error(str(e))


def main(argv=None):
    cfg, ccfg = parse_args(argv)
    run_job(mot if cfg.mot_rounds else train, cfg, ccfg)


if __name__ == "__main__":
    main()
