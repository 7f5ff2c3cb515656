"""
Value types that describe broker topology: exchanges, queues and bindings.

Both transports (the in-process bus and AMQP) take the same descriptions, and
the AMQP transport declares them again after every reconnect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Queue arguments a transport must understand (RabbitMQ's names).
DEAD_LETTER_EXCHANGE = "x-dead-letter-exchange"
DEAD_LETTER_ROUTING_KEY = "x-dead-letter-routing-key"
MESSAGE_TTL = "x-message-ttl"
MAX_LENGTH = "x-max-length"
QUEUE_TYPE = "x-queue-type"

#: The default exchange: routes by queue name.
DEFAULT_EXCHANGE = ""


@dataclass(frozen=True)
class ExchangeSpec:
    """
    An exchange to declare.

    @ivar name: Its name (C{amq.*} exchanges exist already on RabbitMQ).
    @ivar type: C{"topic"}, C{"direct"}, C{"fanout"} (the in-process bus
        knows C{topic} and C{direct}).
    @ivar durable: Whether it survives a broker restart.
    """

    name: str
    type: str = "topic"
    durable: bool = True


@dataclass(frozen=True)
class QueueSpec:
    """
    A queue to declare.

    @ivar name: Its name; C{""} asks the broker for a generated name.
    @ivar durable: Whether it survives a broker restart.
    @ivar exclusive: Only this connection may use it; deleted when it closes.
    @ivar auto_delete: Deleted when its last consumer goes.
    @ivar arguments: Broker arguments (C{x-dead-letter-exchange}, C{x-message-ttl},
        C{x-queue-type}, ...).
    """

    name: str
    durable: bool = True
    exclusive: bool = False
    auto_delete: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, self.durable, self.exclusive, self.auto_delete))


@dataclass(frozen=True)
class BindingSpec:
    """
    A binding of a queue to an exchange with a routing pattern.

    @ivar queue: The queue name.
    @ivar exchange: The exchange name.
    @ivar routing_key: The pattern; on a topic exchange C{*} matches one word
        and C{#} zero or more.
    """

    queue: str
    exchange: str
    routing_key: str


@dataclass(frozen=True)
class Topology:
    """
    Everything a component needs to exist on the broker before it runs.
    """

    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()

    def __add__(self, other: Topology) -> Topology:
        return Topology(
            self.exchanges + other.exchanges,
            self.queues + other.queues,
            self.bindings + other.bindings,
        )


def topic_matches(pattern: str, topic: str) -> bool:
    """
    Whether C{topic} matches an AMQP topic-exchange C{pattern}: words are
    separated by dots, C{*} stands for exactly one word and C{#} for zero or
    more words.
    """
    return _match(pattern.split("."), 0, topic.split("."), 0)


def _match(pattern: list[str], p: int, words: list[str], w: int) -> bool:
    while p < len(pattern):
        part = pattern[p]
        if part == "#":
            # Collapse runs of '#': they match the same as one.
            while p + 1 < len(pattern) and pattern[p + 1] == "#":
                p += 1
            if p + 1 == len(pattern):
                return True
            return any(_match(pattern, p + 1, words, i) for i in range(w, len(words) + 1))
        if w >= len(words):
            return False
        if part != "*" and part != words[w]:
            return False
        p += 1
        w += 1
    return w == len(words)


#: Pattern states a search of L{topic_matched_by_all} visits at most before
#: it gives up (answering C{None}); real patterns need a few dozen.
OVERLAP_SEARCH_LIMIT = 10_000


def topic_matched_by_all(*patterns: str) -> str | None:
    """
    A topic (of at least one word) that every one of C{patterns} matches,
    or C{None} when there is none: whether topic patterns overlap, with an
    example.  Also C{None} when telling would take more than
    L{OVERLAP_SEARCH_LIMIT} steps.
    """
    parts = [pattern.split(".") for pattern in patterns]
    literals = sorted({word for words in parts for word in words if word not in ("*", "#")})
    fresh = "x"
    while fresh in literals:
        fresh += "x"
    candidates = [fresh, *literals]

    def closure(positions: frozenset[int], words: list[str]) -> frozenset[int]:
        # A '#' may match no word: the position after it is reached too.
        found = set(positions)
        todo = list(positions)
        while todo:
            at = todo.pop()
            if at < len(words) and words[at] == "#" and at + 1 not in found:
                found.add(at + 1)
                todo.append(at + 1)
        return frozenset(found)

    def step(positions: frozenset[int], words: list[str], word: str) -> frozenset[int]:
        after = set()
        for at in positions:
            if at < len(words):
                if words[at] == "#":
                    after.add(at)
                elif words[at] in ("*", word):
                    after.add(at + 1)
        return closure(frozenset(after), words)

    start = tuple(closure(frozenset({0}), words) for words in parts)
    seen = {start}
    frontier: list[tuple[tuple[frozenset[int], ...], tuple[str, ...]]] = [(start, ())]
    while frontier:
        next_frontier = []
        for state, topic in frontier:
            for word in candidates:
                following = tuple(step(positions, words, word)
                                  for positions, words in zip(state, parts))
                if not all(following):
                    continue
                if all(len(words) in positions for positions, words in zip(following, parts)):
                    return ".".join((*topic, word))
                if following not in seen:
                    if len(seen) >= OVERLAP_SEARCH_LIMIT:
                        return None
                    seen.add(following)
                    next_frontier.append((following, (*topic, word)))
        frontier = next_frontier
    return None
