"""Eviction policies. A policy only orders experts of one layer; the cache does the rest.

Interface: `touch(experts)` on every use, `added(e)` / `removed(e)` as slots change, and
`victim(protected)` names the resident expert to evict, never one in `protected`.
"""

from __future__ import annotations

from collections import OrderedDict


class LRUPolicy:
    """Evict the least recently used resident expert."""

    name = "lru"

    def __init__(self, num_experts: int):
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, experts):
        for e in experts:
            if e in self._order:
                self._order.move_to_end(e)

    def added(self, e: int):
        self._order[e] = None
        self._order.move_to_end(e)

    def removed(self, e: int):
        self._order.pop(e, None)

    def victim(self, protected) -> int:
        for e in self._order:
            if e not in protected:
                return e
        raise RuntimeError("every resident expert is protected: no victim")


POLICIES = {"lru": LRUPolicy}


def make_policy(name: str, num_experts: int):
    try:
        return POLICIES[name](num_experts)
    except KeyError:
        raise ValueError(f"unknown cache policy '{name}' (choose from {', '.join(POLICIES)})")
