"""Cache policies choose only which expert to evict: every policy gives stock mlx_lm's tokens,
never evicts a protected expert, and the frequency policies follow a workload that changes."""

import mlx.core as mx
import numpy as np
import pytest

import chronos_mlx
from chronos_mlx.errors import ChronosError
from chronos_mlx.generate import generate_step
from chronos_mlx.policy import POLICIES, LFUDAPolicy, UsagePolicy, make_policy

from conftest import DEMO, stock_greedy


def replay(policy, steps, num_slots):
    """A minimal expert cache (free slot first, else the policy's victim, the step's own
    experts protected) driven like chronos's; returns 1/0 per use: hit or miss."""
    resident, outcome = set(), []
    for experts in steps:
        need = sorted(set(experts))
        for e in need:
            outcome.append(e in resident)
            if e in resident:
                continue
            if len(resident) == num_slots:
                victim = policy.victim(set(need))
                assert victim in resident and victim not in need
                resident.discard(victim)
                policy.removed(victim)
            resident.add(e)
            policy.added(e)
        policy.touch(need)
    return np.array(outcome, dtype=float)


def workload(hot: list, steps: int, k: int, rng, cold: int = 0, num_experts: int = 32):
    """Each step uses k experts: mostly from `hot`, `cold` of them from anywhere."""
    out = []
    for _ in range(steps):
        chosen = list(rng.choice(hot, size=k - cold, replace=False))
        while len(chosen) < k:
            e = int(rng.integers(num_experts))
            if e not in chosen:
                chosen.append(e)
        out.append([int(e) for e in chosen])
    return out


class NoAgingLFU(LFUDAPolicy):
    """Plain LFU (no aging) as a straw man: what a workload switch does without decay."""

    def removed(self, e):
        self.resident[e] = False


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_victim_is_never_protected_and_always_resident(name):
    rng = np.random.default_rng(0)
    policy = make_policy(name, 16)
    if name == "usage":
        policy.seed(rng.random(16), num_slots=6, pin=True)
    resident = set()
    for _ in range(2000):
        op = rng.integers(4)
        if op == 0 and len(resident) < 16:
            e = int(rng.choice([e for e in range(16) if e not in resident]))
            resident.add(e)
            policy.added(e)
        elif op == 1 and resident:
            e = int(rng.choice(sorted(resident)))
            resident.discard(e)
            policy.removed(e)
        elif op == 2 and resident:
            policy.touch(rng.choice(sorted(resident), size=min(3, len(resident)), replace=False).tolist())
        elif resident:
            protected = set(rng.choice(sorted(resident), size=int(rng.integers(len(resident))), replace=False).tolist())
            v = policy.victim(protected)
            assert v in resident and v not in protected
    if resident:
        with pytest.raises(RuntimeError, match="protected"):
            policy.victim(set(resident))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_batch_of_victims_is_what_one_victim_at_a_time_would_evict(name):
    """A demand batch evicts several experts at once (`victims`): same experts, same order
    as asking for one victim, evicting it, and asking again."""
    import copy

    rng = np.random.default_rng(1)
    policy = make_policy(name, 32)
    if name == "usage":
        policy.seed(rng.random(32), num_slots=12, pin=True)
    for e in rng.choice(32, 20, replace=False).tolist():
        policy.added(e)
    for _ in range(200):
        policy.touch(rng.choice(32, 4, replace=False).tolist())
    for n in (1, 3, 8):
        protected = set(rng.choice(32, 5, replace=False).tolist())
        one_by_one, p = [], copy.deepcopy(policy)
        for _ in range(n):
            v = p.victim(protected)
            one_by_one.append(v)
            p.removed(v)
        assert policy.victims(n, protected) == one_by_one


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ChronosError, match="choose from lru, lfu, usage"):
        make_policy("fifo", 8)


@pytest.mark.parametrize("name", ["lfu", "usage"])
def test_frequency_policies_follow_a_workload_switch(name):
    """Phase A uses experts 0-7, phase B 8-15 (each step 3 of them plus one at random).
    The slots hold one hot set and a few more. After the switch the decayed policies
    forget A and serve B from the cache; plain LFU keeps A's experts forever."""
    rng = np.random.default_rng(1)
    a = workload(list(range(0, 8)), 3000, 4, rng, cold=1)
    b = workload(list(range(8, 16)), 3000, 4, rng, cold=1)
    n_a = 4 * len(a)
    hits = replay(make_policy(name, 32), a + b, num_slots=11)[n_a:]
    stuck = replay(NoAgingLFU(32), a + b, num_slots=11)[n_a:]
    late = slice(len(hits) // 2, None)
    assert hits[late].mean() > 0.7  # B's hot set is resident: only the random expert misses
    assert stuck[late].mean() < 0.45  # plain LFU: B's experts evict each other
    if name == "usage":  # exponential decay: recovered within a few half-lives (32 uses each)
        assert hits[4 * 400 : 4 * 800].mean() > 0.7


def test_a_wrong_profile_costs_little_and_is_forgotten():
    """Seeded with another workload's profile (hot on 0-7, pins there) and run on experts
    8-15: the pins go once live use contradicts them, and the hit rate is the unseeded one."""
    rng = np.random.default_rng(2)
    b = workload(list(range(8, 16)), 2000, 4, rng, cold=1)
    freq_b = np.bincount(np.concatenate(b[:500]), minlength=32) / 500
    plain, right, wrong = UsagePolicy(32), UsagePolicy(32), UsagePolicy(32)
    right.seed(freq_b, num_slots=11, pin=True)
    wrong.seed(np.roll(freq_b, -8), num_slots=11, pin=True)
    assert right.pinned[8:16].any() and not right.pinned[16:].any() and not right.pinned[:8].any()
    assert wrong.pinned[:8].any() and not wrong.pinned[8:].any()
    h_plain, h_right, h_wrong = (replay(p, b, num_slots=11) for p in (plain, right, wrong))
    assert not wrong.pinned.any()  # live use took the wrong pins away
    assert right.pinned.any()  # ... and kept the right ones
    assert h_wrong.mean() > h_plain.mean() - 0.02
    late = slice(4 * 1000, None)
    assert abs(h_wrong[late].mean() - h_plain[late].mean()) < 0.02


@pytest.fixture(scope="module")
def reference(demo_prompt_ids):
    return stock_greedy(DEMO, demo_prompt_ids, 16)[0]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_gives_stock_mlx_lm_tokens_at_the_smallest_budget(name, demo_prompt_ids, reference):
    # One token's experts per layer: nearly every step evicts, so the policy decides a lot.
    model, _, runtime = chronos_mlx.load(None, expert_budget=0.125, policy=name)
    ids = [t for t, _ in generate_step(mx.array(demo_prompt_ids), model, runtime, max_tokens=16)]
    assert ids == reference
    assert runtime.stats()["evictions"] > 0
