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


#: Steps (a word tried at a position of a pattern) a search of
#: L{topic_matched_by_all} takes at most before it gives up (answering
#: C{None}); patterns of real configurations need a few hundred.
OVERLAP_SEARCH_LIMIT = 100_000


class OverlapSearch:
    """
    Searches for topics that several patterns all match (see L{find}),
    within a budget of steps shared by every search it makes, so that a
    check of many patterns stays bounded however they are written.

    @ivar remaining: The steps left.
    @ivar exhausted: Whether a search ran out of steps (and answered
        C{None} without knowing).
    """

    def __init__(self, limit: int = OVERLAP_SEARCH_LIMIT) -> None:
        self.remaining = limit
        self.exhausted = False

    def find(self, *patterns: str) -> str | None:
        """
        A topic (of at least one word) that every one of C{patterns}
        matches, or C{None} when there is none or the budget ran out
        (L{exhausted} then says so).
        """
        parts = [pattern.split(".") for pattern in patterns]
        literals = {word for words in parts for word in words if word not in ("*", "#")}
        fresh = "x"
        while fresh in literals:
            fresh += "x"
        start = tuple(_closure(frozenset({0}), words) for words in parts)
        seen = {start}
        frontier: list[tuple[tuple[frozenset[int], ...], tuple[str, ...]]] = [(start, ())]
        while frontier:
            next_frontier = []
            for state, topic in frontier:
                # A literal at none of the positions reached does what any
                # other word does (only '*' and '#' take it): the fresh one
                # stands for them all.
                words_here = sorted({words[at] for positions, words in zip(state, parts)
                                     for at in positions if at < len(words)} - {"*", "#"})
                for word in (fresh, *words_here):
                    self.remaining -= sum(len(positions) for positions in state)
                    if self.remaining < 0:
                        self.exhausted = True
                        return None
                    following = tuple(_step(positions, words, word)
                                      for positions, words in zip(state, parts))
                    if not all(following):
                        continue
                    if all(len(words) in positions for positions, words in zip(following, parts)):
                        return ".".join((*topic, word))
                    if following not in seen:
                        seen.add(following)
                        next_frontier.append((following, (*topic, word)))
            frontier = next_frontier
        return None


def _closure(positions: frozenset[int], words: list[str]) -> frozenset[int]:
    """
    C{positions} of a pattern's C{words} and those reached from them
    without a word: a '#' may match none.
    """
    found = set(positions)
    todo = list(positions)
    while todo:
        at = todo.pop()
        if at < len(words) and words[at] == "#" and at + 1 not in found:
            found.add(at + 1)
            todo.append(at + 1)
    return frozenset(found)


def _step(positions: frozenset[int], words: list[str], word: str) -> frozenset[int]:
    """
    The positions of a pattern's C{words} reached from C{positions} by
    taking C{word}.
    """
    after = set()
    for at in positions:
        if at < len(words):
            if words[at] == "#":
                after.add(at)
            elif words[at] in ("*", word):
                after.add(at + 1)
    return _closure(frozenset(after), words)


def topic_matched_by_all(*patterns: str) -> str | None:
    """
    A topic (of at least one word) that every one of C{patterns} matches,
    or C{None} when there is none: whether topic patterns overlap, with an
    example.  Also C{None} when telling would take more than
    L{OVERLAP_SEARCH_LIMIT} steps.
    """
    return OverlapSearch().find(*patterns)
