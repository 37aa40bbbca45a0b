"""LoRA for the student: wrap, save and load PEFT adapters, merge, and MoT averaging.

apply_lora wraps the attention and MLP projections in place. The base keeps its Hugging
Face parameter names and LoRA adds PEFT's (`...q_proj.lora_A.weight`), so an adapter
directory written here is a PEFT directory, and one that PEFT writes loads here.

    apply_lora(model, rank=16, alpha=32)            # freezes the base, returns wrapped names
    save_adapter(model, "out/adapter", base_model="Qwen/Qwen2.5-1.5B-Instruct")
    load_adapter(model, "out/adapter")              # wraps first if needed
    python lora.py merge --model BASE --adapter out/adapter --out merged [--dtype bfloat16]
    python lora.py average --out mot teacherA/adapter teacherB/adapter [--weights 0.5,0.5]

The LoRA branch of one wrapped projection (x [.., in] -> y [.., out]):

        x ──────────── W [out,in] (+ bias), frozen, base dtype ────────────┐
        │                                                                  (+)──> y
        └─ to fp32 ─ dropout ─ A [r,in] ─ × scale ─ B [out,r] ─────────────┘
                               kaiming    alpha/r    zeros
                                          (rsLoRA: alpha/√r)

B starts at zero, so a fresh adapter is the identity. A and B stay fp32 under a bf16
base; the sum is taken in fp32 and cast back once, as PEFT does. Under autocast x is not
cast to fp32: the matmuls run in the autocast dtype whatever their inputs, so that copy
would be thrown away. The scale multiplies the r-wide A·x, not the out-wide result (a
[.., out] pass less, forward and backward: 14% of the LoRA projections' time on 2 CPU cores).

Left out: LoRA on lm_head and the embeddings (tied in Qwen2.5-1.5B and SmolLM2, a merge
would change both), DoRA, per-module rank/alpha patterns, LoRA biases, modules_to_save,
regex target_modules. Adapter configs that use any of them raise.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data import atomic_path, write_json
from model import Transformer
from tokenizer import Tokenizer, copy_tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's saved key = PREFIX + our state-dict key
DTYPES = ("bfloat16", "float16", "float32")


class LoRALinear(nn.Module):
    """y = x W^T + b + scale · B(A(dropout(x))), keeping the base `weight` / `bias` names.

    A and B are created fp32 whatever the base dtype; cast the base before apply_lora (model.to(dtype) casts them too).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.r = base.in_features, base.out_features, rank
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        dev = base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scale)
        return (y + delta).to(y.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}"


def lora_modules(model):
    """(name, LoRALinear) for every wrapped projection."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def apply_lora(model, rank=16, alpha=32, dropout=0.05, targets=TARGETS, use_rslora=False):
    """Wrap every nn.Linear whose name ends in one of `targets`, freeze all else; return the names."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA applied")
    targets = list(targets)
    known = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)} & set(TARGETS)
    if not targets or not set(targets) <= known:
        raise ValueError(f"unknown LoRA target modules {sorted(set(targets) - known) or targets} "
                         f"(supported: {', '.join(t for t in TARGETS if t in known)})")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    for name in names:
        # A new module starts in train mode; follow the model's, or an eval() model would run dropout.
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, use_rslora).train(model.training))
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in name or ".lora_B." in name
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
                         "use_rslora": use_rslora}
    return names


def merge_lora(model):
    """Fold scale · B A into each base weight (in fp32, cast once to the base dtype); unwrap."""
    with torch.no_grad():
        for name, m in lora_modules(model):
            delta = m.scale * (m.lora_B.weight.float() @ m.lora_A.weight.float())  # (out, in)
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            _replace(model, name, plain)
    model.__dict__.pop("lora_config", None)
    return model


# --- adapter directories (PEFT format) ---

def save_adapter(model, path, base_model=""):
    """Write adapter_config.json + adapter_model.safetensors with PEFT's key names."""
    if not lora_modules(model):
        raise ValueError("the model has no LoRA to save (call apply_lora first)")
    tensors = {PREFIX + k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    _write_adapter(path, {**model.lora_config, "base_model_name_or_path": base_model}, tensors)


def _write_adapter(path, settings, tensors):
    """adapter_config.json + adapter_model.safetensors, written beside `path` and renamed in whole."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
              "modules_to_save": None, "use_dora": False, "inference_mode": True, **settings}
    with atomic_path(path) as tmp:
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "adapter_config.json"), config)


def read_adapter(path):
    """(config, tensors keyed by our state-dict names) of a PEFT LoRA directory, checked."""
    config_file, weights_file = os.path.join(path, "adapter_config.json"), os.path.join(path, "adapter_model.safetensors")
    for file in (config_file, weights_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: not an adapter directory ({os.path.basename(file)} is missing; "
                                    "weights load only from safetensors)")
    try:
        with open(config_file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_file}: not a JSON object")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (key == "r" and value != int(value)):
            raise ValueError(f"{config_file}: {key} must be a positive {'integer' if key == 'r' else 'number'}, got {value!r}")
    bad = [f"{k}={cfg.get(k)!r}" for k in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern",
                                           "alpha_pattern", "layers_to_transform") if cfg.get(k)]
    bad += [f"{k}={cfg.get(k)!r}" for k, ok in (("peft_type", "LORA"), ("bias", "none")) if cfg.get(k, ok) != ok]
    if bad:
        raise ValueError(f"{config_file}: unsupported setting {', '.join(bad)} (only plain LoRA: peft_type LORA, bias none)")
    targets = cfg.get("target_modules")  # PEFT saves a list even for "all-linear"
    if not isinstance(targets, list) or not set(targets) <= set(TARGETS) or not targets:
        raise ValueError(f"{config_file}: unknown target_modules {targets!r} (supported: {', '.join(TARGETS)})")
    try:
        tensors = load_file(weights_file)
    except SafetensorError as e:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({e})") from None
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"{weights_file}: tensor {foreign[0]!r} lacks PEFT's {PREFIX!r} prefix")
    return cfg, {k[len(PREFIX):]: v for k, v in tensors.items()}


def load_adapter(model, path):
    """Load a PEFT LoRA directory into the model, wrapping it with the directory's settings first."""
    cfg, tensors = read_adapter(path)
    if not lora_modules(model):
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"],
                   cfg.get("use_rslora", False))
    want, have = ({"r": c["r"], "lora_alpha": c["lora_alpha"], "use_rslora": c.get("use_rslora", False),
                   "target_modules": sorted(c["target_modules"])} for c in (cfg, model.lora_config))
    if want != have:
        raise ValueError(f"{path}: adapter settings {want} differ from the model's LoRA {have}")
    expected = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: adapter does not fit this model: {len(missing)} tensors missing (e.g. {missing[:2]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:2]})")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: {PREFIX}{k} has shape {tuple(v.shape)} but the model expects "
                             f"{tuple(expected[k].shape)} (an adapter for another base model?)")
    with torch.no_grad():
        for k, v in tensors.items():
            expected[k].copy_(v)
    return model


def average_adapters(dirs, out_dir, weights=None):
    """MoT: write the exact weighted mean of K adapters as one adapter of rank Σ r_k.

    scale_out · B_cat A_cat = Σ_k w_k scale_k B_k A_k with A_cat = [A_1; ..; A_K] (rank dim) and
    B_cat = [c_1 B_1, .., c_K B_K], c_k = w_k scale_k / scale_out. Decision: the output has
    lora_alpha = r_out and no rsLoRA, so scale_out = 1 and c_k = w_k scale_k: exact for any mix of
    ranks, alphas and rsLoRA, with an integer alpha. Weights are normalised to sum to 1.
    """
    if len(dirs) < 1:
        raise ValueError("average needs at least one adapter directory")
    weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dirs) or not all(math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights {weights} must be {len(dirs)} finite numbers with a positive sum")
    weights = [w / sum(weights) for w in weights]
    adapters = [read_adapter(d) for d in dirs]
    cfg0, t0 = adapters[0]
    for d, (cfg, t) in zip(dirs[1:], adapters[1:]):
        if set(cfg["target_modules"]) != set(cfg0["target_modules"]) or set(t) != set(t0):
            raise ValueError(f"{d}: targets or layers differ from {dirs[0]} "
                             f"({sorted(cfg['target_modules'])} vs {sorted(cfg0['target_modules'])})")
        for k in t:  # A's input dim and B's output dim are the base's shape; the rank may differ
            dim = 1 if ".lora_A." in k else 0
            if t[k].shape[dim] != t0[k].shape[dim]:
                raise ValueError(f"{d}: {PREFIX}{k} has shape {tuple(t[k].shape)}, {dirs[0]} has "
                                 f"{tuple(t0[k].shape)}: adapters of different base models")
    scales = [c["lora_alpha"] / (math.sqrt(c["r"]) if c.get("use_rslora") else c["r"]) for c, _ in adapters]
    out = {PREFIX + k: torch.cat([t[k].float() for _, t in adapters], dim=0)  # A_cat (Σr, in)
           if ".lora_A." in k else
           torch.cat([w * s * t[k].float() for w, s, (_, t) in zip(weights, scales, adapters)], dim=1)  # B_cat (out, Σr)
           for k in t0}
    r_out = sum(c["r"] for c, _ in adapters)
    _write_adapter(out_dir, {"r": r_out, "lora_alpha": r_out, "lora_dropout": cfg0.get("lora_dropout", 0.0),
                             "target_modules": cfg0["target_modules"], "use_rslora": False,
                             "base_model_name_or_path": cfg0.get("base_model_name_or_path", "")}, out)


# --- loading a student ---

def load_student(model_dir, adapter=None, dtype="float32", device="cpu"):
    """Transformer (+ LoRA adapter) in eval mode, and the tokenizer of the model directory."""
    tok = Tokenizer.from_pretrained(model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    if model.args.vocab_size < tok.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tok.vocab_size} tokens, the model only {model.args.vocab_size}")
    if adapter:
        load_adapter(model, adapter)
    return model.eval(), tok


# --- CLI ---

def _check_out(out, marker, overwrite):
    """--out must be new or empty; with --overwrite, also a directory of the same kind (holding `marker`)."""
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, marker)):
        raise ValueError(f"--out {out} exists and is not an empty directory or one with {marker}; refusing to touch it")
    if not overwrite:
        raise ValueError(f"--out {out} already holds {marker}; pass --overwrite to replace it")


def merge_to_dir(model_dir, adapter_dir, out, dtype=None):
    """Base + adapter -> a plain Hugging Face model directory, written beside `out` then renamed in."""
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)  # fp32 whole: 4 bytes a parameter
    dtype = dtype or model.config.get("dtype") or model.config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"{model_dir}/config.json: dtype {dtype!r} is not one of {DTYPES}; pass --dtype")
    merge_lora(load_adapter(model, adapter_dir)).to(getattr(torch, dtype))
    with atomic_path(out) as tmp:  # swapped whole, so no stale shard of an old model survives
        model.save_pretrained(tmp)
        copy_tokenizer(model_dir, tmp)


def main(argv=None):
    p = argparse.ArgumentParser(prog="lora.py", description="Merge a LoRA adapter into its base, or average adapters (MoT).")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="write base + adapter as a plain Hugging Face model directory")
    m.add_argument("--model", required=True, help="base model directory")
    m.add_argument("--adapter", required=True, help="PEFT adapter directory")
    m.add_argument("--out", required=True, help="output model directory (new or empty)")
    m.add_argument("--dtype", choices=DTYPES, help="default: the base checkpoint's")
    a = sub.add_parser("average", help="exact weighted mean of adapters as one adapter of summed rank")
    a.add_argument("adapters", nargs="+", help="PEFT adapter directories")
    a.add_argument("--out", required=True, help="output adapter directory (new or empty)")
    a.add_argument("--weights", help="comma-separated, one per adapter, normalised to sum 1 (default: equal)")
    for sp in (m, a):
        sp.add_argument("--overwrite", action="store_true", help="replace an existing --out of the same kind")
    args = p.parse_args(argv)
    try:
        if args.cmd == "merge":
            _check_out(args.out, "config.json", args.overwrite)
            merge_to_dir(args.model, args.adapter, args.out, args.dtype)
        else:
            try:
                weights = [float(w) for w in args.weights.split(",")] if args.weights else None
            except ValueError:
                raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
            _check_out(args.out, "adapter_config.json", args.overwrite)
            average_adapters(args.adapters, args.out, weights)
    except (OSError, ValueError, KeyError) as e:
        p.exit(2, f"lora.py {args.cmd}: error: {e.args[0] if isinstance(e, KeyError) else e}\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
