"""Distil several teachers into one student with COMPACT: the DDP training loop.

    torchrun --nproc_per_node=2 train.py --model Qwen2.5-1.5B-Instruct --data multi.jsonl --out runs/x
    python train.py --demo                 # the whole method on a tiny model, on a CPU, in minutes

One process per device (nccl on CUDA, gloo on CPU, or a plain single process). Every rank
reads its own share of a seeded per-epoch permutation; every instance of an optimizer step
counts once, however the step is split over micro-batches and ranks. Rank 0 alone writes:
OUT/config.json, OUT/metrics.jsonl (one line per step), OUT/checkpoints/step-N/ (atomic),
OUT/adapter/ (the final PEFT adapter; OUT/model/ with --full-ft).

Left out: tensor/pipeline parallelism, FSDP, mixed-precision other than bf16 autocast.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

from compact import CompactConfig, compact_loss
from data import THINKING_WORDS, DataError, Tokenizer, collate, encode_dataset, load_multi_teacher, shard_indices
from lora import apply_lora, copy_tokenizer, load_adapter, save_adapter
from model import ModelArgs, Transformer, compile_blocks


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
    grad_checkpointing: bool = False  # recompute each layer in backward (less memory)
    compile: bool = False  # torch.compile each decoder block (the first step pays the compile; a CPU needs a C compiler)
    seed: int = 0
    save_every: int = 200  # checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # how many recent checkpoints to keep
    resume: bool = False  # continue from the last complete checkpoint in OUT/checkpoints
    max_bad_steps: int = 3  # stop (with a checkpoint) after this many non-finite steps in a row
    skip_bad: bool = False  # drop malformed data lines (counted) instead of stopping with the first problems
    thinking_words: str = ""  # comma-separated thinking words for S_MI's mask ("" = data.THINKING_WORDS)
    demo: bool = False  # run the embedded CPU demo (synthetic teachers, tiny student)

    def __post_init__(self):
        for flag in ("batch_size", "grad_accum", "epochs", "lora_rank", "keep_checkpoints", "max_len"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
        for flag in ("max_steps", "save_every", "max_bad_steps", "warmup", "lr", "max_grad_norm"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
        if os.path.isfile(self.out):
            raise ValueError(f"--out {self.out} is a file, not a directory")
        if not self.demo and not (self.model and self.data):
            raise ValueError("--model and --data are required (or --demo)")


# --- distributed plumbing ---

def setup_dist(device_type=None):
    """(rank, world_size, device) from torchrun's environment; a plain process is rank 0 of 1.

    device_type: "cuda" or "cpu" (default: cuda when there is one)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_type)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_dist():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# --- schedule, checkpoints ---

def lr_at(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to 0 (a function of the step alone)."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save_checkpoint(raw, optimizer, step, cfg, meta):
    """OUT/checkpoints/step-N/: weights + optimizer + data position, written then renamed.

    A kill at any moment leaves either the old or the new directory complete; trainer.pt is
    written last and marks a checkpoint as complete. The learning rate and the RNG are
    functions of the step (see train_step), so they need no saved state.
    """
    root = os.path.join(cfg.out, "checkpoints")
    final, tmp = os.path.join(root, f"step-{step}"), os.path.join(root, f".step-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(raw, tmp, cfg)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **meta}, os.path.join(tmp, "trainer.pt"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(checkpoint_steps(cfg.out))
    for old in done[:-cfg.keep_checkpoints]:
        shutil.rmtree(os.path.join(root, f"step-{old}"), ignore_errors=True)


def save_weights(raw, path, cfg):
    """The trained weights: a PEFT adapter, or with --full-ft a complete model directory."""
    if cfg.full_ft:
        raw.save_pretrained(path)
        copy_tokenizer(cfg.model, path)
    else:
        save_adapter(raw, path, base_model=cfg.model)


def checkpoint_steps(out):
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    return [int(d[5:]) for d in os.listdir(root)
            if d.startswith("step-") and d[5:].isdigit() and os.path.isfile(os.path.join(root, d, "trainer.pt"))]


def truncate_metrics(path, step):
    """Drop metric lines written after the checkpoint we resume from (rewritten atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and _complete(line) and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def _complete(line):
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:  # torn by a kill
        return False


# --- the step ---

STAT_KEYS = ("weight", "s_mi", "s_g", "s_d")


def train_step(model, optimizer, micro_batches, lr, n_instances, n_teachers, cfg, ccfg, device, autocast):
    """One optimizer step over this rank's micro-batches; returns the step's summed stats.

    Each micro-batch loss is Σ w L / n_instances (all instances of the step, all ranks),
    times world_size because DDP averages gradients over ranks: so the update is the same
    however the step is split. Only the last micro-step all-reduces gradients.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for group in optimizer.param_groups:
        group["lr"] = lr
    totals = torch.zeros(4, device=device)  # loss, sft, mcon, supervised tokens
    per_teacher = torch.zeros(n_teachers, len(STAT_KEYS) + 1, device=device)  # sums, then count
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync = not ddp or i == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
            loss, stats = compact_loss(model, batch, ccfg, n_instances=n_instances)
            (loss * world).backward()
        totals += torch.stack([stats["loss"], stats["sft"], stats["mcon"], stats["tokens"].float()])
        real = batch["branch_mask"]
        t = batch["teacher"][real]
        for j, key in enumerate(STAT_KEYS):
            per_teacher[:, j].index_add_(0, t, stats[key][real].float())
        per_teacher[:, -1].index_add_(0, t, torch.ones_like(t, dtype=torch.float))
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    summary = all_sum(torch.cat([totals, per_teacher.flatten()])).tolist()  # the step's one host sync
    finite = math.isfinite(summary[0]) and math.isfinite(float(grad_norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, float(grad_norm), summary


def build_model(cfg, device, resume_dir=None):
    """Build → load → apply_lora (freezes the base) → device. The caller wraps it in DDP."""
    cuda = device.type == "cuda"
    # A frozen base can sit in bf16; trained weights stay fp32 (bf16 autocast does the matmuls).
    dtype = torch.bfloat16 if cuda and not cfg.full_ft else torch.float32
    source = resume_dir if (cfg.full_ft and resume_dir) else cfg.model
    model = Transformer.from_pretrained(source, dtype=dtype, device=device)
    if not cfg.full_ft:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        if resume_dir:
            load_adapter(model, resume_dir)
    model.gradient_checkpointing = cfg.grad_checkpointing
    model = model.to(device)
    return compile_blocks(model) if cfg.compile else model


def train(cfg: TrainConfig, ccfg: CompactConfig, rank=0, world=1, device=torch.device("cpu")):
    """Run one training job in an already set-up process group; rank 0 writes every file."""
    t_start = time.time()
    tok = Tokenizer.from_pretrained(cfg.model)
    instances = load_multi_teacher(cfg.data, skip_bad=cfg.skip_bad)
    subset = [t.strip() for t in cfg.teachers.split(",") if t.strip()] or None
    words = [w.strip() for w in cfg.thinking_words.split(",") if w.strip()] or THINKING_WORDS
    encoded, data_stats = encode_dataset(instances, tok, teachers=subset, max_len=cfg.max_len, thinking_words=words)
    teachers = data_stats["teachers"]
    if not encoded:
        raise DataError(f"{cfg.data}: no instance has a branch that fits --max-len {cfg.max_len}")
    print0(f"data: {len(encoded)} instances, {data_stats.get('branches', 0)} branches, teachers {', '.join(teachers)}"
           f" | dropped {data_stats.get('dropped_branches', 0)} branches and"
           f" {data_stats.get('dropped_instances', 0)} instances longer than --max-len {cfg.max_len}")

    per_rank_step = cfg.batch_size * cfg.grad_accum
    n_step = per_rank_step * world  # instances per optimizer step, all ranks together
    steps_per_epoch = -(-len(encoded) // n_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    meta = {"n_step": n_step, "n_data": len(encoded), "teachers": teachers, "total_steps": total}

    start, resume_dir = 0, None
    done = checkpoint_steps(cfg.out) if cfg.resume else []
    if done:
        start = max(done)
        resume_dir = os.path.join(cfg.out, "checkpoints", f"step-{start}")
        state = torch.load(os.path.join(resume_dir, "trainer.pt"), map_location=device, weights_only=True)
        for key in ("n_step", "n_data", "teachers", "total_steps"):
            if state[key] != meta[key]:
                raise ValueError(f"{resume_dir}: {key} was {state[key]}, now {meta[key]}: resume with the same data, "
                                 "teachers, batch layout (--batch-size × --grad-accum × ranks) and --max-steps/"
                                 "--epochs (the learning-rate schedule depends on them)")
    elif cfg.resume:
        print0(f"--resume: no checkpoint in {cfg.out}/checkpoints, starting fresh")
    elif checkpoint_steps(cfg.out):
        raise ValueError(f"--out {cfg.out} holds the checkpoints of another run: pass --resume to continue it, "
                         "or choose another --out")

    torch.manual_seed(cfg.seed)  # LoRA's A init: the same on every rank and every run of this seed
    model = build_model(cfg, device, resume_dir)
    raw = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    if resume_dir:
        optimizer.load_state_dict(state["optimizer"])
        print0(f"resumed from {resume_dir}")
    n_params = sum(p.numel() for p in params)
    print0(f"model: {sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {n_params / 1e6:.2f}M trained"
           f" | {total} steps of {n_step} instances ({steps_per_epoch}/epoch) on {world} × {device.type}")

    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({"train": asdict(cfg), "compact": asdict(ccfg), "teachers": teachers, "world_size": world,
                       "data_stats": {k: v for k, v in data_stats.items() if k != "teachers"}}, f, indent=2)
        if start:
            truncate_metrics(metrics_path, start)
        else:
            open(metrics_path, "w").close()

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    model.train()
    bad, t_loop, tokens_seen, last, order_epoch = 0, time.time(), 0, None, None
    for step in range(start, total):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # this rank's share of the epoch's seeded permutation
            order, order_epoch = shard_indices(len(encoded), epoch, cfg.seed, rank, world, per_rank_step), epoch
        mine = order[pos * per_rank_step:(pos + 1) * per_rank_step]
        micro = [collate([encoded[j] for j in mine[m * cfg.batch_size:(m + 1) * cfg.batch_size]], tok.pad_id)
                 for m in range(cfg.grad_accum)]
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)  # dropout: a function of (step, rank)
        t0 = time.time()
        finite, gnorm, s = train_step(model, optimizer, micro, lr_at(step, total, cfg), n_step, len(teachers),
                                      cfg, ccfg, device, autocast)
        dt = time.time() - t0
        if not finite:
            bad += 1
            print0(f"warning: step {step + 1}: non-finite loss or gradient, update skipped ({bad} in a row)", file=sys.stderr)
            if bad >= cfg.max_bad_steps:
                if rank == 0:
                    save_checkpoint(raw, optimizer, step + 1, cfg, meta)
                raise FloatingPointError(f"{bad} non-finite steps in a row; stopped with a checkpoint at step {step + 1}")
            continue
        bad = 0
        tokens_seen += s[3]
        per_teacher = torch.tensor(s[4:]).view(len(teachers), -1)
        record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": s[0], "sft": s[1],
                  "mcon": s[2], "lr": lr_at(step, total, cfg), "grad_norm": gnorm, "tokens_per_s": s[3] / dt,
                  "instances": n_step, "time": round(time.time() - t_start, 3), "teachers": {
                      name: {**{k: row[j].item() / row[-1].item() for j, k in enumerate(STAT_KEYS)}, "n": int(row[-1])}
                      for name, row in zip(teachers, per_teacher) if row[-1] > 0}}
        last = record
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            elapsed = time.time() - t_loop
            eta = elapsed / (step + 1 - start) * (total - step - 1)
            w = " ".join(f"{n} {v['weight']:.2f}" for n, v in record["teachers"].items())
            print0(f"step {step + 1}/{total} | loss {s[0]:.4f} | w {w} | {tokens_seen / elapsed:,.0f} tok/s"
                   f" | eta {_duration(eta)} | mem {_memory_mb(device):,.0f}MB")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total and rank == 0:
            save_checkpoint(raw, optimizer, step + 1, cfg, meta)
        if dist.is_initialized() and cfg.save_every and (step + 1) % cfg.save_every == 0:
            dist.barrier()  # nobody races ahead of a checkpoint it might be killed after

    if rank == 0 and total > start:
        # The final weights first, then the final checkpoint: a kill in between resumes from the last
        # periodic checkpoint and writes both again.
        final = os.path.join(cfg.out, "model" if cfg.full_ft else "adapter")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(raw, tmp, cfg)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_checkpoint(raw, optimizer, total, cfg, meta)
        print0(f"done: {total} steps in {_duration(time.time() - t_start)} | final loss "
               f"{last['loss'] if last else float('nan'):.4f} | wrote {final}")
    elif rank == 0:
        print0(f"{cfg.out}: the run already finished at step {total}; nothing to do")
    if dist.is_initialized():
        dist.barrier()
    return {"steps": total, "last": last, "teachers": teachers, "model": raw}


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the CPU demo: the embedded default of `python train.py` ---

DEMO_STUDENT = {"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
                "use_sliding_window": False, "torch_dtype": "float32", "architectures": ["Qwen2ForCausalLM"]}
# Flags left at their TrainConfig default take these values in the demo.
DEMO_DEFAULTS = dict(out="runs/demo", max_steps=60, batch_size=4, grad_accum=1, lr=2e-3, max_len=320,
                     save_every=20, lora_dropout=0.0)
DEMO_PRETRAIN = dict(batch_size=8, lr=3e-3, full_ft=True)  # for min(150, 2.5 × distillation) steps


def demo(cfg, ccfg, rank, world, device):
    """Synthetic teachers → a tiny base student → COMPACT and uniform distillation → accuracy.

    The base student is trained briefly, with the very same loop, on the answer format alone
    (one terse "teacher"), so that held-out accuracy measures what the rationales teach.
    """
    from dataclasses import replace

    from data import SYNTH_TEACHERS, synth_pool, write_tokenizer
    cfg = replace(cfg, **{k: v for k, v in DEMO_DEFAULTS.items() if getattr(cfg, k) == getattr(TrainConfig, k)})
    out = cfg.out
    data_dir, init_dir, base_dir = (os.path.join(out, d) for d in ("data", "base-init", "base"))
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(init_dir):
        raise ValueError(f"--out {out} is not empty and holds no earlier demo: choose another --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 writes
    if rank == 0:  # a new demo replaces an earlier one's runs
        for run in ("pretrain", "uniform", "."):
            shutil.rmtree(os.path.join(out, run, "checkpoints"), ignore_errors=True)
        train_rows, test_rows = synth_pool(data_dir, seed=cfg.seed)
        texts = [r["question"] + " " + r["answer"] for r in train_rows + test_rows]
        texts += [x["text"] for r in train_rows for x in r["rationales"]]
        write_tokenizer(init_dir, texts, vocab_size=512)
        vocab = Tokenizer.from_pretrained(init_dir).vocab_size
        torch.manual_seed(cfg.seed)
        Transformer(ModelArgs.from_hf_config({**DEMO_STUDENT, "vocab_size": vocab}), {**DEMO_STUDENT, "vocab_size": vocab}).save_pretrained(init_dir)
        with open(os.path.join(data_dir, "format.jsonl"), "w") as f:
            for r in train_rows:
                f.write(json.dumps({**r, "rationales": [{"teacher": "format", "text": "Let me compute."}]}) + "\n")
    if dist.is_initialized():
        dist.barrier()

    print0("== 1/4 base student: learns the answer format only")
    pre = replace(cfg, model=init_dir, data=os.path.join(data_dir, "format.jsonl"), out=os.path.join(out, "pretrain"),
                  resume=False, max_steps=min(150, max(1, round(2.5 * cfg.max_steps))), **DEMO_PRETRAIN)
    train(pre, CompactConfig(weighting="uniform", mcon_lambda=0.0), rank, world, device)
    if rank == 0:
        shutil.rmtree(base_dir, ignore_errors=True)
        shutil.copytree(os.path.join(pre.out, "model"), base_dir)  # with the tokenizer (save_weights)
    if dist.is_initialized():
        dist.barrier()
    runs = {"compact": replace(cfg, model=base_dir, data=os.path.join(data_dir, "train.jsonl")),
            "uniform": replace(cfg, model=base_dir, data=os.path.join(data_dir, "train.jsonl"), out=os.path.join(out, "uniform"))}
    print0(f"== 2/4 COMPACT distillation from {', '.join(SYNTH_TEACHERS)}")
    train(runs["compact"], ccfg, rank, world, device)
    print0("== 3/4 the same with uniform weights (Direct Avg. + MCon)")
    train(runs["uniform"], replace(ccfg, weighting="uniform"), rank, world, device)
    if rank == 0:
        print0("== 4/4 held-out accuracy")
        demo_report(out, base_dir, os.path.join(data_dir, "test.jsonl"), runs, device)


def demo_report(out, base_dir, test_file, runs, device):
    """Held-out accuracy of base / uniform / COMPACT (eval.py's own loop), and COMPACT's teacher weights."""
    from data import user_prompt
    from eval import accuracy_sem, evaluate, load_student, run_weights
    rows = [json.loads(line) for line in open(test_file)]
    items = [{"id": r["id"], "prompt": user_prompt(r["question"], r["task"]), "answer": r["answer"], "task": r["task"]}
             for r in rows]
    print0(f"{'student':<10} {'accuracy':>9} {'± SEM':>7}   first test answer (n = {len(items)}, greedy)")
    for name in ("base", "uniform", "compact"):
        model, tok = load_student(base_dir, None if name == "base" else os.path.join(runs[name].out, "adapter"),
                                  device=device)
        preds = os.path.join(out, "eval", f"{name}.jsonl")
        os.makedirs(os.path.dirname(preds), exist_ok=True)
        if os.path.exists(preds):
            os.remove(preds)  # a new demo run: new predictions
        records = evaluate(model, tok, items, preds, batch_size=64, max_new_tokens=96)
        n, p, sem = accuracy_sem([r["correct"] for r in records])
        print0(f"{name:<10} {p:>9.3f} {sem:>7.3f}   {records[0]['output'][:90]!r}")
    print0("COMPACT's teacher weights over training (eval.py weights):")
    run_weights(argparse.Namespace(run_dir=out, out=None))


# --- command line ---

def parse_args(argv=None):
    """TrainConfig and CompactConfig from the command line; one flag per dataclass field."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in (TrainConfig, CompactConfig):
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                p.add_argument(flag, action="store_true")
            else:
                p.add_argument(flag, type=f.type, default=f.default)
    p.add_argument("--no-mi", action="store_true", help="ablation: alpha = 0")
    p.add_argument("--no-consensus", action="store_true", help="ablation: beta = 0")
    p.add_argument("--no-difficulty", action="store_true", help="ablation: gamma = 0")
    a = vars(p.parse_args(argv))
    for flag, key in (("no_mi", "alpha"), ("no_consensus", "beta"), ("no_difficulty", "gamma")):
        if a.pop(flag):
            a[key] = 0.0
    names = {f.name for f in fields(TrainConfig)}
    try:
        return (TrainConfig(**{k: v for k, v in a.items() if k in names}),
                CompactConfig(**{k: v for k, v in a.items() if k not in names}))
    except ValueError as e:
        p.error(str(e))


def main(argv=None):
    cfg, ccfg = parse_args(argv)
    rank, world, device = setup_dist()
    try:
        (demo if cfg.demo else train)(cfg, ccfg, rank, world, device)
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        cleanup_dist()


if __name__ == "__main__":
    main()
