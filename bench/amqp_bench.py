"""
The AMQP benchmark: fedhub's transport against pika and aio-pika, in one run,
on the same broker.

Every measurement runs in its own worker process (this file, started again
with C{worker ...}), so the resident memory it reports is that client's own.
The parent declares a fresh durable queue per run (bound to C{amq.topic}),
checks the queue depth a publish run left behind, feeds it to a consume run,
and deletes every queue and exchange it made at the end, even after a
failure.

Workloads (C{--count} messages of about 300 bytes of JSON, persistent):

  - C{publish}: pika and aio-pika without publisher confirms (the end is the
    broker's answer to a passive declare sent after the last message, so the
    broker has routed them all); pika and aio-pika with confirms, pipelined
    with a window of C{--window}; fedhub's L{AMQPBus}, which always
    publishes with confirms and C{mandatory}, with C{max_in_flight} set to
    the same window;
  - C{consume}: manual acknowledgement of every message, one by one, at
    prefetch 100 and 1000, from a queue filled with C{--count} messages;
  - C{latency}: one message every 5 ms (200 msg/s) for
    C{--latency-seconds}, published and consumed in the same process on one
    connection; the time from the publish call to the consumer callback;
  - the hub's paths: durable publishing through the L{Outbox} (hand-over,
    fsync'd SQLite, publish, confirm, delete; C{--outbox-concurrency}
    producers each waiting for their hand-over like SMTP sessions) and
    consuming through L{ConsumerService} with a plugin that does nothing,
    and the latency workload with the messages going to a
    L{ConsumerService} plugin (at concurrency 1, the default, and 100)
    instead of a bare callback.

Usage, from the checkout, with the shared broker at 127.0.0.1:5672::

    /work/venv/bin/python bench/amqp_bench.py [--count 50000] [--repeat 1]
        [--only fedhub,pika,aio-pika] [--latency-seconds 10] [--json out.json]

a few workloads alone, round after round in alternating order (a queue a
workload reads is filled by pika with confirms first, for every client)::

    /work/venv/bin/python bench/amqp_bench.py alternate [--rounds 5] [--count 50000]
        [--latency-seconds 10] fedhub:outbox pika:publish-confirm
        fedhub:runner:1000 pika:consume:1000 fedhub:runner-latency:1 pika:latency

(C{pika:publish-confirm-mandatory} there is pika publishing with confirms
and C{mandatory} set, as fedhub always does.)

and without a broker, what fedhub's protocol alone costs per message::

    /work/venv/bin/python bench/amqp_bench.py protocol [--fedhub-path DIR]

It prints a table of rates, CPU per message, memory and ratios against
pika.  It is run by hand and is no test: nothing fails when a target is not
met.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from common import (  # noqa: E402
    BROKER_HOST,
    BROKER_PORT,
    BROKER_URL,
    EXCHANGE,
    Meter,
    body_bytes,
    body_dict,
    emit,
    keep_out_of_collection,
    latency_summary,
    plain_messages,
    wire_headers,
)

WORKER_TIMEOUT = 600.0
"""Seconds a worker may take before the parent gives up on it."""

LATENCY_INTERVAL = 0.005
"""One message every 5 ms: 200 msg/s."""

LATENCY_WARMUP = 100
"""Latency samples left out at the start."""


# --- fedhub ----------------------------------------------------------------------


def fedhub_worker(args: argparse.Namespace) -> None:
    """
    Run one workload through fedhub's AMQPBus on Twisted's default reactor.
    """
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred, ensureDeferred

    from fedhub.amqp.transport import AMQPBus
    from fedhub.amqp.url import parse_url
    from fedhub.message import Message

    def messages(count: int) -> list[Message]:
        return [
            Message.create(args.topic, body_dict(seq), headers={"fedora_messaging_user_jdoe": True})
            for seq in range(count)
        ]

    def new_bus() -> AMQPBus:
        return AMQPBus(
            "bench",
            parse_url(BROKER_URL),
            reactor=reactor,
            exchange=EXCHANGE,
            max_in_flight=args.window,
        )

    class Countdown:
        def __init__(self, count: int) -> None:
            self.left = count
            self.done: Deferred[None] = Deferred()
            self.errors = 0

        def one(self, _: object = None) -> None:
            self.left -= 1
            if self.left == 0:
                self.done.callback(None)

        def failed(self, failure: Any) -> None:
            self.errors += 1
            if self.errors == 1:
                print(f"error: {failure.getErrorMessage()}", file=sys.stderr)
            self.one()

    async def publish(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        batch = messages(args.count)
        keep_out_of_collection()
        countdown = Countdown(len(batch))
        await bus.when_connected()
        meter.start()
        for message in batch:
            bus.publish(message).addCallbacks(countdown.one, countdown.failed)
        await countdown.done
        return meter.stop(args.count, errors=countdown.errors, confirms=True)

    async def consume(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        countdown = Countdown(args.count)

        def on_delivery(delivery: Any) -> None:
            delivery.ack()
            countdown.one()

        await bus.when_connected()
        meter.start()
        subscription = await bus.subscribe(args.queue, on_delivery, args.prefetch)
        await countdown.done
        result = meter.stop(args.count, prefetch=args.prefetch)
        await subscription.cancel()
        return result

    async def latency(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        latencies: list[float] = []
        total = int(args.latency_seconds / LATENCY_INTERVAL)
        countdown = Countdown(total)

        def on_delivery(delivery: Any) -> None:
            latencies.append(time.perf_counter() - delivery.message.body["sent"])
            delivery.ack()
            countdown.one()

        await bus.when_connected()
        await bus.subscribe(args.queue, on_delivery, 100)
        meter.start()
        await paced_publish(bus, total, countdown)
        await countdown.done
        return meter.stop(total, **latency_summary(latencies, LATENCY_WARMUP))

    async def paced_publish(bus: AMQPBus, total: int, countdown: Countdown) -> None:
        """
        Publish C{total} messages, one every L{LATENCY_INTERVAL}, each
        carrying the time it was made in its body.
        """
        start = time.perf_counter()
        for seq in range(total):
            delay = start + seq * LATENCY_INTERVAL - time.perf_counter()
            if delay > 0:
                await task.deferLater(reactor, delay, lambda: None)
            message = Message.create(
                args.topic,
                body_dict(seq, time.perf_counter()),
                headers={"fedora_messaging_user_jdoe": True},
            )
            bus.publish(message).addErrback(countdown.failed)

    async def outbox(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        from fedhub.outbox import Outbox

        directory = tempfile.mkdtemp(prefix="fedhub-bench-outbox-")
        box = Outbox(
            "bench",
            directory,
            bus,
            reactor,
            window=args.window,
            max_messages=args.count + 1,
            max_waiting=max(10_000, args.outbox_concurrency),
        )
        confirmed = Countdown(args.count)
        box.add_observer(lambda event, message_id: confirmed.one() if event == "confirmed" else None)
        batch = iter(messages(args.count))
        keep_out_of_collection()
        handover: list[float] = []
        box.startService()
        await bus.when_connected()
        while not box.store.is_open:
            await task.deferLater(reactor, 0.001, lambda: None)

        def next_one() -> None:
            message = next(batch, None)
            if message is None:
                return
            began = time.perf_counter()

            def done(_: object) -> None:
                handover.append(time.perf_counter() - began)
                next_one()

            def failed(failure: Any) -> None:
                print(f"hand-over failed: {failure.getErrorMessage()}", file=sys.stderr)
                next_one()

            box.publish(message).addCallbacks(done, failed)

        meter.start()
        for _ in range(min(args.outbox_concurrency, args.count)):
            next_one()
        await confirmed.done
        while box.store.pending_count:
            await task.deferLater(reactor, 0.001, lambda: None)
        result = meter.stop(
            args.count,
            concurrency=args.outbox_concurrency,
            handover_p50_ms=1000 * statistics.median(handover),
            handover_p99_ms=1000 * sorted(handover)[int(len(handover) * 0.99)],
        )
        await box.stopService()
        shutil.rmtree(directory, ignore_errors=True)
        return result

    def consumer_service(
        bus: AMQPBus, handle: Callable[[Message], None], concurrency: int
    ) -> Any:
        """
        A L{ConsumerService} on the run's queue whose plugin calls C{handle}.
        """
        from zope.interface import implementer

        from fedhub.config import ComponentConfig
        from fedhub.consumers.runner import ConsumerService
        from fedhub.interfaces import IMessageHandler

        @implementer(IMessageHandler)
        class Plugin:
            topics = (args.topic,)

            def handle(self, message: Message) -> None:
                handle(message)

            def start(self) -> None:
                return None

            def stop(self) -> None:
                return None

        component = ComponentConfig(
            kind="consumer",
            index=0,
            name="bench",
            plugin="bench",
            domain="bench",
            options={},
            topics=(args.topic,),
            queue=args.queue,
            concurrency=concurrency,
            max_retries=1,
        )
        return ConsumerService(component, Plugin(), bus, reactor)

    async def runner(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        service = consumer_service(bus, lambda message: None, args.prefetch)
        acked = Countdown(args.count)
        service.add_observer(lambda settled: acked.one() if settled.outcome == "acked" else None)
        await bus.when_connected()
        meter.start()
        service.startService()
        await acked.done
        result = meter.stop(args.count, prefetch=args.prefetch)
        await service.stopService()
        return result

    async def runner_latency(bus: AMQPBus, meter: Meter) -> dict[str, Any]:
        latencies: list[float] = []
        total = int(args.latency_seconds / LATENCY_INTERVAL)
        countdown = Countdown(total)

        def handle(message: Message) -> None:
            latencies.append(time.perf_counter() - message.body["sent"])
            countdown.one()

        # Concurrency from --prefetch: 1 is a consumer's default, 100 what
        # the bare latency workloads use as prefetch.  The consumer's own
        # prefetch is what it makes of that (a fedhub without the setting:
        # the concurrency).
        service = consumer_service(bus, handle, args.prefetch)
        await bus.when_connected()
        service.startService()
        while not service.consuming:
            await task.deferLater(reactor, 0.01, lambda: None)
        meter.start()
        await paced_publish(bus, total, countdown)
        await countdown.done
        result = meter.stop(total, concurrency=args.prefetch,
                            prefetch=getattr(service, "prefetch", args.prefetch),
                            **latency_summary(latencies, LATENCY_WARMUP))
        await service.stopService()
        return result

    workloads: dict[str, Callable[[AMQPBus, Meter], Any]] = {
        "publish-confirm": publish,
        "consume": consume,
        "latency": latency,
        "outbox": outbox,
        "runner": runner,
        "runner-latency": runner_latency,
    }

    async def main(_: Any) -> None:
        bus = new_bus()
        meter = Meter()
        bus.startService()
        try:
            result = await workloads[args.workload](bus, meter)
        finally:
            await bus.stopService()
        result["client"] = "fedhub"
        emit(result)

    task.react(lambda r: ensureDeferred(main(r)))


# --- pika --------------------------------------------------------------------------


def pika_worker(args: argparse.Namespace) -> None:
    """
    Run one workload through pika's SelectConnection.
    """
    import pika

    parameters = pika.ConnectionParameters(
        BROKER_HOST, BROKER_PORT, credentials=pika.PlainCredentials("guest", "guest")
    )
    meter = Meter()
    state: dict[str, Any] = {}

    def properties(message_id: str, headers: dict[str, Any]) -> Any:
        return pika.BasicProperties(
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            message_id=message_id,
            priority=0,
            headers=headers,
        )

    def publish(connection: Any, channel: Any) -> None:
        confirm = args.workload != "publish"
        # As fedhub always publishes: the broker then checks that every
        # message was routed somewhere, which costs it CPU per message.
        mandatory = args.workload == "publish-confirm-mandatory"
        batch = list(plain_messages(args.count))
        keep_out_of_collection()
        position = 0
        unconfirmed: list[int] = []  # a queue of delivery tags, oldest first
        head = 0
        single_acks: set[int] = set()
        published = 0

        def send_more() -> None:
            nonlocal position, published
            if confirm:
                room = args.window - (len(unconfirmed) - head)
            else:
                room = 1000
            end = min(len(batch), position + room)
            for item in batch[position:end]:
                channel.basic_publish(
                    EXCHANGE, args.topic, item.body, properties(item.message_id, item.headers),
                    mandatory=mandatory,
                )
                published += 1
                if confirm:
                    unconfirmed.append(published)
            position = end
            if not confirm:
                if position < len(batch):
                    connection.ioloop.call_later(0, send_more)
                else:
                    channel.queue_declare(args.queue, passive=True, callback=finished)

        def on_confirm(frame: Any) -> None:
            nonlocal head
            method = frame.method
            tag = method.delivery_tag
            if method.multiple:
                while head < len(unconfirmed) and unconfirmed[head] <= tag:
                    head += 1
            else:
                single_acks.add(tag)
            while head < len(unconfirmed) and unconfirmed[head] in single_acks:
                single_acks.discard(unconfirmed[head])
                head += 1
            if head == len(batch):
                finished(None)
            elif position < len(batch):
                send_more()

        def finished(_: Any) -> None:
            state["result"] = meter.stop(args.count, confirms=confirm)
            connection.close()

        def go(_: Any = None) -> None:
            meter.start()
            send_more()

        if confirm:
            channel.confirm_delivery(on_confirm, callback=go)
        else:
            go()

    def consume(connection: Any, channel: Any) -> None:
        count = 0

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            nonlocal count
            ch.basic_ack(delivery_tag=method.delivery_tag)
            count += 1
            if count == args.count:
                state["result"] = meter.stop(count, prefetch=args.prefetch)
                connection.close()

        def qos_ok(_: Any) -> None:
            channel.basic_consume(args.queue, on_message, auto_ack=False)

        meter.start()
        channel.basic_qos(prefetch_count=args.prefetch, callback=qos_ok)

    def consume_multiple(connection: Any, channel: Any) -> None:
        """
        consume+ack as fedhub's bus acknowledges: the messages handled in
        one turn of the I/O loop are acknowledged after it, with one
        basic.ack with multiple.
        """
        count = 0
        last = 0

        def flush() -> None:
            nonlocal last
            channel.basic_ack(delivery_tag=last, multiple=True)
            last = 0
            if count == args.count:
                state["result"] = meter.stop(count, prefetch=args.prefetch)
                connection.close()

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            nonlocal count, last
            if not last:
                connection.ioloop.call_later(0, flush)
            last = method.delivery_tag
            count += 1

        def qos_ok(_: Any) -> None:
            channel.basic_consume(args.queue, on_message, auto_ack=False)

        meter.start()
        channel.basic_qos(prefetch_count=args.prefetch, callback=qos_ok)

    def latency(connection: Any, channel: Any) -> None:
        total = int(args.latency_seconds / LATENCY_INTERVAL)
        latencies: list[float] = []
        count = 0
        seq = 0
        start = 0.0

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            nonlocal count
            latencies.append(time.perf_counter() - json.loads(body)["sent"])
            ch.basic_ack(delivery_tag=method.delivery_tag)
            count += 1
            if count == total:
                state["result"] = meter.stop(total, **latency_summary(latencies, LATENCY_WARMUP))
                connection.close()

        def tick() -> None:
            nonlocal seq
            body = body_bytes(body_dict(seq, time.perf_counter()))
            state["publish_channel"].basic_publish(
                EXCHANGE, args.topic, body, properties(str(uuid.uuid4()), wire_headers())
            )
            seq += 1
            if seq < total:
                delay = start + seq * LATENCY_INTERVAL - time.perf_counter()
                connection.ioloop.call_later(max(0.0, delay), tick)

        def begin(_: Any = None) -> None:
            nonlocal start
            meter.start()
            start = time.perf_counter()
            tick()

        def publish_channel_open(publish_channel: Any) -> None:
            state["publish_channel"] = publish_channel
            # Confirms on, as fedhub always has them; their answers are ignored.
            publish_channel.confirm_delivery(lambda frame: None, callback=begin)

        def consuming(_: Any) -> None:
            connection.channel(on_open_callback=publish_channel_open)

        def qos_ok(_: Any) -> None:
            channel.basic_consume(args.queue, on_message, auto_ack=False, callback=consuming)

        channel.basic_qos(prefetch_count=100, callback=qos_ok)

    workloads: dict[str, Callable[[Any, Any], None]] = {
        "publish": publish,
        "publish-confirm": publish,
        "publish-confirm-mandatory": publish,
        "consume": consume,
        "consume-multiple": consume_multiple,
        "latency": latency,
    }

    def on_open(connection: Any) -> None:
        connection.channel(on_open_callback=lambda channel: workloads[args.workload](connection, channel))

    def on_error(connection: Any, error: Any) -> None:
        print(f"connection failed: {error}", file=sys.stderr)
        connection.ioloop.stop()

    connection = pika.SelectConnection(
        parameters,
        on_open_callback=on_open,
        on_open_error_callback=on_error,
        on_close_callback=lambda connection, reason: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    result = state.get("result")
    if result is None:
        raise SystemExit("the pika worker did not finish")
    result["client"] = "pika"
    emit(result)


# --- aio-pika ------------------------------------------------------------------------


def aiopika_worker(args: argparse.Namespace) -> None:
    """
    Run one workload through aio-pika on asyncio.
    """
    import asyncio

    import aio_pika

    def message(message_id: str, body: bytes, headers: dict[str, Any]) -> Any:
        return aio_pika.Message(
            body,
            headers=headers,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            priority=0,
        )

    async def publish(connection: Any, meter: Meter) -> dict[str, Any]:
        confirm = args.workload == "publish-confirm"
        batch = [message(p.message_id, p.body, p.headers) for p in plain_messages(args.count)]
        keep_out_of_collection()
        channel = await connection.channel(publisher_confirms=confirm)
        exchange = await channel.get_exchange(EXCHANGE)
        meter.start()
        if not confirm:
            for item in batch:
                await exchange.publish(item, routing_key=args.topic)
            await channel.declare_queue(args.queue, passive=True)
        else:
            window = asyncio.Semaphore(args.window)
            tasks: set[asyncio.Task[Any]] = set()

            def done(finished: asyncio.Task[Any]) -> None:
                tasks.discard(finished)
                window.release()

            for item in batch:
                await window.acquire()
                publishing = asyncio.ensure_future(exchange.publish(item, routing_key=args.topic))
                tasks.add(publishing)
                publishing.add_done_callback(done)
            while tasks:
                await asyncio.gather(*list(tasks))
        return meter.stop(args.count, confirms=confirm)

    async def consume(connection: Any, meter: Meter) -> dict[str, Any]:
        finished = asyncio.get_running_loop().create_future()
        count = 0

        async def on_message(incoming: Any) -> None:
            nonlocal count
            await incoming.ack()
            count += 1
            if count == args.count and not finished.done():
                finished.set_result(None)

        meter.start()
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.declare_queue(args.queue, passive=True)
        await queue.consume(on_message, no_ack=False)
        await finished
        return meter.stop(args.count, prefetch=args.prefetch)

    async def latency(connection: Any, meter: Meter) -> dict[str, Any]:
        total = int(args.latency_seconds / LATENCY_INTERVAL)
        finished = asyncio.get_running_loop().create_future()
        latencies: list[float] = []

        async def on_message(incoming: Any) -> None:
            latencies.append(time.perf_counter() - json.loads(incoming.body)["sent"])
            await incoming.ack()
            if len(latencies) == total and not finished.done():
                finished.set_result(None)

        consuming = await connection.channel()
        await consuming.set_qos(prefetch_count=100)
        queue = await consuming.declare_queue(args.queue, passive=True)
        await queue.consume(on_message, no_ack=False)
        publishing = await connection.channel(publisher_confirms=True)
        exchange = await publishing.get_exchange(EXCHANGE)
        tasks: set[asyncio.Task[Any]] = set()
        meter.start()
        start = time.perf_counter()
        for seq in range(total):
            delay = start + seq * LATENCY_INTERVAL - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = body_bytes(body_dict(seq, time.perf_counter()))
            sending = asyncio.ensure_future(
                exchange.publish(message(str(uuid.uuid4()), body, wire_headers()), routing_key=args.topic)
            )
            tasks.add(sending)
            sending.add_done_callback(tasks.discard)
        await finished
        return meter.stop(total, **latency_summary(latencies, LATENCY_WARMUP))

    workloads = {
        "publish": publish,
        "publish-confirm": publish,
        "consume": consume,
        "latency": latency,
    }

    async def main() -> None:
        connection = await aio_pika.connect(BROKER_URL)
        meter = Meter()
        try:
            result = await workloads[args.workload](connection, meter)
        finally:
            await connection.close()
        result["client"] = "aio-pika"
        emit(result)

    asyncio.run(main())


# --- protocol only, no broker ------------------------------------------------------


def protocol_bench(args: argparse.Namespace) -> None:
    """
    What the AMQP protocol alone costs per message, without a broker: an
    C{AMQPClient} fed a stream of deliveries and writing publishes and acks
    to a C{StringTransport}.  The best of seven runs, in CPU time, so it
    holds still on a busy machine.
    """
    sys.path.insert(0, os.path.abspath(args.fedhub_path))
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from txamqp.connection import Frame, Method

    from fedhub.amqp.codec import body_frame, content_header_frame, pack_frame
    from fedhub.amqp.protocol import AMQPClient, NullConnectionEvents
    from fedhub.amqp.spec import load_spec
    from fedhub.message import Message, from_amqp

    spec = load_spec()
    count: int = min(int(args.count), 5000)

    def frame(channel: int, name: str, *fields: Any) -> bytes:
        return pack_frame(spec, Frame(channel, Method(spec.parse_method(name), *fields)))  # type: ignore[no-any-return]

    wire = {f.name.replace("-", "_"): f.name for f in spec.classes.byname["basic"].fields}

    class Counter(NullConnectionEvents):
        delivered = 0

        def basic_deliver(self, *delivery: Any) -> None:  # type: ignore[override]
            self.delivered += 1

    client = AMQPClient(spec, clock=Clock())
    events = Counter()
    client.events = events
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(
        frame(0, "connection.start", 0, 9, {"product": "RabbitMQ"}, b"PLAIN", b"en_US")
        + frame(0, "connection.tune", 2047, 131072, 60)
    )
    client.open()
    client.dataReceived(frame(0, "connection.open-ok", ""))
    client.open_channel()
    client.dataReceived(frame(1, "channel.open-ok", b""))
    messages = [
        Message.create("org.fedoraproject.bench.x", body_dict(seq), headers={"fedora_messaging_user_jdoe": True})
        for seq in range(count)
    ]
    properties = [m.amqp_properties() for m in messages]
    stream = b"".join(
        frame(1, "basic.deliver", "ctag", seq + 1, False, EXCHANGE, m.topic)
        + pack_frame(spec, content_header_frame(spec, 1, len(m.body_bytes), {wire[k]: v for k, v in p.items()}))
        + pack_frame(spec, body_frame(1, m.body_bytes))
        for seq, (m, p) in enumerate(zip(messages, properties))
    )
    reads = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]

    def best(action: Callable[[], object]) -> float:
        fastest = float("inf")
        for _ in range(7):
            began = time.process_time()
            action()
            fastest = min(fastest, time.process_time() - began)
        return 1e6 * fastest / count

    def deliver() -> None:
        for data in reads:
            client.dataReceived(data)

    def publish() -> None:
        transport.clear()
        for message, props in zip(messages, properties):
            client.basic_publish(1, EXCHANGE, message.topic, message.body_bytes, props, True)

    def ack() -> None:
        transport.clear()
        for seq in range(count):
            client.send_method(1, "basic.ack", seq + 1, False)

    results = {
        "receive a delivery": best(deliver),
        "encode and write a publish": best(publish),
        "write an ack": best(ack),
        "for scale: Message.amqp_properties()": best(lambda: [m.amqp_properties() for m in messages]),
        "for scale: from_amqp()": best(
            lambda: [from_amqp(m.topic, p, m.body_bytes, queue="q") for m, p in zip(messages, properties)]
        ),
    }
    if events.delivered != 7 * count:
        raise SystemExit(f"{events.delivered} deliveries reported, {7 * count} expected")
    print(f"protocol only, {count} messages, best of 7, CPU time; fedhub from {os.path.abspath(args.fedhub_path)}")
    for name, micros in results.items():
        print(f"  {name:<40} {micros:7.1f} us/msg")


WORKERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "fedhub": fedhub_worker,
    "pika": pika_worker,
    "aio-pika": aiopika_worker,
}


# --- the parent ----------------------------------------------------------------------


class Broker:
    """
    The parent's administrative connection: fresh queues, their depth, and
    deleting everything made.
    """

    def __init__(self) -> None:
        import pika

        self._pika = pika
        self.connection = pika.BlockingConnection(
            pika.ConnectionParameters(
                BROKER_HOST, BROKER_PORT, credentials=pika.PlainCredentials("guest", "guest")
            )
        )
        self.channel = self.connection.channel()
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.prefix = f"fedhub.bench.{uuid.uuid4().hex[:10]}"
        self.made = 0

    def fresh(self) -> tuple[str, str]:
        """
        A new durable queue bound to C{amq.topic} with a topic of its own.

        It carries the dead-letter argument that fedhub's consumer runner
        declares its queues with, so the runner can use any of them.

        @return: the queue's name and its topic.
        """
        self.made += 1
        queue = f"{self.prefix}.{self.made}"
        topic = f"org.fedoraproject.bench.{self.prefix.rsplit('.', 1)[1]}.q{self.made}"
        self.queues.append(queue)
        self.channel.queue_declare(
            queue, durable=True, arguments={"x-dead-letter-exchange": f"{queue}.dead"}
        )
        self.channel.queue_bind(queue, EXCHANGE, topic)
        # What a consumer runner on this queue declares besides (max_retries=1).
        self.queues += [f"{queue}.dead", f"{queue}.retry.1"]
        self.exchanges += [f"{queue}.dead", f"{queue}.return", f"{queue}.retry.1"]
        return queue, topic

    def depth(self, queue: str) -> int:
        """Messages ready in a queue."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def wait_depth(self, queue: str, expected: int, timeout: float = 30.0) -> int:
        """
        Wait until a queue holds C{expected} messages (or the timeout passed);
        return what it holds.
        """
        deadline = time.monotonic() + timeout
        depth = self.depth(queue)
        while depth != expected and time.monotonic() < deadline:
            self.connection.sleep(0.2)
            depth = self.depth(queue)
        return depth

    def cleanup(self) -> None:
        """Delete every queue and exchange made (those that exist)."""
        for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
            for name in names:
                try:
                    if self.channel.is_closed:
                        self.channel = self.connection.channel()
                    if kind == "queue":
                        self.channel.queue_delete(name)
                    else:
                        self.channel.exchange_delete(name)
                except Exception as e:  # pragma: no cover - best effort
                    print(f"could not delete {kind} {name}: {e}", file=sys.stderr)
        self.connection.close()


def run_worker(client: str, workload: str, queue: str, topic: str, args: argparse.Namespace,
               prefetch: int = 100) -> dict[str, Any]:
    """
    Run one worker process and return its result (or an C{error}).
    """
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "worker",
        client,
        workload,
        "--queue",
        queue,
        "--topic",
        topic,
        "--count",
        str(args.count),
        "--prefetch",
        str(prefetch),
        "--window",
        str(args.window),
        "--latency-seconds",
        str(args.latency_seconds),
        "--outbox-concurrency",
        str(args.outbox_concurrency),
        "--fedhub-path",
        args.fedhub_path,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=WORKER_TIMEOUT, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"client": client, "error": "timed out"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {"client": client, "error": " / ".join(tail) or f"exit {done.returncode}"}


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """
    Run every workload once and return the results by row name.
    """
    clients = [c for c in ("fedhub", "pika", "aio-pika") if c in args.only]
    rows: dict[str, list[dict[str, Any]]] = {}
    broker = Broker()

    def add(row: str, result: dict[str, Any]) -> None:
        rows.setdefault(row, []).append(result)
        if "error" in result:
            print(f"  {row:<34} {result['client']:<9} ERROR {result['error']}", flush=True)
        else:
            extra = ""
            if "p50_ms" in result:
                extra = f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
            print(
                f"  {row:<34} {result['client']:<9} {result['rate']:>9.0f} msg/s"
                f"  {result['cpu_us_per_msg']:>6.1f} us/msg  peak {result['peak_kib'] / 1024:.0f} MiB"
                + extra,
                flush=True,
            )

    def publish(client: str, workload: str, row: str) -> tuple[str, str] | None:
        """Publish into a fresh queue; the queue when it holds every message."""
        queue, topic = broker.fresh()
        result = run_worker(client, workload, queue, topic, args)
        depth = broker.wait_depth(queue, args.count)
        if "error" not in result and depth != args.count:
            result["error"] = f"the queue holds {depth} messages, not {args.count}"
        if row:
            add(row, result)
        return (queue, topic) if depth == args.count else None

    # Workload by workload, every client in turn, so that the rows compared
    # are measured minutes apart at most.
    try:
        filled: dict[str, tuple[str, str] | None] = {}
        for client in clients:
            filled[client] = publish(client, "publish-confirm", "publish, confirms, persistent")
        for client in clients:
            target = filled[client]
            if target is not None:
                queue, topic = target
                add("consume+ack, prefetch 1000", run_worker(client, "consume", queue, topic, args, 1000))
        for client in clients:
            if client == "fedhub":
                filled[client] = publish(client, "outbox", "durable publish (outbox)")
            else:
                filled[client] = publish(client, "publish", "publish, no confirms")
        for client in clients:
            target = filled[client]
            if target is not None:
                queue, topic = target
                add("consume+ack, prefetch 100", run_worker(client, "consume", queue, topic, args, 100))
        if "fedhub" in clients:
            for prefetch in (100, 1000):
                row = f"consume via ConsumerService, {prefetch}"
                pre = publish("pika", "publish-confirm", "")
                if pre is None:
                    add(row, {"client": "fedhub", "error": "could not fill the queue"})
                    continue
                queue, topic = pre
                add(row, run_worker("fedhub", "runner", queue, topic, args, prefetch))
        for client in clients:
            queue, topic = broker.fresh()
            add("latency at 200 msg/s", run_worker(client, "latency", queue, topic, args))
        if "fedhub" in clients:
            for concurrency in (1, 100):
                queue, topic = broker.fresh()
                add(f"latency to a ConsumerService plugin, {concurrency}",
                    run_worker("fedhub", "runner-latency", queue, topic, args, concurrency))
    finally:
        broker.cleanup()
    return rows


ORDER = [
    "publish, no confirms",
    "publish, confirms, persistent",
    "durable publish (outbox)",
    "consume+ack, prefetch 100",
    "consume+ack, prefetch 1000",
    "consume via ConsumerService, 100",
    "consume via ConsumerService, 1000",
    "latency at 200 msg/s",
    "latency to a ConsumerService plugin, 1",
    "latency to a ConsumerService plugin, 100",
]

COMPARE_WITH = {
    # The fair pika row for each fedhub row.
    "durable publish (outbox)": "publish, confirms, persistent",
    "consume via ConsumerService, 100": "consume+ack, prefetch 100",
    "consume via ConsumerService, 1000": "consume+ack, prefetch 1000",
    "latency to a ConsumerService plugin, 1": "latency at 200 msg/s",
    "latency to a ConsumerService plugin, 100": "latency at 200 msg/s",
}


def summarize(runs: list[dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """
    The median of each measure over the repetitions, by row and client.
    """
    table: list[dict[str, Any]] = []
    for row in ORDER:
        for client in ("fedhub", "pika", "aio-pika"):
            results = [
                r for run in runs for r in run.get(row, []) if r.get("client") == client and "error" not in r
            ]
            errors = [
                r["error"] for run in runs for r in run.get(row, []) if r.get("client") == client and "error" in r
            ]
            if not results and not errors:
                continue
            entry: dict[str, Any] = {"row": row, "client": client, "runs": len(results), "errors": errors}
            for key in ("rate", "cpu_us_per_msg", "peak_kib", "rss_before_kib", "p50_ms", "p99_ms",
                        "max_ms", "handover_p50_ms", "handover_p99_ms"):
                values = [r[key] for r in results if key in r]
                if values:
                    entry[key] = statistics.median(values)
            table.append(entry)
    return table


def render(table: list[dict[str, Any]]) -> str:
    """
    The summary as a text table with ratios against pika.
    """
    pika_rates = {e["row"]: e["rate"] for e in table if e["client"] == "pika" and "rate" in e}
    pika_latency = {e["row"]: e["p99_ms"] for e in table if e["client"] == "pika" and "p99_ms" in e}
    lines = [
        f"{'workload':<42} {'client':<9} {'msg/s':>8} {'vs pika':>8} {'CPU us/msg':>10}"
        f" {'peak RSS':>9} {'base RSS':>9} {'p50 ms':>7} {'p99 ms':>7}",
        "-" * 118,
    ]
    for e in table:
        if "rate" not in e:
            lines.append(f"{e['row']:<42} {e['client']:<9} ERROR {'; '.join(e['errors'])}")
            continue
        compare = COMPARE_WITH.get(e["row"], e["row"])
        ratio = ""
        if compare == "latency at 200 msg/s":
            if compare in pika_latency and e.get("p99_ms"):
                ratio = f"{pika_latency[compare] / e['p99_ms']:.2f}x"
        elif compare in pika_rates:
            ratio = f"{e['rate'] / pika_rates[compare]:.2f}x"
        p50 = f"{e['p50_ms']:.2f}" if "p50_ms" in e else ""
        p99 = f"{e['p99_ms']:.2f}" if "p99_ms" in e else ""
        if "handover_p50_ms" in e:
            p50 = f"{e['handover_p50_ms']:.2f}"
            p99 = f"{e['handover_p99_ms']:.2f}"
        lines.append(
            f"{e['row']:<42} {e['client']:<9} {e['rate']:>8.0f} {ratio:>8} {e['cpu_us_per_msg']:>10.1f}"
            f" {e['peak_kib'] / 1024:>7.0f}Mi {e['rss_before_kib'] / 1024:>7.0f}Mi {p50:>7} {p99:>7}"
        )
    lines.append("")
    lines.append(
        "Ratios: fedhub and aio-pika against pika on the same row; the outbox against pika's"
        " confirmed publishing, ConsumerService against pika's consume+ack at the same prefetch;"
        " for latency, pika's p99 over the client's p99 (above 1 is better than pika); the"
        " ConsumerService latency (publish call to the plugin's handle, at concurrency 1, a"
        " consumer's default, and 100, the bare workloads' prefetch) against pika's"
        " publish-to-callback latency."
    )
    lines.append(
        "fedhub publishes only with confirms, persistent and mandatory; compare it with the"
        " 'publish, confirms, persistent' rows.  p50/p99 of the outbox row are hand-over times"
        " (until the message is fsync'd).  Base RSS: the worker before the measured phase, with"
        " the publish rows' messages already built; peak RSS: its high-water mark."
    )
    return "\n".join(lines)


#: The workloads that read a queue: C{alternate} fills it first.
_READERS = ("consume", "consume-multiple", "runner")

#: The workloads that fill their queue: C{alternate} waits until it holds them all.
_WRITERS = ("publish", "publish-confirm", "publish-confirm-mandatory", "outbox")


def parse_spec(spec: str) -> tuple[str, str, int]:
    """
    C{CLIENT:WORKLOAD[:PREFETCH]} as client, workload and prefetch (100
    when not given).
    """
    client, workload, *rest = spec.split(":")
    return client, workload, int(rest[0]) if rest else 100


def describe(result: dict[str, Any]) -> str:
    """
    One worker's result on one line: rate, CPU, and the latencies if any.
    """
    latency = (f"  p50 {result['p50_ms']:.2f} ms  p90 {result['p90_ms']:.2f} ms"
               f"  p99 {result['p99_ms']:.2f} ms  stalls {result['stalls']}"
               f" ({100 * result['stalled_share']:.1f} % of messages)"
               if "p99_ms" in result else "")
    broker = (f"  broker {result['broker_cpu_us_per_msg']:>6.1f} us/msg"
              if "broker_cpu_us_per_msg" in result else "")
    return (f"{result.get('rate', 0):>9.0f} msg/s  {result.get('cpu_us_per_msg', 0):>6.1f} us/msg"
            f"{broker}{latency}  {result.get('error', '')}")


def together(broker: Broker, args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """
    One round of C{--together}: every spec's worker at the same time, each
    on a queue of its own, so that whatever stalls the machine or the broker
    in that round stalls all of them.  For the latency workloads, whose 200
    messages a second leave the machine nearly idle.
    """
    with ThreadPoolExecutor(len(args.specs)) as pool:
        running = {}
        for spec in args.specs:
            client, workload, prefetch = parse_spec(spec)
            queue, topic = broker.fresh()
            running[spec] = pool.submit(run_worker, client, workload, queue, topic, args, prefetch)
        return [(spec, future.result()) for spec, future in running.items()]


def paired(results: dict[str, list[dict[str, Any]]]) -> None:
    """
    For rounds run together: how often each spec had the lowest p99 of its
    round, and its p99 over the lowest of the others, round by round.
    """
    specs = [spec for spec, runs in results.items() if runs and all("p99_ms" in r for r in runs)]
    if len(specs) < 2:
        return
    rounds = len(results[specs[0]])
    print("p99 round by round, run together (the same stalls hit every client of a round):")
    for spec in specs:
        ratios = []
        lowest = 0
        for number in range(rounds):
            mine = results[spec][number]["p99_ms"]
            others = min(results[other][number]["p99_ms"] for other in specs if other != spec)
            ratios.append(mine / others)
            lowest += mine <= others
        print(f"  {spec:<28} lowest in {lowest} of {rounds}; p99 / the best other's:"
              f" median {statistics.median(ratios):.2f} (per round"
              f" {', '.join(f'{r:.2f}' for r in ratios)})")


def alternate(args: argparse.Namespace) -> None:
    """
    Run single workloads round after round, the order reversed every other
    round, and print each result and the medians: a closer comparison of a
    few rows than the whole benchmark gives, as every round measures them
    minutes apart at most.  A workload that reads a queue gets one filled by
    pika with confirms first, whatever client reads it, so both read queues
    made the same way.
    """
    broker = Broker()
    results: dict[str, list[dict[str, Any]]] = {spec: [] for spec in args.specs}
    try:
        for number in range(args.rounds):
            if args.together:
                for spec, result in together(broker, args):
                    results[spec].append(result)
                    print(f"  round {number + 1} {spec:<28} {describe(result)}", flush=True)
                continue
            order = args.specs if number % 2 == 0 else args.specs[::-1]
            for spec in order:
                client, workload, prefetch = parse_spec(spec)
                queue, topic = broker.fresh()
                if workload in _READERS:
                    run_worker("pika", "publish-confirm", queue, topic, args)
                    broker.wait_depth(queue, args.count)
                result = run_worker(client, workload, queue, topic, args, prefetch)
                if workload in _WRITERS:
                    broker.wait_depth(queue, args.count)
                results[spec].append(result)
                print(f"  round {number + 1} {spec:<28} {describe(result)}", flush=True)
    finally:
        broker.cleanup()
    print()
    if args.together:
        paired(results)
    for spec, runs in results.items():
        rates = [r.get("rate", 0.0) for r in runs]
        line = f"{spec:<28} median {statistics.median(rates):>9.0f} msg/s"
        if runs and all("cpu_us_per_msg" in r for r in runs):
            line += f"  {statistics.median(r['cpu_us_per_msg'] for r in runs):6.1f} us/msg"
        if runs and all("broker_cpu_us_per_msg" in r for r in runs):
            line += f"  broker {statistics.median(r['broker_cpu_us_per_msg'] for r in runs):6.1f} us/msg"
        if runs and all("p99_ms" in r for r in runs):
            tails = ", ".join(f"{r['p99_ms']:.2f}" for r in runs)
            line += (f"  p50 {statistics.median(r['p50_ms'] for r in runs):.2f} ms"
                     f"  p90 {statistics.median(r['p90_ms'] for r in runs):.2f} ms"
                     f"  p99 {statistics.median(r['p99_ms'] for r in runs):.2f} ms (per round {tails})"
                     f"  stalled {statistics.median(r['stalled_share'] for r in runs) * 100:.1f} %")
        print(line)


def main() -> None:
    """
    Parse the command line; run the parent or a worker.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1000, help="unconfirmed messages at once")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--outbox-concurrency", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", default="fedhub,pika,aio-pika")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--fedhub-path",
        default=ROOT,
        help="import fedhub from this directory (to measure another version)",
    )
    if len(sys.argv) > 1 and sys.argv[1] == "protocol":
        parser.add_argument("protocol")
        protocol_bench(parser.parse_args())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "alternate":
        parser.add_argument("alternate")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--together", action="store_true",
                            help="run the specs of a round at the same time (latency workloads)")
        parser.add_argument("specs", nargs="+", metavar="CLIENT:WORKLOAD[:PREFETCH]")
        args = parser.parse_args()
        for spec in args.specs:
            client, _, workload = spec.partition(":")
            if client not in WORKERS or not workload:
                parser.error(f"{spec!r}: expected CLIENT:WORKLOAD[:PREFETCH], CLIENT one of "
                             f"{', '.join(sorted(WORKERS))}")
        alternate(args)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        parser.add_argument("worker")
        parser.add_argument("client", choices=sorted(WORKERS))
        parser.add_argument("workload")
        parser.add_argument("--queue", required=True)
        parser.add_argument("--topic", required=True)
        parser.add_argument("--prefetch", type=int, default=100)
        args = parser.parse_args()
        sys.path.insert(0, os.path.abspath(args.fedhub_path))
        WORKERS[args.client](args)
        return
    args = parser.parse_args()
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    print(f"AMQP benchmark: {args.count} messages, window {args.window}, {os.cpu_count()} CPUs,"
          f" fedhub from {os.path.abspath(args.fedhub_path)}", flush=True)
    runs = []
    for number in range(args.repeat):
        print(f"run {number + 1} of {args.repeat}", flush=True)
        runs.append(measure(args))
    table = summarize(runs)
    print()
    print(render(table))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "table": table, "runs": runs}, out, indent=1)


if __name__ == "__main__":
    main()
