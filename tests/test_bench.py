"""bench.py on a tiny shape: every key of the --json line is there, ratios are finite and positive, the layout
counts add up, and the one-pass probe equals the per-prefix loop. No wall-clock assertions."""
import json
import math
from statistics import median

import torch

from bench import MIXES, BenchConfig, agreement, interleaved, kendall_tau, run_bench, synth_instances

MIX_KEYS = ("tokens_per_s", "compact_over_uniform", "compact_over_uniform_range", "probe_share", "vs_hf_peft",
            "vs_hf_peft_range", "padding_before", "tokens_padded", "tokens_real", "tokens_packed", "step_peak_mb",
            "times_s", "supervised")


def test_bench_tiny_json():
    c = BenchConfig(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=128, seq=64, repeats=2,
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
        assert m["step_peak_mb"]["sft_gc"] < m["step_peak_mb"]["sft"]  # checkpointing holds fewer activations
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


def test_kendall_tau_and_agreement_by_hand():
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == 1 / 3  # pairs (+, +, -)
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == 2 / 3  # a tie counts 0, not -1
    assert kendall_tau([3, 2, 1, 0], [0, 1, 2, 3]) == -1
    # exact [1, 2, 4] estimated [1, 3, 3]: errors 0, .5, .25; the long (last) branch .25; top-1 differs
    a = agreement([([1, 2, 4], [1, 3, 3], [5, 7, 20]), ([1, 2, 4], [1, 2, 4], [5, 5, 30])])
    assert a["tau"] == (2 / 3 + 1) / 2 and abs(a["rel_err"] - 0.75 / 6) < 1e-12
    assert a["rel_err_long"] == 0.125 and a["top1"] == 0.5
    assert a["probes_short"] == 5.5 and a["probes_long"] == 25


def test_interleaved_warms_up_once_then_takes_rounds_in_turn():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times, rounds = interleaved(fns, BenchConfig(repeats=3, steps=2), torch.device("cpu"))
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # the warmup is one call each, not timed
    assert all(len(r) == 3 for r in rounds.values()) and times == {k: median(r) for k, r in rounds.items()}
