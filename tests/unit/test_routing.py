"""Routing policies over stand-in replicas (policies read only id, is_ready and in_flight)."""

from collections import Counter
from dataclasses import dataclass

from gateway.routing import LeastOutstanding, PrefixAffinity


@dataclass
class Replica:
    id: str
    in_flight: int = 0
    is_ready: bool = True


def chat(system: str, question: str) -> dict:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]
    }


def test_least_outstanding_takes_the_idlest_and_spreads_ties():
    a, b, c = Replica("a", 3), Replica("b", 1), Replica("c", 1)
    policy = LeastOutstanding()
    picks = Counter(policy.choose([a, b, c]).id for _ in range(10))
    assert set(picks) == {"b", "c"} and min(picks.values()) >= 4


def test_no_ready_replica_or_all_excluded_gives_none():
    policy = LeastOutstanding()
    assert policy.choose([Replica("a", is_ready=False)]) is None
    assert policy.choose([Replica("a")], exclude={"a"}) is None
    assert PrefixAffinity().choose([Replica("a")], "k", exclude={"a"}) is None


def test_same_system_prompt_goes_to_the_same_replica():
    replicas = [Replica(f"r{i}") for i in range(4)]
    policy = PrefixAffinity()
    for tenant in range(8):
        system = f"You are assistant number {tenant}. " * 20
        picks = {
            policy.choose(replicas, policy.key_for(chat(system, f"question {q}?"), {})).id
            for q in range(10)
        }
        assert len(picks) == 1, f"tenant {tenant} went to {picks}"


def test_different_prefixes_spread_over_replicas():
    replicas = [Replica(f"r{i}") for i in range(4)]
    policy = PrefixAffinity()
    picks = Counter(
        policy.choose(replicas, policy.key_for(chat(f"Tenant {t} " * 30, "hi"), {})).id
        for t in range(200)
    )
    assert len(picks) == 4 and min(picks.values()) > 20


def test_a_hot_prefix_spills_over_when_its_replica_is_overloaded():
    replicas = [Replica("a"), Replica("b")]
    policy = PrefixAffinity(load_factor=1.25)
    key = policy.key_for(chat("hot " * 100, "q"), {})
    home = policy.choose(replicas, key)
    home.in_flight = 10  # far above ceil(1.25 * 11 / 2) = 7
    other = policy.choose(replicas, key)
    assert other is not home


def test_session_header_and_user_field_win_over_the_prefix():
    policy = PrefixAffinity()
    body = chat("same " * 100, "q") | {"user": "alice"}
    assert policy.key_for(body, {}) == "session:alice"
    assert policy.key_for(body, {"x-session-id": "s1"}) == "session:s1"


def test_completions_prompt_and_single_message_use_their_start():
    policy = PrefixAffinity(prefix_chars=32)
    assert policy.key_for({"prompt": "x" * 100}, {}) == "x" * 32
    one = policy.key_for({"messages": [{"role": "user", "content": "y" * 100}]}, {})
    assert one is not None and len(one) == 32


def test_removing_a_replica_moves_only_its_keys():
    policy = PrefixAffinity()
    replicas = [Replica(f"r{i}") for i in range(4)]
    keys = [f"key {i}" for i in range(400)]
    before = {k: policy.choose(replicas, k).id for k in keys}
    after = {k: policy.choose(replicas[:3], k).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "r3" for k in moved)
