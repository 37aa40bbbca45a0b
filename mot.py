"""The MoT baseline as published (Merge-of-Thought, arXiv 2509.08814): rounds of per-teacher SFT from the
current merged student, each round closed by a weight-space merge of the per-teacher students.

    torchrun --nproc_per_node=2 mot.py --rounds 3 --model Qwen/Qwen2.5-1.5B-Instruct --data multi.jsonl \
        --out runs/mot --epochs 2 [any train.py flag]

Round r starts from the model directory M_r (M_1 = --model). For each teacher k, a fresh LoRA on M_r is
trained on teacher k's rationales alone (train.py --teachers k: one branch per instance, plain SFT), giving
ΔW_{r,k}; then M_{r+1} = M_r + mean_k ΔW_{r,k}: lora.py's exact average (rank K·r) merged into M_r, in fp32.

Why merge each round rather than continue the averaged adapter: MoT's next round fine-tunes the merged
model, and a fresh LoRA on the merged weights starts exactly there (B = 0) at the run's own rank r.
Continuing the rank-K·r average (train.py --init-adapter) would instead train K·r ranks per teacher, and
the next average would have rank K²·r, growing every round. The merge is exact up to fp32 rounding (M_{r+1}
is kept in fp32 whatever --model's dtype). R = 1 is one-shot averaging: OUT/round-1/average is exactly
`lora.py average` of the per-teacher SbS adapters on --model.

Outputs: OUT/round-r/TEACHER/ (train.py runs), OUT/round-r/average/ (the averaged adapter, on M_r),
OUT/round-r/model/ (M_{r+1}). The student is OUT/round-R/model (eval.py accuracy --model it). A rerun
continues: finished rounds are skipped, a started run resumes from its checkpoint. Every train.py flag
applies to each per-teacher run (--epochs and --max-steps per run). Left out: full fine-tuning branches
(--full-ft), weighted merges.
"""
import argparse
import os
import sys
from dataclasses import replace

import torch

from data import DataError, load_multi_teacher, teacher_names
from lora import average_adapters, merge_to_dir
from train import checkpoint_steps, cleanup_dist, parse_args, print0, setup_dist, train


def mot(cfg, ccfg, rounds, rank=0, world=1, device=torch.device("cpu")):
    """Run `rounds` MoT rounds (see the module docstring); return the final model directory."""
    if rounds < 1 or cfg.full_ft or cfg.init_adapter:
        raise ValueError("mot.py needs --rounds >= 1 and LoRA runs (no --full-ft, no --init-adapter)")
    teachers = [t.strip() for t in cfg.teachers.split(",") if t.strip()] or \
        teacher_names(load_multi_teacher(cfg.data, skip_bad=cfg.skip_bad))
    if bad := [t for t in teachers if os.sep in t or t.startswith(".")]:
        raise DataError(f"teacher name {bad[0]!r} cannot name a run directory")
    single = replace(ccfg, weighting="uniform", mcon_lambda=0.0)  # one branch per instance: plain SFT
    model = cfg.model
    for r in range(1, rounds + 1):
        root = os.path.join(cfg.out, f"round-{r}")
        merged = os.path.join(root, "model")
        if not os.path.isfile(os.path.join(merged, "config.json")):  # written last, atomically
            for k in teachers:
                out = os.path.join(root, k)
                print0(f"MoT round {r}/{rounds}: teacher {k} from {model}")
                train(replace(cfg, model=model, out=out, teachers=k, resume=bool(checkpoint_steps(out))), single,
                      rank, world, device)
            if rank == 0:
                average_adapters([os.path.join(root, k, "adapter") for k in teachers], os.path.join(root, "average"))
                merge_to_dir(model, os.path.join(root, "average"), merged, dtype="float32")
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        model = merged
    print0(f"MoT: {rounds} round(s) over {', '.join(teachers)} | the student is {model}")
    return model


def main(argv=None):
    p = argparse.ArgumentParser(prog="mot.py", description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--rounds", type=int, required=True, help="MoT rounds (1 = one-shot averaging)")
    known, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg, ccfg = parse_args(rest)
    rank, world, device = setup_dist()
    try:
        mot(cfg, ccfg, known.rounds, rank, world, device)
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"mot.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_dist()


if __name__ == "__main__":
    main()
