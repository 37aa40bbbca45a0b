"""bench.py on a tiny shape: every key of the --json line is there, ratios are finite and positive,
and the one-pass probe equals the per-prefix loop. No wall-clock assertions."""
import json
import math

from bench import BenchConfig, run_bench

KEYS = ("tokens_per_s", "compact_over_uniform", "compact_over_uniform_range", "probe_share", "probe_speedup",
        "probe_max_abs_diff", "peak_rss_mb", "vs_hf_peft", "vs_hf_peft_range", "vs_hf_peft_compiled", "compile_s", "mfu",
        "peak_mem_mb", "step_peak_mb", "times_s", "config", "mi_tau_default", "mi_rel_err_default", "mi_probes_default",
        "mi_probes_exact")


def test_bench_tiny_json():
    c = BenchConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128, batch=1, branches=2,
                    seq=64, repeats=1, mi_budget=10, lora_rank=4, mi_questions=1, mi_keys=1, mi_train_steps=1,
                    mi_long_words=60)
    r = json.loads(json.dumps(run_bench(c)))  # what --json prints
    assert set(KEYS) <= set(r)
    ratios = [r["tokens_per_s"], r["compact_over_uniform"], r["probe_speedup"], r["peak_rss_mb"]]
    ratios += [r["vs_hf_peft"]] if r["vs_hf_peft"] is not None else []  # null without transformers + peft
    assert all(math.isfinite(x) and x > 0 for x in ratios)
    assert all(math.isfinite(t) and t > 0 for t in r["times_s"].values())
    lo, hi = r["compact_over_uniform_range"]
    assert lo <= r["compact_over_uniform"] <= hi
    assert r["probe_share"] < 1
    assert all(v > 0 for v in r["step_peak_mb"].values()) and {"sft_vs_hf", "compact"} <= set(r["step_peak_mb"])
    assert r["probe_max_abs_diff"] < 1e-4
    if r["hf_loss_abs_diff"] is not None:  # the same weights in transformers: the same loss before training
        assert r["hf_loss_abs_diff"] < 1e-4
    assert r["mfu"] is None and r["peak_mem_mb"] is None  # CPU
    for name in ("default",):  # S_MI agreement with exact Eq. 3: a tau in [-1, 1], probe counts
        assert -1 <= r[f"mi_tau_{name}"] <= 1 and r[f"mi_rel_err_{name}"] >= 0
    assert 0 < r["mi_probes_default"] <= r["mi_probes_exact"]


def test_mfu_flops_count_every_linear_once():
    """4·N_frozen + 6·N_lora + 12·L·T·C per real token, N from the shapes (tied lm_head = the embedding)."""
    import torch
    from bench import build_model, flops_per_step, synth_batch
    c = BenchConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128, seq=64, lora_rank=4)
    model, batch = build_model(c, torch.device("cpu")), synth_batch(c)
    C, F = c.hidden, c.intermediate
    G = c.kv_heads * C // c.heads  # k/v output width
    per_layer = 2 * C * C + 2 * G * C + 3 * C * F  # q, o; k, v; gate, up, down
    lora = c.lora_rank * sum(i + o for i, o in [(C, C), (C, G), (C, G), (C, C), (C, F), (C, F), (F, C)])
    n_frozen = c.layers * per_layer + c.vocab * C
    tokens = int(batch["attention_mask"].sum())
    assert flops_per_step(model, batch, c) == tokens * (4 * n_frozen + 6 * c.layers * lora + 12 * c.layers * c.seq * C)
