"""Speed model logic with an injected deterministic timer (no timed tests)."""
from __future__ import annotations

import json

import pytest
import torch

from rankwise.compression.allocation import speed
from rankwise.compression.allocation.speed import (
    SpeedProfile, break_even_rank, fingerprint, load_speed_profile, module_latency,
)
from rankwise.errors import ConfigError
from rankwise.structures.lowrank import max_saving_rank


class FakeTimer:
    """latency = flops * per_flop + calls * overhead; counts how often it was asked."""

    def __init__(self, per_call: float = 50.0):
        self.per_call = per_call
        self.calls = 0

    def __call__(self, m, n, rank, tokens):
        self.calls += 1
        if rank is None:
            return tokens * m * n + self.per_call
        return tokens * rank * (m + n) + 2 * self.per_call


def brute_break_even(m, n, tokens, lat):
    dense = lat(m, n, None, tokens)
    ok = [k for k in range(1, max_saving_rank(m, n) + 1) if lat(m, n, k, tokens) < dense]
    return max(ok) if ok else 0


@pytest.mark.parametrize("m,n", [(64, 64), (192, 576), (1536, 576), (7, 5), (3, 2)])
@pytest.mark.parametrize("tokens", [1, 512])
@pytest.mark.parametrize("per_call", [0.0, 50.0, 5000.0])
def test_break_even_matches_brute_force(m, n, tokens, per_call):
    t = FakeTimer(per_call)
    assert break_even_rank(m, n, tokens, t) == brute_break_even(m, n, tokens, FakeTimer(per_call))


def test_break_even_is_zero_when_overhead_dominates():
    # 1 token through a 64x64 layer: the factorized form pays twice the call overhead
    assert break_even_rank(64, 64, 1, FakeTimer(per_call=1e6)) == 0


def test_bisection_is_cheap():
    t = FakeTimer()
    break_even_rank(1536, 576, 512, t)
    assert t.calls <= 2 + max_saving_rank(1536, 576).bit_length()


def test_profile_cap_is_min_over_regimes():
    p = SpeedProfile({"x": 1}, {"4x6": {"decode": 1, "prefill": 2}})
    assert p.cap(4, 6) == 1
    assert p.cap(4, 6, ["prefill"]) == 2
    with pytest.raises(ConfigError, match="no entry"):
        p.cap(5, 5)


def test_cache_reused_when_fingerprint_matches(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    t = FakeTimer()
    p1 = load_speed_profile([(64, 32), (32, 64), (64, 32)], latency=t)
    assert t.calls > 0
    files = list((tmp_path / "speed").glob("*.json"))
    assert len(files) == 1
    t2 = FakeTimer()
    p2 = load_speed_profile([(64, 32)], latency=t2)
    assert t2.calls == 0 and p2.break_even == p1.break_even
    # a new shape is measured and added, the old ones are not re-measured
    t3 = FakeTimer()
    p3 = load_speed_profile([(64, 32), (16, 16)], latency=t3)
    assert 0 < t3.calls and set(p3.break_even) == {"64x32", "32x64", "16x16"}
    assert p3.break_even["64x32"] == p1.break_even["64x32"]


@pytest.mark.parametrize("key,value", [("torch", "1.0.0"), ("cpu", "Some Other CPU"), ("threads", 999),
                                       ("dtype", "bfloat16")])
def test_profile_from_another_machine_is_remeasured(tmp_path, monkeypatch, key, value):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    fp = fingerprint()
    foreign = dict(fp, **{key: value})
    bogus = {"fingerprint": foreign, "break_even": {"64x32": {"decode": 3, "prefill": 3}}}
    # planted both as the machine cache file and as a user-supplied file
    user = tmp_path / "user.json"
    user.write_text(json.dumps(bogus))
    speed.default_profile_path(fp).parent.mkdir(parents=True, exist_ok=True)
    speed.default_profile_path(fp).write_text(json.dumps(bogus))
    for kw in ({}, {"profile_file": user}):
        t = FakeTimer()
        p = load_speed_profile([(64, 32)], latency=t, **kw)
        assert t.calls > 0, "a foreign profile must not be trusted"
        assert p.fingerprint == fp
        assert p.break_even["64x32"]["decode"] == brute_break_even(64, 32, 1, FakeTimer())
    assert json.loads(user.read_text()) == bogus, "the user's file is never modified"


def test_user_profile_with_matching_fingerprint_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    user = tmp_path / "p.json"
    user.write_text(json.dumps({"fingerprint": fingerprint(),
                                "break_even": {"64x32": {"decode": 3, "prefill": 7}}}))
    t = FakeTimer()
    p = load_speed_profile([(64, 32)], profile_file=user, latency=t)
    assert t.calls == 0 and p.cap(64, 32) == 3


def test_bad_profile_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_speed_profile([(4, 4)], profile_file=tmp_path / "nope.json", latency=FakeTimer())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_speed_profile([(4, 4)], profile_file=bad, latency=FakeTimer())
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a rankwise speed profile"):
        load_speed_profile([(4, 4)], profile_file=bad, latency=FakeTimer())


def test_fingerprint_contents():
    fp = fingerprint("cpu", torch.bfloat16)
    assert fp["torch"] == torch.__version__ and fp["threads"] == torch.get_num_threads()
    assert fp["dtype"] == "bfloat16" and fp["device"] == "cpu" and fp["cpu"]
    assert speed.fingerprint_hash(fp) != speed.fingerprint_hash(dict(fp, threads=fp["threads"] + 1))


def test_real_timer_returns_positive_seconds():
    lat = module_latency(repeats={"1": 1, "4": 1})
    assert lat(8, 6, None, 1) > 0 and lat(8, 6, 2, 4) > 0


def test_generation_prefill_computes_only_the_last_logits(tiny_any, monkeypatch):
    """last_logits_only runs the forward with logits_to_keep=1 (what generate's prefill does)."""
    from rankwise.evaluation import latency

    seen = []
    forward = tiny_any.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.append((kwargs.get("logits_to_keep"), out.logits.shape[1]))
        return out

    monkeypatch.setattr(tiny_any, "forward", spy)
    assert latency.prefill_seconds(tiny_any, seqlen=16, repeats=1, warmup=0, last_logits_only=True) > 0
    assert latency.prefill_seconds(tiny_any, seqlen=16, repeats=1, warmup=0) > 0
    assert seen == [(1, 1), (None, 16)]
