"""The student: a Llama-3.x / Qwen2.x / SmolLM2 decoder in plain PyTorch.

Loads the Hugging Face checkpoints users download (config.json + safetensors, sharded or not)
with no key translation: module names are the Hugging Face ones. One forward serves four
callers: a packed row of branches (training: each instance's prompt once, no padding), a
continuation over a KV cache (generation), an explicit boolean mask with explicit position ids
(prefill), and packed probe blocks over a cache (the one-pass MI probe of SPEC.md §3.1).

    model = Transformer.from_pretrained("Qwen2.5-1.5B-Instruct", dtype=torch.bfloat16)
    new_ids = generate(model, [prompt_ids], max_new_tokens=256, eos_ids=[151645])

Left out: sliding-window attention, rope types other than default and llama3, MoE, tensor
parallelism, quantisation. Unsupported config values raise instead of being ignored.
"""
import math
import os
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import read_json, write_json

SUPPORTED = ("llama", "qwen2")  # model_type
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


@dataclass
class ModelArgs:
    vocab_size: int = 256
    hidden_size: int = 64  # C
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # H
    num_key_value_heads: int = 2  # G
    head_dim: int = 0  # D; 0 = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3 scaling parameters, or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: always True; Llama: attention_bias
    o_bias: bool = False  # Llama: attention_bias; Qwen2: never
    mlp_bias: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        # A wrong type (a hand-edited config.json) fails here, naming the key.
        for f in fields(self):
            if f.type not in (int, float):
                continue
            v = getattr(self, f.name)
            if type(v) not in (int, f.type) or v < 0:
                raise ValueError(f"{f.name}: expected a non-negative {f.type.__name__}, got {v!r}")
        heads = (self.num_attention_heads, self.num_key_value_heads)  # (H, G)
        if 0 in heads or heads[0] % heads[1]:
            raise ValueError("num_attention_heads must be a positive multiple of "
                             f"num_key_value_heads: {heads}")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a Hugging Face config.json dict (both the hub and the newer spelling)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"model_type {model_type!r} is not supported "
                             f"(only {', '.join(SUPPORTED)})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("use_sliding_window", False):
            raise ValueError("use_sliding_window: true is not supported "
                             "(no sliding-window attention here)")
        # Newer configs nest theta and scaling in rope_parameters; hub configs keep them top-level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported "
                             "(supported: default, llama3)")
        if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        lost = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
        if rope_type == "llama3" and lost:
            raise ValueError(f"llama3 rope scaling needs {', '.join(lost)}")
        qwen = model_type == "qwen2"
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bias,
            o_bias=not qwen and bias,
            mlp_bias=not qwen and bool(cfg.get("mlp_bias", False)),
            initializer_range=cfg.get("initializer_range", 0.02),
        )


# --- RoPE: pure functions, rotate-half layout (as Hugging Face checkpoints expect) ---

def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with Llama-3.1's piecewise scaling when configured."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if args.rope_scaling is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor, low, high, old_len = (args.rope_scaling[k] for k in LLAMA3_ROPE_KEYS)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor):
    """cos, sin [N, T, D] in fp32 for integer positions [N, T]."""
    freqs = position_ids[..., None].float() * inv_freq  # (N, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, h, T, D] by its positions: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos = cos[:, None].to(x.dtype)  # (N, 1, T, D)
    sin = sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


# --- KV cache ---

class KVCache:
    """One layer's keys/values, preallocated to max_len: [N, G, max_len, D] (gpt-fast style)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int = 0):
        self.k = k
        self.v = v
        self.len = length

    @classmethod
    def from_kv(cls, k: torch.Tensor, v: torch.Tensor, extra: int):
        """A cache already holding k, v [N, G, S, D], with room for `extra` more tokens."""
        N, G, S, D = k.shape
        room = k.new_zeros(N, G, extra, D)
        return cls(torch.cat([k, room], 2), torch.cat([v, room], 2), S)

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v [N, G, T, D]; return everything held so far [N, G, len, D]."""
        start = self.len
        self.len += k.size(2)
        self.k[:, :, start:self.len] = k
        self.v[:, :, start:self.len] = v
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


# --- packed rows: each prompt once, then its branches, no padding ---
#
#   Training packs a micro-batch into one row: per instance its prompt p, then every branch's
#   continuation (rationale, answer statement, eot). A branch sees its prompt and itself,
#   causally: one SDPA call per branch (a Segment) over p ⊕ the branch, causal. Each call
#   recomputes only the prompt's attention rows, and only the first branch's call keeps them.
#   p = 3 tokens, branches a, b:
#
#        keys   p p p a a b b b
#        p      x                  segment 0: q = kv = p ⊕ a, causal,
#        p      x x                           keeps its 5 rows (p and a)
#        p      x x x
#        a      x x x x
#        a      x x x x x
#        b      x x x . . x        segment 1: q = kv = p ⊕ b, causal,
#        b      x x x . . x x                 keeps its last 3 rows (b)
#        b      x x x . . x x x
#
#   Position ids restart with each prompt and run on through each branch (p 0-2, a 3-4,
#   b 3-5), so a branch computes exactly what it would alone. The probe (compact.py) passes
#   its own segments, with keys from the cache and an explicit mask.

class Segment(NamedTuple):
    """One attention call of a packed row. q, kv: query and key spans, (start, end) each (keys
    index the cache, then this call's tokens after it). mask: bool [queries, keys], or None for
    causal (queries = keys). The call keeps its last `keep` outputs; the kept rows of all
    segments tile the row in order."""
    q: tuple
    kv: tuple
    mask: torch.Tensor | None
    keep: int


def packed_segments(prompts, branches):
    """The training layout's segments: prompts [(start, end)] per instance, branches
    [[(start, end)]] per instance; a prompt's rows are kept by its first branch."""
    segments = []
    for p, spans in zip(prompts, branches):
        for k, b in enumerate(spans):
            keep = b[1] - b[0] + (p[1] - p[0] if k == 0 else 0)
            segments.append(Segment((p, b), (p, b), None, keep))
    return segments


def take_spans(x, spans):
    """x [1, h, S, D] at the spans' positions along S, in order (a view for a single span)."""
    if len(spans) == 1:
        return x[:, :, spans[0][0]:spans[0][1]]
    return torch.cat([x[:, :, a:b] for a, b in spans], 2)


@torch.compiler.disable  # the spans change every batch: compiled blocks call this eagerly
def segment_attention(q, k, v, segments, gqa):
    """SDPA per segment: q [1, H, T, D], k, v [1, G, S, D] -> [1, H, T, D]."""
    out = []
    for s in segments:
        y = F.scaled_dot_product_attention(
            take_spans(q, s.q), take_spans(k, s.kv), take_spans(v, s.kv),
            attn_mask=s.mask, is_causal=s.mask is None, enable_gqa=gqa)
        out.append(y[:, :, -s.keep:])
    return torch.cat(out, 2)


# --- the network ---

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32, scale in the input dtype: the Hugging Face order, so bf16 matches.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.H = a.num_attention_heads
        self.G = a.num_key_value_heads
        self.D = a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, self.H * self.D, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.G * self.D, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.G * self.D, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, a.hidden_size, bias=a.o_bias)

    def forward(self, x, cos, sin, mask=None, cache=None, segments=None):
        N, T, _ = x.shape
        q = self.q_proj(x).view(N, T, self.H, self.D).transpose(1, 2)  # (N, H, T, D)
        k = self.k_proj(x).view(N, T, self.G, self.D).transpose(1, 2)  # (N, G, T, D)
        v = self.v_proj(x).view(N, T, self.G, self.D).transpose(1, 2)  # (N, G, T, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        new_kv = (k, v)
        if cache is not None:
            k, v = cache.update(k, v)  # (N, G, S, D)
        gqa = self.G != self.H
        if segments is not None:
            y = segment_attention(q, k, v, segments, gqa)
        elif mask is None:  # only without past keys: with a cache SDPA aligns its triangle top-left
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(N, T, self.H * self.D)  # (N, T, H*D)
        return self.o_proj(y), new_kv  # (N, T, C)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, segments=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segments)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Aux(NamedTuple):
    kv: list  # per layer (k, v), each [N, G, T, D], post-RoPE, this call's tokens only
    final_attn_input: torch.Tensor  # [N, T, C]: the final layer's attention input (normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, config: dict | None = None):
        super().__init__()
        self.args = args
        self.config = config or {}  # the checkpoint's config.json, written back by save_pretrained
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.gradient_checkpointing = False
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self):
        """Normal(0, initializer_range) weights, zero biases, unit norms: Hugging Face's init."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.args.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.tie_weights()

    def _apply(self, fn, recurse=True):
        # model.to(bf16) would round the RoPE frequencies too: recompute them in fp32 after a move.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return self

    def tie_weights(self):
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, segments=None, *,
                return_hidden=False, return_aux=False):
        """Logits [N, T, V] for input_ids [N, T]. position_ids [N, T]: default continues from the
        cache. mask [N, T, S] bool (True = may attend; S = cached + T): default causal. cache:
        a KVCache per layer, this call's K/V appended. segments: a packed row (N = 1), attention
        per Segment. return_hidden: the final-normed hidden states [N, T, C] instead of logits.
        return_aux: also Aux (each layer's K/V, the final attention input)."""
        N, T = input_ids.shape
        device = input_ids.device
        past = 0 if cache is None else cache[0].len
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device).expand(N, T)
        if mask is None and past > 0 and segments is None:
            # new token i sees the cache and the new tokens up to i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(past)[None]
        cos, sin = rope_cos_sin(self.inv_freq, position_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.model.embed_tokens(input_ids)  # (N, T, C)
        kvs = []
        for i, layer in enumerate(self.model.layers):
            layer_input = x
            inputs = (x, cos, sin, mask, None if cache is None else cache[i], segments)
            if recompute:
                x, kv = checkpoint(layer, *inputs, use_reentrant=False)
            else:
                x, kv = layer(*inputs)
            kvs.append(kv)
        x = self.model.norm(x)
        out = x if return_hidden else self.lm_head(x)
        if not return_aux:
            return out
        # Recomputing the last block's input norm is cheaper than threading it out of the block.
        return out, Aux(kvs, self.model.layers[-1].input_layernorm(layer_input))

    # --- checkpoints ---

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu") -> "Transformer":
        """Build on the meta device, then stream each safetensors tensor to dtype/device once."""
        from safetensors import safe_open
        from tokenizer import resolve_model_dir  # a hub id `org/name` is fetched first

        path = resolve_model_dir(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
        config = read_json(config_file)
        try:
            args = ModelArgs.from_hf_config(config)
        except KeyError as e:
            raise ValueError(f"{config_file}: missing {e}") from None
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None
        with torch.device("meta"):
            model = cls(args, config)
        tied = args.tie_word_embeddings
        expected = model.state_dict()
        if tied:
            expected.pop("lm_head.weight")
        state = {}
        for file in _weight_files(path):
            try:
                f = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # SafetensorError: a torn or foreign file
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
            with f:
                for key in f.keys():
                    if tied and key == "lm_head.weight":
                        continue  # some tied checkpoints store the copy too
                    if key not in expected:
                        raise KeyError(f"{file}: unexpected tensor {key!r} "
                                       "(not in this config's model)")
                    shape = tuple(f.get_slice(key).get_shape())
                    want = tuple(expected[key].shape)
                    if shape != want:
                        raise ValueError(f"{file}: {key} has shape {shape}, "
                                         f"the config implies {want}")
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
        missing = sorted(set(expected) - set(state))
        if missing:
            raise KeyError(f"{path}: {len(missing)} tensors missing from the checkpoint, "
                           f"e.g. {missing[:3]}")
        if tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.inv_freq = rope_inv_freq(args).to(device)
        return model

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """Write config.json and model.safetensors (sharded with an index past max_shard_bytes)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight")
        shards = [{}]
        size = 0
        for k, v in state.items():
            if shards[-1] and size + v.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
        config = dict(self.config)
        dtype_key = "dtype" if "dtype" in config else "torch_dtype"  # the checkpoint's spelling
        config[dtype_key] = str(next(iter(state.values())).dtype).removeprefix("torch.")
        write_json(os.path.join(path, "config.json"), config)
        n = len(shards)
        names = ["model.safetensors"]
        if n > 1:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for name, shard in zip(names, shards):
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        if n > 1:
            total = sum(v.nbytes for v in state.values())
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_json(os.path.join(path, "model.safetensors.index.json"), index)


def compile_blocks(model):
    """torch.compile each decoder Block in place (off by default: the first step pays the
    compile). In place, so parameter names stay the Hugging Face ones (torch.compile(model)
    would prefix `_orig_mod.`); the embedding, final norm and loss stay eager."""
    for layer in model.model.layers:
        layer.compile()
    return model


def _weight_files(path):
    """The checkpoint's safetensors files: the shards its index names, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
        files = [os.path.join(path, name) for name in names]
        lost = [f for f in files if not os.path.isfile(f)]
        if lost:
            raise FileNotFoundError(f"{index} names {os.path.basename(lost[0])}, which is missing")
        return files
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors[.index.json] "
                            "(weights load only from safetensors)")


# --- generation: prefill, decode_one_token, sample ---

def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """Next ids [N] from logits [N, V]: argmax at temperature 0, else nucleus sampling.
    generator: one torch.Generator, or a list of one per row (each row its own stream)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    if isinstance(generator, list):
        rows = [torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)]
        return torch.cat(rows).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, ids, valid, cache):
    """Run left-padded prompts ids [N, L] (valid marks real tokens) into the cache; returns the
    last column's logits [N, V] and each row's last position id [N]. Every query also sees
    itself, so a pad row is never an all-masked (NaN) row."""
    N, L = ids.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    itself = torch.eye(L, dtype=torch.bool, device=ids.device)
    mask = (causal & valid[:, None, :L]) | itself  # (N, L, L)
    pos = (valid[:, :L].cumsum(-1) - 1).clamp(min=0)  # (N, L): real tokens only count
    h = model(ids, position_ids=pos, mask=mask, cache=cache, return_hidden=True)
    return model.lm_head(h[:, -1]), pos[:, -1]


def decode_one_token(model, nxt, pos, valid, cache):
    """Feed one token per row (ids nxt [N] at positions pos [N]); valid [N, S] marks the cache
    columns to attend to, this token's included. Returns the next logits [N, V]."""
    return model(nxt[:, None], position_ids=pos[:, None], mask=valid[:, None], cache=cache)[:, -1]


@torch.no_grad()
def generate(model, prompts, max_new_tokens=256, eos_ids=(), temperature=0.0, top_p=1.0,
             seed=None):
    """Continue token-id prompts of different lengths together, with a KV cache. Prompts are
    left-padded so every row's next token sits in the same column; pad keys are masked and
    position ids count only real tokens, so each row computes what it would alone. seed: one
    int for the batch, or one per prompt (each row draws from its own stream, whatever shares
    its batch). Returns the new ids per prompt (the stop token included when produced)."""
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    eos_ids = list(eos_ids or ())
    device = model.lm_head.weight.device
    N = len(prompts)
    L = max(len(p) for p in prompts)
    S = L + max_new_tokens
    ids = torch.zeros(N, L, dtype=torch.long, device=device)
    valid = torch.zeros(N, S, dtype=torch.bool, device=device)  # the keys each row attends to
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, L - len(p):L] = True
    a = model.args
    empty = model.model.embed_tokens.weight.new_zeros(N, a.num_key_value_heads, 0, a.head_dim)
    cache = [KVCache.from_kv(empty, empty, S) for _ in model.model.layers]  # (N, G, S, D) each
    generator = None
    if isinstance(seed, (list, tuple)):
        if len(seed) != N:
            raise ValueError(f"{len(seed)} seeds for {N} prompts")
        generator = [torch.Generator(device).manual_seed(s) for s in seed]
    elif seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    logits, pos = prefill(model, ids, valid, cache)
    out = []
    done = torch.zeros(N, dtype=torch.bool, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)  # new tokens, up to the first stop
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, generator)  # (N,)
        nxt = torch.where(done, 0, nxt)  # a finished row emits padding
        out.append(nxt)
        lengths += ~done
        done = done | torch.isin(nxt, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        valid[:, L + step] = True
        pos = pos + 1
        logits = decode_one_token(model, nxt, pos, valid[:, :L + step + 1], cache)
    new_ids = torch.stack(out, 1).tolist()  # (N, steps)
    return [row[:n] for row, n in zip(new_ids, lengths.tolist())]
