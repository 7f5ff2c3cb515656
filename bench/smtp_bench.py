"""
Throughput and latency of the Bugzilla mail listener against aiosmtpd.

Every server runs in its own process, and so does the SMTP client, which
keeps C{--connections} sessions busy with distinct bugmails of about 2 KB
(variants of a Red Hat Bugzilla change mail, each with its own bug id, so
de-duplication lets every one through).  The client speaks SMTP itself over
asyncio streams, one command at a time like C{smtplib} (aiosmtpd does not
advertise C{PIPELINING}), and counts every reply.

The servers, in one run:

  - C{trivial}: canned replies and nothing else; what the client can do at
    most, so the figures below it are the servers' and not the client's;
  - C{aiosmtpd}: aiosmtpd with a handler that only counts;
  - C{fedhub}: L{BugmailListener} with the hub's whole hand-over: every mail
    is parsed, de-duplicated, built into a message, checked against its
    schema and written to a real L{Outbox} (SQLite, fsync, group commit) on
    a memory bus with a consumer that acks, logging to a file as
    C{twistd --logfile} does.  C{250} comes only once the message is on
    disk.  With C{--parse-workers} above 0 (the C{bugzilla-smtp} plugin's
    default unless given) mail is parsed as the plugin parses it: mails up
    to C{parse_inline_max} bytes (64 KiB, so every one of the benchmark's)
    in process, larger ones in the worker processes, whose CPU counts as
    the server's.

Then C{fedhub} once more at a steady C{--rate} (20 mails/s) for the latency
of C{250}: from the client's end-of-data line to the reply.

Usage, from the checkout::

    /work/venv/bin/python bench/smtp_bench.py [--mails 5000] [--connections 8]
        [--repeat 3] [--rate 20] [--latency-seconds 20] [--dir DIR]
        [--no-log] [--profile FILE] [--parse-workers N]

C{bench/smtp_bench.py stages [--mails 2000]} prints the CPU time of each
step of the hand-over (parse, fingerprint, build, schema check, encode)
measured on its own.

C{bench/smtp_bench.py [--mails 5000] parts [--rounds 2]} measures what
each part of the hand-over costs by taking it out: the fedhub server runs
whole, then without its log line, without its outbox (a hand-over is taken
as durable at once; the store thread, its fsync'd commits and the in-process
bus standing in for the broker go with it), and without the outbox, the log
line, the fingerprint and the schema check, printing mails/s and the CPU per
mail of the reactor thread and of the whole process.

C{--profile FILE} runs the fedhub server of the first throughput run under
cProfile and prints where its time goes (the figures of that run are then
slower than without the profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import percentile  # noqa: E402

HOST = "127.0.0.1"
RECIPIENT = "bugzilla-bus@hub.example"
SENDER = "bugzilla@redhat.com"
TOPIC_PREFIX = "org.example.bench"
STATUSES = (("NEW", "ASSIGNED"), ("ASSIGNED", "POST"), ("POST", "MODIFIED"), ("MODIFIED", "ON_QA"))
COMPONENTS = ("python-requests", "kernel", "glibc", "firefox", "systemd", "gnome-shell", "rpm", "dnf")


# --- the workload -------------------------------------------------------------


def bugmail(seq: int) -> bytes:
    """
    A Bugzilla change mail of about 2 KB (CRLF line ends), distinct for
    every C{seq}: its own bug id, component, status change, comment number
    and time.
    """
    bug = 2_300_000 + seq
    removed, added = STATUSES[seq % len(STATUSES)]
    component = COMPONENTS[seq % len(COMPONENTS)]
    hour, rest = divmod(seq % 86_400, 3600)
    minute, second = divmod(rest, 60)
    text = f"""From: bugzilla@redhat.com
To: pkg-owner@example.com
Subject: [Bug {bug}] {component}: FTBFS in Fedora rawhide/f40
Date: Tue, 23 Jan 2024 {hour:02d}:{minute:02d}:{second:02d} +0000
X-Bugzilla-Reason: AssignedTo
X-Bugzilla-Type: changed
X-Bugzilla-Watch-Reason: None
X-Bugzilla-Classification: Fedora
X-Bugzilla-Product: Fedora
X-Bugzilla-Component: {component}
X-Bugzilla-Sub-Component: 
X-Bugzilla-Version: rawhide
X-Bugzilla-Keywords: 
X-Bugzilla-Severity: unspecified
X-Bugzilla-Who: jane.packager@example.com
X-Bugzilla-Status: {added}
X-Bugzilla-Resolution: 
X-Bugzilla-Priority: unspecified
X-Bugzilla-Assigned-To: jane.packager@example.com
X-Bugzilla-Target-Milestone: ---
X-Bugzilla-Flags: needinfo?
X-Bugzilla-Changed-Fields: bug_status flagtypes.name
X-Bugzilla-Comment: public
X-Bugzilla-Reporter: packager.reporter@example.org
Message-ID: <bug-{bug}-451203-Zq{seq:08d}@https.bugzilla.redhat.com/>
In-Reply-To: <bug-{bug}-451203@https.bugzilla.redhat.com/>
References: <bug-{bug}-451203@https.bugzilla.redhat.com/>
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: quoted-printable
X-Bugzilla-URL: https://bugzilla.redhat.com/
Auto-Submitted: auto-generated
MIME-Version: 1.0

https://bugzilla.redhat.com/show_bug.cgi?id=3D{bug}

Jane Packager <jane.packager@example.com> changed:

           What    |Removed                     |Added
----------------------------------------------------------------------------
             Status|{removed:<28}|{added}
              Flags|                            |needinfo?(packager.reporter
                   |                            |@example.org)

--- Comment #{seq % 40 + 1} from Jane Packager <jane.packager@example.com> ---
Thanks for the report. Could you attach the full build.log from the failed
Koji task (and the output of "rpm -q python3-urllib3")? The test failure in
test_requests.py looks like the urllib3 2.x API change. D=C3=A9j=C3=A0 vu f=
rom F38 :-)

--=20
You are receiving this mail because:
You are the assignee for the bug.=
"""
    return text.replace("\n", "\r\n").encode("utf-8")


def data_phase(mail: bytes) -> bytes:
    """
    A mail as C{DATA} carries it: dot-stuffed and ended by a lone dot.
    """
    lines = mail.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def stat_cpu(path: str) -> float | None:
    """
    CPU seconds (user + system) of the C{/proc} C{stat} file at C{path}, a
    process's or a thread's; C{None} when it can not be read.
    """
    try:
        with open(path) as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int, tid: int) -> float:
    """
    CPU seconds (user + system) one thread of a process has used so far.
    """
    return stat_cpu(f"/proc/{pid}/task/{tid}/stat") or 0.0


def process_cpu(pid: int) -> float:
    """
    CPU seconds (user + system, all threads) a process and its living
    descendants (the parse workers) have used so far.
    """
    seconds = stat_cpu(f"/proc/{pid}/stat")
    if seconds is None:
        return 0.0
    children: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children.update(int(child) for child in f.read().split())
    except OSError:
        pass
    return seconds + sum(process_cpu(child) for child in children)


# --- the client ---------------------------------------------------------------


class Session:
    """
    One SMTP session of the client.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Session:
        """
        Connect, read the greeting and say EHLO.
        """
        reader, writer = await asyncio.open_connection(HOST, port)
        session = cls(reader, writer)
        code, _ = await session.reply()
        if code != 220:
            raise RuntimeError(f"greeting {code}")
        code, _ = await session.command(b"EHLO bench.example\r\n")
        if code != 250:
            raise RuntimeError(f"EHLO answered {code}")
        return session

    async def reply(self) -> tuple[int, bytes]:
        """
        Read one reply (all its lines); its code and last line.
        """
        while True:
            line = await self.reader.readuntil(b"\n")
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip()

    async def command(self, line: bytes) -> tuple[int, bytes]:
        """
        Send a command and read its reply.
        """
        self.writer.write(line)
        return await self.reply()

    async def send(self, payload: bytes) -> tuple[int, bytes, float]:
        """
        Send one mail (C{payload} as L{data_phase} made it), one command at
        a time; the final reply and the seconds from the end-of-data line to
        it.
        """
        code, text = await self.command(b"MAIL FROM:<" + SENDER.encode() + b">\r\n")
        if code != 250:
            return code, text, 0.0
        code, text = await self.command(b"RCPT TO:<" + RECIPIENT.encode() + b">\r\n")
        if code != 250:
            await self.command(b"RSET\r\n")
            return code, text, 0.0
        code, text = await self.command(b"DATA\r\n")
        if code != 354:
            return code, text, 0.0
        began = time.perf_counter()
        self.writer.write(payload)
        code, text = await self.reply()
        return code, text, time.perf_counter() - began

    async def close(self) -> None:
        """
        Say QUIT and close.
        """
        try:
            await self.command(b"QUIT\r\n")
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def throughput(port: int, payloads: list[bytes], connections: int) -> dict[str, Any]:
    """
    Deliver every payload over C{connections} sessions as fast as the server
    answers.
    """
    sessions = [await Session.open(port) for _ in range(connections)]
    work: Iterator[bytes] = iter(payloads)
    codes: dict[int, int] = {}

    async def worker(session: Session) -> None:
        for payload in work:
            code, _, _ = await session.send(payload)
            codes[code] = codes.get(code, 0) + 1

    cpu = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(worker(s) for s in sessions))
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu
    await asyncio.gather(*(s.close() for s in sessions))
    return {"seconds": seconds, "client_cpu": cpu, "codes": codes}


async def steady(port: int, payloads: list[bytes], connections: int, rate: float) -> dict[str, Any]:
    """
    Deliver the payloads at C{rate} mails per second (each on a free
    session), recording how long every C{250} took.
    """
    sessions: asyncio.Queue[Session] = asyncio.Queue()
    opened = [await Session.open(port) for _ in range(connections)]
    for session in opened:
        sessions.put_nowait(session)
    codes: dict[int, int] = {}
    latencies: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(session: Session, payload: bytes) -> None:
        code, _, seconds = await session.send(payload)
        codes[code] = codes.get(code, 0) + 1
        if code == 250:
            latencies.append(seconds)
        sessions.put_nowait(session)

    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    late = 0
    for i, payload in enumerate(payloads):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        session = await sessions.get()
        if loop.time() - due > 1.0 / rate:
            late += 1
        tasks.append(asyncio.create_task(one(session, payload)))
    await asyncio.gather(*tasks)
    seconds = loop.time() - start
    await asyncio.gather(*(s.close() for s in opened))
    return {
        "seconds": seconds,
        "codes": codes,
        "late": late,
        "p50_ms": 1000 * percentile(latencies, 0.50),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "max_ms": 1000 * max(latencies) if latencies else float("nan"),
        "samples": len(latencies),
    }


def run_client(args: argparse.Namespace) -> None:
    """
    The client process: print one JSON line with the result.
    """
    payloads = [data_phase(bugmail(args.first + i)) for i in range(args.mails)]
    if args.rate:
        result = asyncio.run(steady(args.port, payloads, args.connections, args.rate))
    else:
        result = asyncio.run(throughput(args.port, payloads, args.connections))
    result["mail_bytes"] = statistics.mean(len(p) for p in payloads)
    print("RESULT " + json.dumps(result), flush=True)


# --- the servers ----------------------------------------------------------------


def serve_trivial() -> None:
    """
    Canned replies to every command and to every mail: the client's ceiling.
    """

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = b""
            self.data = False
            transport.write(b"220 trivial ESMTP\r\n")

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\r\n")
            out = []
            for line in lines:
                if self.data:
                    if line == b".":
                        self.data = False
                        out.append(b"250 2.0.0 Ok\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    self.data = True
                    out.append(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    out.append(b"221 bye\r\n")
                    self.transport.write(b"".join(out))
                    self.transport.close()
                    return
                else:
                    out.append(b"250 2.0.0 Ok\r\n")
            if out:
                self.transport.write(b"".join(out))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Canned, HOST, 0)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()
        print("STATS " + json.dumps({}), flush=True)

    asyncio.run(main())


def serve_aiosmtpd() -> None:
    """
    aiosmtpd with a handler that counts mails and answers C{250}.
    """
    from aiosmtpd.smtp import SMTP

    class Counting:
        def __init__(self) -> None:
            self.count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            self.count += 1
            return "250 2.0.0 Ok"

    handler = Counting()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(handler, hostname="bench.example"), HOST, 0)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()
        print("STATS " + json.dumps({"received": handler.count}), flush=True)

    asyncio.run(main())


def serve_fedhub(
    directory: str, log_path: str | None, profile: str | None, handover: bool = True,
    parse_workers: int = 0,
    parse_inline_max: int | None = None,
) -> None:
    """
    The listener with the hub's hand-over: parse (in C{parse_workers}
    worker processes, or on the reactor thread with 0), de-duplicate,
    build, validate, and a durable outbox on a memory bus whose consumer
    acks.  Without C{handover}, the listener alone: every mail is answered
    C{250} at once, unread (what SMTP itself costs).
    """
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, ensureDeferred, succeed
    from twisted.internet.task import deferLater
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from fedhub.bus.memory import MemoryBus
    from fedhub.interfaces import IDelivery
    from fedhub.outbox import Outbox
    from fedhub.producers.bugzilla.producer import Accepted, BugmailIntake, EventPublisher, IBugmailIntake
    from fedhub.producers.bugzilla.parser import parse_bugmail
    from fedhub.producers.bugzilla.smtp import BugmailListener, ListenerSettings
    from fedhub.producers.bugzilla.workers import ParserPool, PooledBugmailListener, parse_by_size
    from fedhub.topology import BindingSpec, QueueSpec, Topology
    from zope.interface import implementer

    log_file = None
    if log_path is not None:
        log_file = open(log_path, "a", encoding="utf-8")
        globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    else:
        globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)

    bus = MemoryBus("bench", clock=reactor)
    outbox = Outbox("bench", directory, bus, reactor, max_messages=1_000_000)
    consumed = [0]

    def on_delivery(delivery: IDelivery) -> None:
        consumed[0] += 1
        delivery.ack()

    settings = ListenerSettings(
        recipients=frozenset({RECIPIENT}),
        hostname="bench.example",
        max_connections=64,
        max_connections_per_peer=64,
    )
    counted = [0]

    @implementer(IBugmailIntake)
    class Counting:
        producer = "bench"

        def receive(self, raw: bytes, source: str = "") -> Deferred[Accepted]:
            counted[0] += 1
            return succeed(Accepted("published"))

    intake: IBugmailIntake = Counting()
    pool = ParserPool(parse_workers, reactor=reactor) if handover and parse_workers > 0 else None
    if handover:
        # Built as the bugzilla-smtp plugin builds it for the hub.
        intake = BugmailIntake(
            EventPublisher(outbox, lambda suffix: f"{TOPIC_PREFIX}.{suffix}"),
            clock=reactor,
            dedup_max_entries=1_000_000,
            # Mails up to parse_inline_max (all of the benchmark's) are
            # parsed in process, as the plugin does by default.
            parse=(parse_by_size(pool) if parse_inline_max is None
                   else parse_by_size(pool, parse_inline_max)) if pool is not None else parse_bugmail,
        )
    listener: BugmailListener
    if pool is not None:
        listener = PooledBugmailListener(f"tcp:0:interface={HOST}", settings, intake, pool,
                                         reactor=reactor)
    else:
        listener = BugmailListener(f"tcp:0:interface={HOST}", settings, intake, reactor=reactor)
    profiler: Any = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()

    async def main() -> None:
        await bus.declare(
            Topology(
                queues=(QueueSpec("bench"),),
                bindings=(BindingSpec("bench", "amq.topic", f"{TOPIC_PREFIX}.bugzilla.#"),),
            )
        )
        await bus.subscribe("bench", on_delivery, 1000)
        port = await listener.when_listening()
        # The workers start in parallel with the listener; the client comes
        # once they are ready, so their start is not measured.
        while pool is not None and pool.ready_workers < pool.workers:
            await deferLater(reactor, 0.01, lambda: None)
        print(f"PORT {port.getHost().port}", flush=True)  # type: ignore[attr-defined]
        if profiler is not None:
            profiler.enable()
        stdin_closed: Deferred[None] = Deferred()
        reactor.callInThread(lambda: (sys.stdin.read(), reactor.callFromThread(stdin_closed.callback, None)))  # type: ignore[attr-defined]
        await stdin_closed
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        # Wait for the consumer to see everything the outbox took.
        deadline = time.monotonic() + 60
        while consumed[0] < outbox.stats().accepted and time.monotonic() < deadline:
            await deferLater(reactor, 0.01, lambda: None)
        stats = outbox.stats()
        result = {
            "received": listener.counters.get("mails_published", 0),
            "counted": counted[0],
            "accepted": stats.accepted,
            "consumed": consumed[0],
            "transactions": stats.transactions,
        }
        await listener.stopService()
        await outbox.stopService()
        await bus.stopService()
        print("STATS " + json.dumps(result), flush=True)

    def run() -> None:
        bus.startService()
        outbox.startService()
        listener.startService()
        d = ensureDeferred(main())
        d.addErrback(lambda f: print(f"ERROR {f.getTraceback()}", flush=True))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    if log_file is not None:
        log_file.close()


# --- the orchestra --------------------------------------------------------------


class Server:
    """
    A server subprocess; C{stop()} closes its standard input and reads its
    statistics.
    """

    def __init__(self, kind: str, extra: list[str]) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "serve", kind, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"{kind} server did not start: {line!r}")
        self.port = int(line.split()[1])

    def cpu(self) -> float:
        """
        CPU seconds the server used so far.
        """
        return process_cpu(self.process.pid)

    def stop(self) -> dict[str, Any]:
        """
        Stop it; its statistics.
        """
        out, _ = self.process.communicate("", timeout=120)
        stats: dict[str, Any] = {}
        for line in out.splitlines():
            if line.startswith("STATS "):
                stats = json.loads(line[6:])
            elif line.startswith("ERROR "):
                raise RuntimeError(f"{self.kind} server failed:\n{out}")
        return stats


def client(port: int, mails: int, connections: int, first: int, rate: float = 0.0) -> dict[str, Any]:
    """
    Run the client process against C{port}; its result.
    """
    command = [
        sys.executable, os.path.abspath(__file__), "client", "--port", str(port),
        "--mails", str(mails), "--connections", str(connections), "--first", str(first),
    ]
    if rate:
        command += ["--rate", str(rate)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900).stdout
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"the client printed no result:\n{out}")


#: What C{parts} takes out of the fedhub server, run by run.
PARTS: tuple[tuple[str, str], ...] = (
    ("", "the whole hand-over"),
    ("log", "without the log line"),
    ("outbox", "without the outbox"),
    ("outbox,log,fingerprint,schema", "without the outbox, log, fingerprint, schema"),
)


def without(parts: set[str]) -> None:
    """
    Take C{parts} out of the fedhub server about to run (C{log} is left to
    the caller): C{outbox}, a hand-over durable at once; C{fingerprint}, a
    random one; C{schema}, no check.
    """
    sys.path.insert(0, ROOT)
    import uuid

    from twisted.internet.defer import succeed

    if "outbox" in parts:
        from fedhub.outbox import Outbox

        Outbox.publish = lambda self, message: succeed(None)  # type: ignore[method-assign]
    if "fingerprint" in parts:
        from fedhub.producers.bugzilla import producer

        producer.fingerprint_of = lambda body: uuid.uuid4().hex  # type: ignore[assignment]
    if "schema" in parts:
        from fedhub.schema import SchemaRegistry

        SchemaRegistry.validate = lambda self, *args, **kwargs: None  # type: ignore[method-assign]


def parts_report(args: argparse.Namespace) -> int:
    """
    Run the fedhub server whole and without parts (L{PARTS}), round after
    round, and print what each run took.
    """
    scratch = tempfile.mkdtemp(prefix="smtp-parts-", dir=args.dir)
    print(f"{args.mails} mails of ~2 KB over {args.connections} connections, {args.rounds} "
          f"round(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in PARTS}
    try:
        for round_ in range(args.rounds):
            for name, _ in PARTS:
                extra = fedhub_extra(args, scratch, f"r{round_}")
                if "log" in name.split(","):
                    extra = [e for i, e in enumerate(extra)
                             if e != "--log" and (i == 0 or extra[i - 1] != "--log")]
                if name:
                    extra += ["--without", name]
                server = Server("fedhub", extra)
                try:
                    pid = server.process.pid
                    main_before, all_before = thread_cpu(pid, pid), server.cpu()
                    result = client(server.port, args.mails, args.connections, 0)
                    main_cpu = thread_cpu(pid, pid) - main_before
                    all_cpu = server.cpu() - all_before
                finally:
                    server.stop()
                results[name].append((args.mails / result["seconds"],
                                      1e6 * main_cpu / args.mails, 1e6 * all_cpu / args.mails))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'fedhub server':48} {'mails/s':>8} {'reactor µs/mail':>16} {'all µs/mail':>12}")
    for name, label in PARTS:
        runs = results[name]
        print(f"{label:48} {statistics.median(r[0] for r in runs):8.0f} "
              f"{statistics.median(r[1] for r in runs):16.0f} "
              f"{statistics.median(r[2] for r in runs):12.0f}")
    print("(medians; the reactor thread's CPU and the whole process's, read from /proc)")
    return 0


def measure(kind: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """
    One throughput run against a fresh server of C{kind}.
    """
    server = Server(kind, extra)
    try:
        cpu = server.cpu()
        result = client(server.port, args.mails, args.connections, 0)
        result["server_cpu"] = server.cpu() - cpu
    finally:
        stats = server.stop()
    result["stats"] = stats
    result["rate"] = args.mails / result["seconds"]
    return result


def fedhub_extra(args: argparse.Namespace, scratch: str, run: str, profile: str | None = None) -> list[str]:
    """
    The arguments of a fedhub server with its own outbox directory.
    """
    directory = tempfile.mkdtemp(prefix=f"{run}-", dir=scratch)
    extra = ["--dir", os.path.join(directory, "outbox"), "--parse-workers", str(args.parse_workers)]
    if args.parse_inline_max is not None:
        extra += ["--parse-inline-max", str(args.parse_inline_max)]
    if not args.no_log:
        extra += ["--log", os.path.join(directory, "hub.log")]
    if profile is not None:
        extra += ["--profile", profile]
    return extra


def report(args: argparse.Namespace) -> int:
    """
    Run everything and print the table.
    """
    scratch = tempfile.mkdtemp(prefix="smtp-bench-", dir=args.dir)
    try:
        return _report(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _report(args: argparse.Namespace, scratch: str) -> int:
    print(f"{args.mails} mails of ~2 KB over {args.connections} connections, "
          f"{args.repeat} round(s); scratch {scratch}; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs", flush=True)
    print(f"fedhub has {args.parse_workers} parse worker process(es)"
          + (" (0: it parses every mail on the reactor thread)" if args.parse_workers == 0 else
             " for mails over 64 KiB (none here; smaller ones are parsed in process); their CPU"
             " counts as the server's"), flush=True)
    kinds = ["trivial", "aiosmtpd", "listener", "fedhub"]
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for round_ in range(args.repeat):
        order = kinds if round_ % 2 == 0 else kinds[::-1]
        for kind in order:
            profile = args.profile if (kind == "fedhub" and round_ == 0) else None
            extra = fedhub_extra(args, scratch, f"r{round_}", profile) if kind in ("fedhub", "listener") else []
            result = measure(kind, extra, args)
            runs[kind].append(result)
            print(f"  round {round_ + 1} {kind:9} {result['rate']:8.0f} mails/s  codes {result['codes']}",
                  flush=True)
    print()
    header = (f"{'server':10} {'mails/s':>9} {'best':>8} {'250s':>6} {'other':>6} "
              f"{'srv CPU µs/mail':>16} {'client CPU':>11}")
    print(header)
    print("-" * len(header))
    medians: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for kind, results in runs.items():
        rates = [r["rate"] for r in results]
        medians[kind] = statistics.median(rates)
        last = results[-1]
        ok = last["codes"].get("250", 0)
        other = sum(v for k, v in last["codes"].items() if k != "250")
        cpu_us = cpu[kind] = statistics.median(1e6 * r["server_cpu"] / args.mails for r in results)
        client_share = statistics.median(r["client_cpu"] / r["seconds"] for r in results)
        print(f"{kind:10} {medians[kind]:9.0f} {max(rates):8.0f} {ok:6d} {other:6d} "
              f"{cpu_us:16.0f} {100 * client_share:10.0f}%")
    print("(trivial: canned replies, the client's ceiling; aiosmtpd: counting handler; "
          "listener: fedhub's SMTP listener answering 250 unread; fedhub: the whole durable hand-over)")
    ratio = medians["fedhub"] / medians["aiosmtpd"]
    print()
    print(f"fedhub / aiosmtpd: {ratio:.2f}x in mails/s (target >= 1.0x); "
          f"{cpu['aiosmtpd'] / cpu['fedhub']:.2f}x by server CPU per mail")
    print(f"client ceiling / aiosmtpd: {medians['trivial'] / medians['aiosmtpd']:.1f}x, "
          f"/ fedhub: {medians['trivial'] / medians['fedhub']:.1f}x")
    for result in runs["fedhub"]:
        stats = result["stats"]
        if stats.get("consumed") != stats.get("accepted") or stats.get("accepted") != args.mails:
            print(f"WARNING: fedhub accepted {stats.get('accepted')} and delivered "
                  f"{stats.get('consumed')} of {args.mails} mails")
        else:
            print(f"fedhub run: {stats['accepted']} messages durable in {stats['transactions']} "
                  f"store transactions, all {stats['consumed']} delivered to the bus consumer")

    mails = max(1, int(args.rate * args.latency_seconds))
    server = Server("fedhub", fedhub_extra(args, scratch, "latency"))
    try:
        steady_result = client(server.port, mails, args.connections, 100_000, rate=args.rate)
    finally:
        server.stop()
    print()
    print(f"fedhub at a steady {args.rate:g} mails/s, {steady_result['samples']} mails: "
          f"250 after end of data p50 {steady_result['p50_ms']:.1f} ms, "
          f"p99 {steady_result['p99_ms']:.1f} ms, max {steady_result['max_ms']:.1f} ms "
          f"(target p99 <= 50 ms); codes {steady_result['codes']}, "
          f"sent late {steady_result['late']}")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    print()
    print(f"Where fedhub's {cpu['fedhub']:.0f} µs of server CPU per mail go: SMTP (the listener "
          f"alone) {cpu['listener']:.0f} µs; the hand-over steps measured on their own:")
    stages(2000)
    if args.profile:
        import pstats

        print()
        print(f"Profile of the first fedhub run ({args.profile}), by own time:")
        stats_ = pstats.Stats(args.profile)
        stats_.sort_stats("tottime").print_stats(25)
        print("By cumulative time:")
        stats_.sort_stats("cumulative").print_stats(40)
    return 0


def stages(count: int) -> int:
    """
    CPU time of each step of a mail's hand-over, measured one step at a time
    in this process over C{count} mails: what the listener spends beyond
    SMTP itself.
    """
    sys.path.insert(0, ROOT)
    from fedhub.outbox.store import encode
    from fedhub.producers.bugzilla.parser import parse_bugmail
    from fedhub.producers.bugzilla.producer import build_message, event_fingerprint
    from fedhub.schema import registry

    def topic(suffix: str) -> str:
        return f"{TOPIC_PREFIX}.{suffix}"

    mails = [bugmail(i) for i in range(count)]
    steps: list[tuple[str, Callable[[Any], Any]]] = [
        ("parse the mail", parse_bugmail),
        ("body and fingerprint (dedup)", event_fingerprint),
        # Reuses the body and fingerprint the step before kept with the event.
        ("build the message", lambda event: build_message(event, topic)),
        ("check it against its schema", registry.validate),
        ("encode it for the outbox", encode),
    ]
    values: list[Any] = mails
    total = 0.0
    print(f"CPU per mail over {count} mails, step by step:")
    for label, step in steps:
        began = time.process_time()
        results = [step(value) for value in values]
        spent = 1e6 * (time.process_time() - began) / count
        total += spent
        print(f"  {label:30} {spent:7.0f} µs")
        if label in ("parse the mail", "build the message"):
            values = results
    print(f"  {'total':30} {total:7.0f} µs")
    return 0


def main(argv: list[str]) -> int:
    """
    The command line: no sub-command runs the benchmark; C{serve} and
    C{client} are its worker processes.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve")
    serve.add_argument("kind", choices=["trivial", "aiosmtpd", "listener", "fedhub"])
    serve.add_argument("--dir")
    serve.add_argument("--log")
    serve.add_argument("--profile")
    serve.add_argument("--parse-workers", type=int, default=0)
    serve.add_argument("--parse-inline-max", type=int, default=None)
    serve.add_argument("--without", default="")
    parts = sub.add_parser("parts")
    parts.add_argument("--rounds", type=lambda text: max(1, int(text)), default=2)
    steps = sub.add_parser("stages")
    steps.add_argument("--mails", type=int, default=2000)
    worker = sub.add_parser("client")
    worker.add_argument("--port", type=int, required=True)
    worker.add_argument("--mails", type=int, required=True)
    worker.add_argument("--connections", type=int, required=True)
    worker.add_argument("--first", type=int, default=0)
    worker.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--mails", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--dir", default=None, help="scratch directory (its disk holds the outboxes)")
    parser.add_argument("--no-log", action="store_true", help="fedhub logs nowhere")
    parser.add_argument("--profile", default=None, help="profile the first fedhub run into FILE")
    parser.add_argument("--parse-workers", type=int, default=None,
                        help="parse worker processes of the fedhub server (default: the "
                        "bugzilla-smtp plugin's; 0 parses on the reactor thread)")
    parser.add_argument("--parse-inline-max", type=int, default=None,
                        help="with parse workers, mails of at most this many bytes are parsed on "
                        "the reactor thread (default: the plugin's parse_inline_max; 0: none)")
    args = parser.parse_args(argv)
    if args.command in (None, "parts") and args.parse_workers is None:
        sys.path.insert(0, ROOT)
        from fedhub.producers.bugzilla.producer import BugzillaSMTPPlugin

        args.parse_workers = int(BugzillaSMTPPlugin.options["parse_workers"].default)
    if args.command == "serve":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        without({part for part in args.without.split(",") if part})
        runners: dict[str, Callable[[], None]] = {
            "trivial": serve_trivial,
            "aiosmtpd": serve_aiosmtpd,
            "listener": lambda: serve_fedhub(args.dir, args.log, args.profile, handover=False),
            "fedhub": lambda: serve_fedhub(args.dir, args.log, args.profile,
                                           parse_workers=args.parse_workers,
                                           parse_inline_max=args.parse_inline_max),
        }
        runners[args.kind]()
        return 0
    if args.command == "stages":
        return stages(args.mails)
    if args.command == "parts":
        return parts_report(args)
    if args.command == "client":
        run_client(args)
        return 0
    return report(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
