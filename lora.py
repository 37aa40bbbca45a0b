"""LoRA for the student: wrap, save and load PEFT adapters, merge, and MoT averaging.

apply_lora wraps the attention and MLP projections in place. The base keeps its Hugging Face
parameter names and LoRA adds PEFT's (`...q_proj.lora_A.weight`), so an adapter directory
written here is a PEFT directory, and one that PEFT writes loads here.

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

B starts at zero, so a fresh adapter is the identity. A and B stay fp32 under a bf16 base; the
sum is taken in fp32 and cast back once, as PEFT does. Under autocast x is not cast to fp32 (the
matmuls run in the autocast dtype anyway), and the scale multiplies the r-wide A·x.

Left out: LoRA on lm_head and the embeddings (tied in Qwen2.5-1.5B and SmolLM2, a merge would
change both), DoRA, per-module rank/alpha patterns, LoRA biases, modules_to_save, regex
target_modules. Adapter configs that use any of them raise.
"""
import argparse
import math
import os
import sys

import safetensors.torch
import torch
import torch.nn as nn

from common import atomic_path, read_json, user_errors, write_json
from model import Transformer
from tokenizer import copy_tokenizer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's saved key = PREFIX + our state-dict key
CONFIG = "adapter_config.json"  # an adapter directory holds these two files
WEIGHTS = "adapter_model.safetensors"
DTYPES = ("bfloat16", "float16", "float32")
# PEFT settings beyond plain LoRA: a true value of any of them raises.
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern",
               "alpha_pattern", "layers_to_transform")


def lora_scale(alpha, rank, use_rslora=False):
    """The factor on B·A: alpha / r, or alpha / √r with rsLoRA (PEFT's convention)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """y = x W^T + b + scale · B(A(dropout(x))), keeping the base `weight` / `bias` names.

    A and B are fp32 whatever the base dtype; cast the base before apply_lora (model.to(dtype)
    casts them too).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout=0.0, use_rslora=False):
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the base's own parameters
        self.bias = base.bias  # None when the base has none
        self.scale = lora_scale(alpha, rank, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scale)
        return (y + lora).to(y.dtype)


def is_lora_key(name):
    """A LoRA parameter's state-dict (or PEFT) key: `...q_proj.lora_A.weight`, `...lora_B...`."""
    return ".lora_A." in name or ".lora_B." in name


def lora_modules(model):
    """(name, LoRALinear) for every wrapped projection."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank=16, alpha=32, dropout=0.05, targets=TARGETS, use_rslora=False):
    """Wrap every nn.Linear whose name ends in one of `targets`, freeze all else; return the
    wrapped names."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA applied")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    known = {n.rpartition(".")[2] for n in linear} & set(TARGETS)
    targets = list(targets)
    if not targets or not set(targets) <= known:
        unknown = sorted(set(targets) - known) or targets
        supported = ", ".join(t for t in TARGETS if t in known)
        raise ValueError(f"unknown LoRA target modules {unknown} (supported: {supported})")
    model.requires_grad_(False)  # the base: only the lora_A / lora_B made below train
    names = [n for n in linear if n.rpartition(".")[2] in targets]
    for name in names:
        lora = LoRALinear(model.get_submodule(name), rank, alpha, dropout, use_rslora)
        # A new module starts in train mode: follow the model's, or eval() would run dropout.
        model.set_submodule(name, lora.train(model.training))
    model.lora_config = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=targets, use_rslora=use_rslora)
    return names


def merge_lora(model):
    """Fold scale · B A into each base weight (in fp32, cast once to the base dtype); unwrap."""
    with torch.no_grad():
        for name, m in lora_modules(model):
            delta = m.scale * m.lora_B.weight.float() @ m.lora_A.weight.float()  # (out, in)
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight = m.weight
            plain.bias = m.bias
            model.set_submodule(name, plain)
    model.__dict__.pop("lora_config", None)
    return model


# --- adapter directories (PEFT format) ---

def save_adapter(model, path, base_model=""):
    """Write adapter_config.json + adapter_model.safetensors into `path` with PEFT's key names.
    Callers that replace a directory whole wrap this in common.atomic_path (train.py does)."""
    if not lora_modules(model):
        raise ValueError("the model has no LoRA to save (call apply_lora first)")
    state = model.state_dict()
    tensors = {PREFIX + k: v.contiguous().cpu() for k, v in state.items() if is_lora_key(k)}
    settings = {**model.lora_config, "base_model_name_or_path": base_model}
    _write_adapter(path, settings, tensors)


def _write_adapter(path, settings, tensors):
    os.makedirs(path, exist_ok=True)
    weights_file = os.path.join(path, WEIGHTS)
    safetensors.torch.save_file(tensors, weights_file, metadata={"format": "pt"})
    write_json(os.path.join(path, CONFIG), {  # PEFT's fields, then the LoRA settings
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "use_dora": False, "inference_mode": True, **settings})


def read_adapter(path):
    """(config, tensors keyed by our state-dict names) of a PEFT LoRA directory, checked."""
    config_file = os.path.join(path, CONFIG)
    weights_file = os.path.join(path, WEIGHTS)
    lost = [f for f in (CONFIG, WEIGHTS) if not os.path.isfile(os.path.join(path, f))]
    if lost:
        raise FileNotFoundError(f"{path}: not an adapter directory ({lost[0]} is missing; "
                                "weights load only from safetensors)")
    cfg = read_json(config_file)
    for key, kinds, kind in (("r", (int,), "integer"), ("lora_alpha", (int, float), "number")):
        if type(cfg.get(key)) not in kinds or cfg[key] <= 0:
            raise ValueError(f"{config_file}: {key} must be a positive {kind}, "
                             f"got {cfg.get(key)!r}")
    bad = [f"{k}={cfg[k]!r}" for k in UNSUPPORTED if cfg.get(k)]
    bad += [f"{k}={cfg[k]!r}" for k, plain in (("peft_type", "LORA"), ("bias", "none"))
            if cfg.get(k, plain) != plain]
    if bad:
        raise ValueError(f"{config_file}: unsupported setting {', '.join(bad)} "
                         "(only plain LoRA: peft_type LORA, bias none)")
    targets = cfg.get("target_modules")  # PEFT saves a list
    if not isinstance(targets, list) or not targets or not set(targets) <= set(TARGETS):
        raise ValueError(f"{config_file}: unknown target_modules {targets!r} "
                         f"(supported: {', '.join(TARGETS)})")
    try:
        tensors = safetensors.torch.load_file(weights_file)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({e})") from None
    foreign = [k for k in tensors if not k.startswith(PREFIX)]
    if foreign:
        raise ValueError(f"{weights_file}: tensor {foreign[0]!r} lacks PEFT's {PREFIX!r} prefix")
    return cfg, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def fixed_settings(cfg):
    """The settings an adapter and the model's LoRA must share (dropout may differ)."""
    return {"r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "use_rslora": cfg.get("use_rslora", False),
            "target_modules": sorted(cfg["target_modules"])}


def load_adapter(model, path, dropout=None):
    """Load a PEFT LoRA directory into the model, wrapping it with the directory's settings
    first (its dropout unless `dropout` is given: a run that continues training the adapter)."""
    cfg, tensors = read_adapter(path)
    if not lora_modules(model):
        p = cfg.get("lora_dropout", 0.0) if dropout is None else dropout
        apply_lora(model, cfg["r"], cfg["lora_alpha"], p, cfg["target_modules"],
                   cfg.get("use_rslora", False))
    want = fixed_settings(cfg)
    have = fixed_settings(model.lora_config)
    if want != have:
        raise ValueError(f"{path}: adapter settings {want} differ from the model's LoRA {have}")
    expected = {k: v for k, v in model.state_dict().items() if is_lora_key(k)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: adapter does not fit this model: {len(missing)} tensors "
                         f"missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:2]})")
    for k in tensors:
        got = tuple(tensors[k].shape)
        want = tuple(expected[k].shape)
        if got != want:
            raise ValueError(f"{path}: {PREFIX}{k} has shape {got} but the model expects {want} "
                             "(an adapter for another base model?)")
    model.load_state_dict(tensors, strict=False)  # the LoRA tensors only, keys and shapes checked
    return model


def average_adapters(dirs, out_dir, weights=None):
    """MoT: the exact weighted mean of K adapters as one adapter of rank Σ r_k, replacing
    out_dir whole. scale_out · B_cat A_cat = Σ_k w_k scale_k B_k A_k with A_cat = [A_1; ..; A_K]
    and B_cat = [c_1 B_1, ..], c_k = w_k scale_k / scale_out. Decision: lora_alpha = r_out, no
    rsLoRA, so scale_out = 1: exact for any mix of ranks, alphas and rsLoRA, with an integer
    alpha. Weights are normalised to sum to 1."""
    weights = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    ok = bool(dirs) and len(weights) == len(dirs) and all(map(math.isfinite, weights))
    if not ok or sum(weights) <= 0:
        raise ValueError(f"weights {weights} must be {len(dirs)} finite numbers "
                         "with a positive sum")
    adapters = [read_adapter(d) for d in dirs]
    cfg0, t0 = adapters[0]
    for d, (cfg, t) in zip(dirs[1:], adapters[1:]):
        if set(t) != set(t0):
            raise ValueError(f"{d}: targets or layers differ from {dirs[0]} "
                             f"({sorted(cfg['target_modules'])} vs "
                             f"{sorted(cfg0['target_modules'])})")
        for k in t:
            base_dim = int(".lora_A." in k)  # A [r, in], B [out, r]: the base's dims must agree
            if t[k].shape[base_dim] != t0[k].shape[base_dim]:
                raise ValueError(f"{d}: {PREFIX}{k} has shape {tuple(t[k].shape)}, {dirs[0]} has "
                                 f"{tuple(t0[k].shape)}: adapters of different base models")
    scales = []  # c_k (scale_out = 1)
    for w, (c, _) in zip(weights, adapters):
        scales.append(w / sum(weights) * lora_scale(c["lora_alpha"], c["r"], c.get("use_rslora")))
    out = {}
    for k in t0:
        if ".lora_A." in k:  # A_cat (Σr, in)
            out[PREFIX + k] = torch.cat([t[k].float() for _, t in adapters])
        else:  # B_cat (out, Σr)
            blocks = [s * t[k].float() for s, (_, t) in zip(scales, adapters)]
            out[PREFIX + k] = torch.cat(blocks, dim=1)
    r_out = sum(c["r"] for c, _ in adapters)
    settings = {"r": r_out, "lora_alpha": r_out, "lora_dropout": cfg0.get("lora_dropout", 0.0),
                "target_modules": cfg0["target_modules"], "use_rslora": False,
                "base_model_name_or_path": cfg0.get("base_model_name_or_path", "")}
    with atomic_path(out_dir) as tmp:
        _write_adapter(tmp, settings, out)


def merge_to_dir(model_dir, adapter_dir, out, dtype=None):
    """Base + adapter -> a plain Hugging Face model directory, replacing `out` whole (no stale
    shard survives)."""
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32)  # fp32: 4 bytes a weight
    dtype = dtype or model.config.get("dtype") or model.config.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"{model_dir}/config.json: dtype {dtype!r} is not one of {DTYPES}; "
                         "pass --dtype")
    merge_lora(load_adapter(model, adapter_dir)).to(getattr(torch, dtype))
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(model_dir, tmp)


def parse_weights(text):
    """--weights 0.5,0.5 -> [0.5, 0.5]."""
    return [float(w) for w in text.split(",")]


def main(argv=None):
    p = argparse.ArgumentParser(prog="lora.py", description="Merge a LoRA adapter into its "
                                "base, or average adapters (MoT).")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="write base + adapter as a plain Hugging Face model directory")
    m.add_argument("--model", required=True, help="base model directory")
    m.add_argument("--adapter", required=True, help="PEFT adapter directory")
    m.add_argument("--dtype", choices=DTYPES, help="default: the base checkpoint's")
    a = sub.add_parser("average", help="exact weighted mean of adapters as one adapter of "
                       "summed rank")
    a.add_argument("adapters", nargs="+", help="PEFT adapter directories")
    a.add_argument("--weights", type=parse_weights, help="comma-separated numbers, one per "
                   "adapter, normalised to sum 1 (default: equal)")
    for sp, marker in ((m, "config.json"), (a, CONFIG)):
        sp.add_argument("--out", required=True,
                        help=f"output directory: new, empty, or one with {marker}")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace an --out of the same kind")
        sp.set_defaults(marker=marker)
    args = p.parse_args(argv)
    out = args.out
    with user_errors(f"lora.py {args.cmd}"):
        if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
            if not os.path.isfile(os.path.join(out, args.marker)):
                raise ValueError(f"--out {out} exists and is not an empty directory or one with "
                                 f"{args.marker}; refusing to touch it")
            if not args.overwrite:
                raise ValueError(f"--out {out} already holds {args.marker}; pass --overwrite to "
                                 "replace it")
        if args.cmd == "merge":
            merge_to_dir(args.model, args.adapter, out, args.dtype)
        else:
            average_adapters(args.adapters, out, args.weights)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
