"""Distil several teachers into one student with COMPACT: the DDP training loop.

    torchrun --nproc_per_node=2 train.py --model Qwen2.5-1.5B-Instruct --data multi.jsonl --out runs/x

One process per device (nccl on CUDA, gloo on CPU, or a plain single process). Every rank
reads its own share of a seeded per-epoch permutation; every instance of an optimizer step
counts once, however the step is split over micro-batches and ranks. Rank 0 alone writes:
OUT/config.json, OUT/metrics.jsonl (one line per step), OUT/checkpoints/step-N/ (atomic),
OUT/adapter/ (the final PEFT adapter; OUT/model/ with --full-ft), holding OUT/train.lock meanwhile.
SIGTERM or SIGINT stops the run after the step under way, with a checkpoint (exit 143 or 130).

Left out: tensor/pipeline parallelism, FSDP, mixed-precision other than bf16 autocast.
"""
import argparse
import contextlib
import math
import os
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
from lora import apply_lora, average_adapters, load_adapter, merge_to_dir, read_adapter, save_adapter
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
    init_adapter: str = ""  # start LoRA from this PEFT adapter (its rank and alpha, not --lora-rank/-alpha)
    mot_rounds: int = 0  # the MoT baseline: R rounds of per-teacher SFT, each closed by a merge (see mot())
    grad_checkpointing: bool = False  # recompute each layer in backward (less memory)
    compile: bool = False  # torch.compile each decoder block (a slow first step; a CPU needs a C compiler)
    seed: int = 0
    save_every: int = 200  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    resume: bool = False  # continue from the last complete checkpoint in OUT/checkpoints
    max_bad_steps: int = 3  # stop (with a checkpoint) after this many non-finite steps in a row
    skip_bad: bool = False  # drop malformed data lines (counted) instead of stopping with the first problems
    thinking_words: str = ""  # comma-separated thinking words for S_MI's mask ("" = data.THINKING_WORDS)

    def __post_init__(self):
        for low, flags in ((1, "batch_size grad_accum epochs lora_rank keep_checkpoints max_len"),
                           (0, "max_steps save_every max_bad_steps warmup lr max_grad_norm")):
            for flag in flags.split():
                if getattr(self, flag) < low:
                    raise ValueError(f"--{flag.replace('_', '-')} must be >= {low}")
        if os.path.isfile(self.out):
            raise ValueError(f"--out {self.out} is a file, not a directory")
        if sub := next((d for d in ("adapter", "model") if os.path.islink(os.path.join(self.out, d))), None):
            raise ValueError(f"--out {self.out}: {sub}/ is a symlink, which the end of the run would replace")
        check_outputs([("--out", self.out)], [("--model", self.model), ("--init-adapter", self.init_adapter),
                                              ("--data", self.data)])
        if self.init_adapter and self.full_ft:
            raise ValueError("--init-adapter continues a LoRA adapter; --full-ft trains no adapter")
        if self.mot_rounds < 0 or (self.mot_rounds and (self.full_ft or self.init_adapter)):
            raise ValueError("--mot-rounds must be >= 0, and MoT trains fresh LoRA runs "
                             "(no --full-ft, no --init-adapter)")


# --- schedule, checkpoints, resume ---

def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to 0 (a function of the step alone)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save_checkpoint(raw, optimizer, step, cfg, run):
    """OUT/checkpoints/step-N/: weights + optimizer + the run's settings (run_settings), written
    beside and renamed in. A kill (or a full disk) at any moment leaves either the old or the new
    directory complete; trainer.pt is written last and marks a checkpoint as complete. The learning
    rate, the RNG and the data position are functions of
    the step (see train()), so they need no saved state.
    """
    with atomic_path(os.path.join(cfg.out, "checkpoints", f"step-{step}")) as tmp:
        save_weights(raw, tmp, cfg, {"step": step, "optimizer": optimizer.state_dict(), "run": run})
    for old in sorted(checkpoint_steps(cfg.out))[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(cfg.out, "checkpoints", f"step-{old}"), ignore_errors=True)


def save_weights(raw, path, cfg, trainer=None):
    """The trained weights into `path`: a PEFT adapter, or with --full-ft a complete model
    directory; then a checkpoint's `trainer` state as trainer.pt.
    Callers replace the directory whole (atomic_path), once."""
    free = lambda e: OSError(f"{shutil.disk_usage(os.path.dirname(path)).free:,} bytes free there; {e}")
    try:
        if cfg.full_ft:
            raw.save_pretrained(path)
            copy_tokenizer(cfg.model, path)
        else:
            save_adapter(raw, path, base_model=cfg.model)
    except SafetensorError as e:  # how safetensors says a write failed (disk full)
        raise free(e) from e
    try:
        if trainer is not None:
            torch.save(trainer, os.path.join(path, "trainer.pt"))
    # how torch.save says it; only around it: elsewhere a RuntimeError is a bug
    except RuntimeError as e:
        raise free(e) from e


def checkpoint_steps(out):
    """The steps of OUT's complete checkpoints (trainer.pt is written last), in no order."""
    root = os.path.join(out, "checkpoints")
    dirs = os.listdir(root) if os.path.isdir(root) else []
    done = [d for d in dirs if d.startswith("step-") and os.path.isfile(os.path.join(root, d, "trainer.pt"))]
    return [int(d[5:]) for d in done if d[5:].isdigit()]


# What a resumed run may change: where and how often
# it writes, and how a step is computed, not what.
RESUME_FREE = ("out", "resume", "save_every", "keep_checkpoints", "max_bad_steps", "skip_bad", "compile",
               "grad_checkpointing", "epochs", "max_steps")


def run_settings(cfg, ccfg, data_stats, total, world):
    """What fixes a run's updates, as its checkpoints record it: every flag but RESUME_FREE, with
    paths resolved, --data as the sha256 of its bytes, --teachers as used, --epochs/--max-steps as
    the step total, and the number of ranks (dropout and
    S_MI's sample are drawn per rank and micro-batch)."""
    real = lambda p: os.path.realpath(p) if p and os.path.exists(p) else p
    return {**{k: v for k, v in {**asdict(cfg), **asdict(ccfg)}.items() if k not in RESUME_FREE},
            "model": real(cfg.model), "init_adapter": real(cfg.init_adapter), "data": data_stats["sha256"],
            "teachers": data_stats["teachers"], "total_steps": total, "world_size": world}


def find_resume(cfg, run, device):
    """(start step, checkpoint dir or None, its trainer state or None): the newest checkpoint whose
    files all load (trainer.pt, then the adapter or model; a
    warning names each one that does not), if of this run."""
    done = sorted(checkpoint_steps(cfg.out), reverse=True)
    if done and not cfg.resume:
        raise ValueError(f"--out {cfg.out} holds the checkpoints of another run: pass --resume to continue "
                         "it, or choose another --out")
    if cfg.resume and not done:
        print0(f"--resume: no checkpoint in {cfg.out}/checkpoints, starting fresh")
    for step in done:
        path = os.path.join(cfg.out, "checkpoints", f"step-{step}")
        try:
            # torch's words on the pickle are left out (ours below never advise running it)
            with warnings.catch_warnings(action="ignore"):
                state = torch.load(os.path.join(path, "trainer.pt"), map_location=device, weights_only=True)
            old = state.get("run", {})
            # reads every file of the adapter or model
            Transformer.from_pretrained(path, device="meta") if cfg.full_ft else read_adapter(path)
        # a torn, random or foreign file: EOFError, RuntimeError, UnpicklingError, ...
        except Exception as e:
            why = type(e).__name__ if "weights_only" in str(e) else str(e).partition("\n")[0]
            print0(f"warning: {path} does not load ({why}); trying an earlier checkpoint", file=sys.stderr)
            continue
        if diff := [f"{k} {old.get(k, '-')!r} → {run.get(k, '-')!r}" for k in sorted(old.keys() | run.keys())
                    if old.get(k) != run.get(k)]:
            raise DataError(
                f"{path} was made with other settings: {'; '.join(diff[:6])}{' ...' * (len(diff) > 6)}."
                " --resume continues a run as it was; for other settings, start a new run on another --out"
                f" from this checkpoint: --init-adapter {path} (with --full-ft: --model {path})")
        print0(f"resumed from {path}" + f" (steps after {step} are redone)" * (step != done[0]))
        return step, path, state
    if done:
        raise DataError(f"--resume: no checkpoint in {cfg.out}/checkpoints loads (see above); move them away "
                        "to start over, or start a new run from an earlier adapter with --init-adapter")
    return 0, None, None


# --- the step ---

def train_step(model, optimizer, micro_batches, lr, n_instances, n_teachers, cfg, ccfg, device, autocast,
               rng_key=(), stop=False):
    """One optimizer step over this rank's micro-batches;
    returns the step's stats summed over ranks.

    Each micro-batch loss is Σ w L / n_instances (all instances of the step, all ranks),
    times world_size because DDP averages gradients over ranks: so the update is the same
    however the step is split. Only the last micro-step all-reduces gradients.
    Returns {finite, grad_norm, loss, sft, mcon, tokens, weight_entropy,
    teachers: [n_teachers, |TEACHER_STATS|+1], stop: whether any rank passed stop=True}.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = ("loss", "sft", "mcon", "tokens", "weight_entropy")  # tokens: the supervised ones
    totals = torch.zeros(len(sums), device=device)
    teachers = torch.zeros(n_teachers, len(TEACHER_STATS) + 1, device=device)
    for i, batch in enumerate(micro_batches):
        batch = to_device(batch, device)
        sync = not ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
            loss, stats = compact_loss(model, batch, ccfg, n_instances=n_instances, rng_key=(*rng_key, i))
            (loss * world).backward()
        totals += torch.stack([stats[k].float() for k in sums])
        teachers += teacher_sums(stats, batch["teacher"], batch["branch_mask"], n_teachers)
    params = [p for p in model.parameters() if p.requires_grad]
    # With --max-grad-norm 0 the norm is only measured: the scale inf / norm is clamped to 1.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
    # the norm is already global: not summed
    summed = all_sum(torch.cat([totals, teachers.flatten(), torch.tensor([float(stop)], device=device)]))
    summed = torch.cat([summed, grad_norm.float().view(1)]).cpu()  # the step's one host sync
    out = dict(zip(sums, summed[:len(sums)].tolist()), teachers=summed[len(sums):-2].view_as(teachers),
               grad_norm=summed[-1].item(), stop=summed[-2].item() > 0)
    out["finite"] = math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])
    if out["finite"]:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def build_model(cfg, device, resume_dir=None):
    """Build → load → apply_lora (freezes the base) → device. The caller wraps it in DDP."""
    # A frozen base can sit in bf16; trained weights stay fp32 (bf16 autocast does the matmuls).
    dtype = torch.bfloat16 if device.type == "cuda" and not cfg.full_ft else torch.float32
    source = resume_dir if (cfg.full_ft and resume_dir) else cfg.model
    model = Transformer.from_pretrained(source, dtype=dtype, device=device)
    # its settings and weights, this run's dropout:
    if not cfg.full_ft and (resume_dir or cfg.init_adapter):
        # step 0 is the adapter's model
        load_adapter(model, resume_dir or cfg.init_adapter, cfg.lora_dropout)
    elif not cfg.full_ft:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model = model.to(device)
    return compile_blocks(model) if cfg.compile else model


# --- the run, in phases: data, resume, model, loop, finish ---

def step_record(step, s, dt, t_start, lr, teachers, steps_per_epoch, n_step):
    """One metrics.jsonl line from train_step's stats."""
    return {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": s["loss"],
            "sft": s["sft"], "mcon": s["mcon"], "lr": lr, "grad_norm": s["grad_norm"],
            "tokens_per_s": s["tokens"] / dt, "instances": n_step, "weight_entropy": s["weight_entropy"],
            "time": round(time.time() - t_start, 3), "teachers": teacher_means(s["teachers"], teachers)}


def train(cfg: TrainConfig, ccfg: CompactConfig, rank=0, world=1, device=torch.device("cpu")):
    """Run one training job in an already set-up process group; rank 0 writes every file, holding
    OUT's lock from the first write (hold_lock). SIGTERM or SIGINT (stop_on_signals) ends it after
    the step under way, with a checkpoint, in SystemExit(128 + the signal)."""
    t_start, cuda = time.time(), device.type == "cuda"
    _, encoded, data_stats = load_data(cfg.model, cfg.data, cfg.max_len, cfg.teachers, cfg.thinking_words,
                                         cfg.skip_bad, rank=rank)
    teachers = data_stats["teachers"]
    per_rank_step = cfg.batch_size * cfg.grad_accum
    n_step = per_rank_step * world  # instances per optimizer step, all ranks together
    steps_per_epoch = -(-len(encoded) // n_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    run = run_settings(cfg, ccfg, data_stats, total, world)
    start, resume_dir, state = find_resume(cfg, run, device)

    torch.manual_seed(cfg.seed)  # LoRA's A init: the same on every rank and every run of this seed
    raw = model = build_model(cfg, device, resume_dir)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if cuda else None)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    if state:
        optimizer.load_state_dict(state["optimizer"])
    print0(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, "
           f"{sum(p.numel() for p in params) / 1e6:.2f}M trained | {total} steps of {n_step} instances "
           f"({steps_per_epoch}/epoch) on {world} × {device.type}")
    with hold_lock(cfg.out, rank, device):  # one run per --out, from its first write to its last
        metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        config_path = os.path.join(cfg.out, "config.json")
        if rank == 0:
            # a resume keeps the first start's (same updates)
            if not (start and os.path.isfile(config_path)):
                stats = {k: v for k, v in data_stats.items() if k != "teachers"}
                write_json(config_path, {"train": asdict(cfg), "compact": asdict(ccfg), "teachers": teachers,
                                         "world_size": world, "data_stats": stats})
            kept = read_jsonl(metrics_path, torn_tail=True) if start and os.path.isfile(metrics_path) else []
            write_jsonl(metrics_path, [r for _, r in kept if r["step"] <= start])

        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        model.train()
        bad, t_loop, tokens_seen, last = 0, time.time(), 0, None
        for step in range(start, total):
            epoch, pos = divmod(step, steps_per_epoch)
            if pos == 0 or step == start:  # this rank's share of the epoch's seeded permutation
                order = shard_indices(len(encoded), epoch, cfg.seed, rank, world, per_rank_step)
            mine = order[pos * per_rank_step:(pos + 1) * per_rank_step]
            micro = [collate([encoded[j] for j in mine[m:m + cfg.batch_size]])
                     for m in range(0, per_rank_step, cfg.batch_size)]
            # dropout: a function of (seed, step, rank)
            torch.manual_seed(derive_seed(cfg.seed, step, rank))
            t0, lr = time.time(), lr_at(step, total, cfg)
            # S_MI's sample, like dropout, is a function of (step, rank); a signal to any rank
            # reaches all ranks in the step's own all-reduce.
            s = train_step(model, optimizer, micro, lr, n_step, len(teachers), cfg, ccfg, device, autocast,
                           rng_key=(cfg.seed, step, rank), stop="signal" in STOP)
            bad = 0 if s["finite"] else bad + 1
            if bad:
                print0(f"warning: step {step + 1}: non-finite loss or gradient, update skipped "
                       f"({bad} in a row)", file=sys.stderr)
            else:
                tokens_seen += s["tokens"]
                last = step_record(step, s, time.time() - t0, t_start, lr, teachers, steps_per_epoch, n_step)
            if rank == 0 and not bad:
                append_jsonl(metrics_path, [last])
                elapsed = time.time() - t_loop
                eta = duration(elapsed / (step + 1 - start) * (total - step - 1))
                w = " ".join(f"{n} {v['weight']:.2f}" for n, v in last["teachers"].items())
                print0(f"step {step + 1}/{total} | loss {s['loss']:.4f} | w {w} | "
                       f"{tokens_seen / elapsed:,.0f} tok/s | eta {eta} | mem {_memory_mb(device):,.0f}MB")
            # at the last step, finish() writes everything anyway
            stop = s["stop"] and step + 1 < total
            periodic = cfg.save_every and (step + 1) % cfg.save_every == 0
            give_up = bad >= max(1, cfg.max_bad_steps)
            if rank == 0 and (stop or give_up or periodic and step + 1 < total):
                save_checkpoint(raw, optimizer, step + 1, cfg, run)  # the last step's is finish()'s
            if stop or periodic:
                barrier()  # nobody races ahead of a checkpoint it might be killed after
            if give_up:
                raise FloatingPointError(f"{bad} non-finite steps in a row; stopped with a checkpoint at "
                                         f"step {step + 1}")
            if stop:  # a rank told by another stops as if by SIGTERM
                signum = STOP.get("signal", signal.SIGTERM)
                print0(f"{signal.Signals(signum).name}: stopped after step {step + 1}/{total} with a "
                       f"checkpoint; --resume continues it", file=sys.stderr)
                raise SystemExit(128 + signum)

        if rank == 0:
            finish(raw, optimizer, cfg, run, start, last, t_start)
        barrier()
    return {"steps": total, "last": last, "teachers": teachers, "model": raw}


def finish(raw, optimizer, cfg, run, start, last, t_start):
    """The final weights first, then the final checkpoint: a kill in between resumes from the last
    periodic checkpoint and writes both again."""
    total = run["total_steps"]
    if total <= start:
        print0(f"{cfg.out}: the run already finished at step {total}; nothing to do")
        return
    final = os.path.join(cfg.out, "model" if cfg.full_ft else "adapter")
    with atomic_path(final) as tmp:
        save_weights(raw, tmp, cfg)
    save_checkpoint(raw, optimizer, total, cfg, run)
    print0(f"done: {total} steps in {duration(time.time() - t_start)} | final loss "
           f"{last['loss'] if last else float('nan'):.4f} | wrote {final}")


def mot(cfg, ccfg, rank=0, world=1, device=torch.device("cpu")):
    """The MoT baseline as published (Merge-of-Thought,
    arXiv 2509.08814); returns the student's directory.

    Round r starts from the model directory M_r (M_1 = --model). For each teacher k a fresh LoRA on
    M_r is trained on teacher k's rationales alone (--teachers k: plain SFT), giving ΔW_{r,k}; then
    M_{r+1} = M_r + mean_k ΔW_{r,k}: lora.py's exact average (rank K·r) merged into M_r, in fp32.
    Merging each round keeps the rank at r: continuing the rank-K·r average would train K·r ranks
    per teacher and the next average would have rank K²·r. R = 1 is one-shot averaging
    (OUT/round-1/average). Outputs: OUT/round-r/TEACHER/ (runs), OUT/round-r/average/,
    OUT/round-r/model/ (M_{r+1}; the student is OUT/round-R/model). A rerun skips finished rounds
    and resumes started runs; every other flag applies to each per-teacher run.
    """
    teachers = flag_names(cfg.teachers) or teacher_names(load_multi_teacher(cfg.data, skip_bad=cfg.skip_bad))
    if bad := [t for t in teachers if os.sep in t or t.startswith(".")]:
        raise DataError(f"teacher name {bad[0]!r} cannot name a run directory")
    # one branch per instance: plain SFT
    single = replace(ccfg, weighting="uniform", mcon_lambda=0.0)
    model = cfg.model
    with hold_lock(cfg.out, rank, device):  # the rounds' averages and merges too
        for r in range(1, cfg.mot_rounds + 1):
            root = os.path.join(cfg.out, f"round-{r}")
            merged = os.path.join(root, "model")
            if not os.path.isfile(os.path.join(merged, "config.json")):  # written last, atomically
                for k in teachers:
                    out = os.path.join(root, k)
                    print0(f"MoT round {r}/{cfg.mot_rounds}: teacher {k} from {model}")
                    train(replace(cfg, model=model, out=out, teachers=k, resume=bool(checkpoint_steps(out)),
                                  mot_rounds=0), single, rank, world, device)
                if rank == 0:
                    average_adapters([os.path.join(root, k, "adapter") for k in teachers],
                                     os.path.join(root, "average"))
                    merge_to_dir(model, os.path.join(root, "average"), merged, dtype="float32")
                barrier()
            model = merged
    print0(f"MoT: {cfg.mot_rounds} round(s) over {', '.join(teachers)} | the student is {model}")
    return model


def _memory_mb(device):
    import resource
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- command line ---

def parse_args(argv=None):
    """TrainConfig and CompactConfig from the command line; one flag per dataclass field."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(p, TrainConfig)
    add_config_args(p, CompactConfig)
    for name, key in (("mi", "alpha"), ("consensus", "beta"), ("difficulty", "gamma")):
        p.add_argument(f"--no-{name}", action="store_const", const=0.0, dest=key, default=argparse.SUPPRESS,
                       help=f"ablation: {key} = 0")
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
