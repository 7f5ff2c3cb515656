"""
What every client of the AMQP benchmark shares: the workload's messages, the
measurements of a worker process and the summary statistics.

Nothing here imports an AMQP client, so a worker process pays only for the
client it runs.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

BROKER_HOST = "127.0.0.1"
"""The shared broker; the benchmark talks to nothing else."""

BROKER_PORT = 5672
"""Its AMQP port."""

BROKER_URL = f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
"""The same broker as an C{amqp://} URL."""

EXCHANGE = "amq.topic"
"""Every client publishes to fedhub's default exchange."""

SENT_AT = "2026-11-28T06:00:00+00:00"
"""The C{sent-at} header of every benchmark message."""

USER_HEADER = "fedora_messaging_user_jdoe"
"""The one extra header every benchmark message carries."""


def body_dict(seq: int, sent: float | None = None) -> dict[str, Any]:
    """
    A message body shaped like a Bugzilla update, about 300 bytes of JSON.

    @param seq: A number that makes the body unique.
    @param sent: A send time (C{time.perf_counter}) for latency runs.
    """
    body: dict[str, Any] = {
        "bug": {
            "id": 1_000_000 + seq,
            "summary": "kernel panics on resume from suspend",
            "product": "Fedora",
            "component": "kernel",
            "status": "NEW",
            "assigned_to": "kernel-maint@example.org",
        },
        "event": {
            "who": "jdoe@example.org",
            "when": SENT_AT,
            "changes": [{"field": "status", "added": "ASSIGNED", "removed": "NEW"}],
        },
        "seq": seq,
    }
    if sent is not None:
        body["sent"] = sent
    return body


def body_bytes(body: dict[str, Any]) -> bytes:
    """
    A body as fedhub puts it on the wire: compact UTF-8 JSON.
    """
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def wire_headers() -> dict[str, Any]:
    """
    The AMQP headers fedhub gives every benchmark message (the same ones the
    other clients send).
    """
    return {
        USER_HEADER: True,
        "fedora_messaging_schema": "base.message",
        "fedora_messaging_severity": 20,
        "sent-at": SENT_AT,
        "priority": 0,
    }


@dataclass
class Plain:
    """
    One benchmark message as plain data, for the clients that are not fedhub.
    """

    message_id: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=wire_headers)


def plain_messages(count: int) -> Iterator[Plain]:
    """
    The workload's messages, one by one.
    """
    for seq in range(count):
        yield Plain(str(uuid.uuid4()), body_bytes(body_dict(seq)))


def memory() -> dict[str, int]:
    """
    This process's resident memory now and at its peak, in KiB.
    """
    values: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    peak = max(values.get("VmHWM", 0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {"rss_kib": values.get("VmRSS", 0), "peak_kib": peak}


def percentile(values: list[float], fraction: float) -> float:
    """
    The nearest-rank percentile of C{values} (C{fraction} in 0..1).
    """
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def keep_out_of_collection() -> None:
    """
    Move everything alive now (such as a batch of messages built before the
    clock starts) out of the garbage collector's generations.

    Without it, each full collection during the measured phase walks the
    whole prebuilt batch and bills the client for an object graph that a
    running service, which holds only its in-flight messages, does not
    have.  Every client calls it after building its batch.
    """
    gc.collect()
    gc.freeze()


def listening_pid(port: int) -> int | None:
    """
    The process listening on TCP C{port} of 127.0.0.1 or any address (the
    broker), found through C{/proc}; C{None} when there is none or its
    sockets can not be read (a process of another user).
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # state 0A is LISTEN; the local address ends in :PORT in hex
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return int(pid)
        except OSError:
            continue
    return None


def process_cpu(pid: int | None) -> float | None:
    """
    The CPU seconds (user + system) process C{pid} has used, or C{None}.
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command (which may hold spaces) in parentheses.
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """
    Times one measured phase of a worker: wall clock, CPU and memory, and
    the CPU the broker spent meanwhile (whoever else used it too).
    """

    def __init__(self) -> None:
        self.baseline = memory()
        self.started = 0.0
        self.cpu_started = 0.0
        self.broker = listening_pid(BROKER_PORT)
        self.broker_started: float | None = None
        self.result: dict[str, Any] = {}

    def start(self) -> None:
        """The measured phase begins."""
        self.baseline = memory()
        self.broker_started = process_cpu(self.broker)
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def stop(self, count: int, **extra: Any) -> dict[str, Any]:
        """
        The measured phase ended after C{count} messages; the result, with
        anything in C{extra}.
        """
        seconds = time.perf_counter() - self.started
        cpu = time.process_time() - self.cpu_started
        broker_now = process_cpu(self.broker)
        if broker_now is not None and self.broker_started is not None and count:
            extra.setdefault("broker_cpu_us_per_msg", 1e6 * (broker_now - self.broker_started) / count)
        now = memory()
        self.result = {
            "count": count,
            "seconds": seconds,
            "rate": count / seconds if seconds > 0 else 0.0,
            "cpu_us_per_msg": 1e6 * cpu / count if count else 0.0,
            "cpu_share": cpu / seconds if seconds > 0 else 0.0,
            "rss_before_kib": self.baseline["rss_kib"],
            "rss_kib": now["rss_kib"],
            "peak_kib": now["peak_kib"],
            **extra,
        }
        return self.result


#: A latency above this is late (seconds).
LATE = 0.003
#: This many consecutive late messages make a stall: nothing arrived for a
#: while, whoever the client (the broker or the machine paused).
STALL_RUN = 3


def latency_summary(latencies: list[float], warmup: int) -> dict[str, float]:
    """
    p50, p90, p99 and max of publish-to-consume latencies (seconds in, ms
    out), leaving out the first C{warmup} samples; and the stalls: runs of
    L{STALL_RUN} or more consecutive messages later than L{LATE}, how many
    and how many messages they held.  Where stalls hold more than 1 % of
    the messages, they decide p99 whatever the client.
    """
    kept = latencies[warmup:] or latencies
    stalls = stalled = run = 0
    for latency in kept + [0.0]:
        if latency > LATE:
            run += 1
            continue
        if run >= STALL_RUN:
            stalls += 1
            stalled += run
        run = 0
    return {
        "p50_ms": 1000 * percentile(kept, 0.50),
        "p90_ms": 1000 * percentile(kept, 0.90),
        "p99_ms": 1000 * percentile(kept, 0.99),
        "max_ms": 1000 * max(kept) if kept else float("nan"),
        "samples": len(kept),
        "stalls": stalls,
        "stalled_share": stalled / len(kept) if kept else 0.0,
    }


def emit(result: dict[str, Any]) -> None:
    """
    Print a worker's result as the last line of its output, for the parent.
    """
    print("RESULT " + json.dumps(result), flush=True)
