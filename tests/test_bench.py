"""bench.py on a tiny shape: every key of the --json line is there, ratios are finite and positive, the layout
counts add up, and the one-pass probe equals the per-prefix loop. No wall-clock assertions."""
import json
import math

from bench import MIXES, BenchConfig, run_bench, synth_instances

MIX_KEYS = ("tokens_per_s", "compact_over_uniform", "compact_over_uniform_range", "probe_share", "vs_hf_peft",
            "vs_hf_peft_range", "padding_before", "tokens_padded", "tokens_real", "tokens_packed", "step_peak_mb",
            "times_s", "supervised")


def test_bench_tiny_json():
    c = BenchConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128, seq=64, repeats=1,
                    lora_rank=4, mi_questions=1, mi_keys=2, mi_train_steps=1, mi_long_words=60, mi_sweep=True)
    r = json.loads(json.dumps(run_bench(c)))  # what --json prints
    for mix in ("long", "equal"):
        m = r[mix]
        assert set(MIX_KEYS) <= set(m), set(MIX_KEYS) - set(m)
        ratios = [m["tokens_per_s"], m["compact_over_uniform"]] + ([m["vs_hf_peft"]] if m["vs_hf_peft"] else [])
        assert all(math.isfinite(x) and x > 0 for x in ratios) and all(t > 0 for t in m["times_s"].values())
        lo, hi = m["compact_over_uniform_range"]
        assert lo <= m["compact_over_uniform"] <= hi and m["probe_share"] < 1
        # the packed row holds each prompt once and no padding: fewer tokens than the branches, than the padded block
        assert m["tokens_packed"] < m["tokens_real"] < m["tokens_padded"] or mix == "equal" and m["instances"] == 1
        assert m["tokens_packed"] == m["tokens_real"] - (m["branches"] - 1) * 32 * m["instances"]
        assert 0 < m["padding_before"] < 1
        assert {"compact", "compact_gc", "sft", "sft_gc"} <= set(m["step_peak_mb"]) and all(v > 0 for v in m["step_peak_mb"].values())
        if m.get("hf_loss_abs_diff") is not None:  # the same weights in transformers: the same loss before training
            assert m["hf_loss_abs_diff"] < 1e-4
    assert len([k for k in r["long"] if k.startswith("compact_over_uniform ")]) == 3 * 2  # --mi-sweep's laws (+ range)
    assert r["probe_max_abs_diff"] < 1e-4 and r["probe_speedup"] > 0
    for law, a in r["mi"]["tiny"].items():  # S_MI agreement with exact Eq. 3: a tau in [-1, 1], probe counts
        if isinstance(a, dict):
            assert -1 <= a["tau"] <= 1 and a["rel_err"] >= 0 and 0 < a["probes_long"]


def test_mixes_have_the_shapes_they_claim():
    c = BenchConfig()
    long = synth_instances(c, "long", 0)
    assert len(long) == MIXES["long"][2] and all(len(e.branches) == 4 for e in long)
    for k, m in enumerate(MIXES["long"][0]):  # each teacher's rationale length within ±25% of its mean
        n = [e.branches[k][1].count(1) for e in long]
        assert all(0.75 * m - 1 <= x <= 1.25 * m + 1 for x in n) and len(set(n)) > 1
    assert all(len(e.branches[0][0]) == 256 for e in synth_instances(c, "equal", 0))
