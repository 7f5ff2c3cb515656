#!/usr/bin/env python
"""
Capture frames from the local RabbitMQ for C{tests/test_amqp_codec.py}.

Run from the repository root against the broker on 127.0.0.1 (guest/guest):

    python tests/data/amqp/capture.py [--port 5672]

It speaks AMQP over a plain socket with C{fedhub.amqp}'s spec and frame
codec, records every byte the broker sends, and writes chosen frames (as
received, frame header and end octet included) next to this file:

  - C{connection-start.bin}: the broker's greeting with its server properties;
  - C{confirm-ack.bin}: the C{basic.ack} confirming the publish;
  - C{dead-letter-get-ok.bin}, C{dead-letter-header.bin},
    C{dead-letter-body.bin}: a message published with a header of every
    field type to a queue with C{x-message-ttl} 0, dead-lettered at once
    through a fanout exchange into a second queue, and fetched from there
    with C{basic.get}; RabbitMQ re-encodes the headers and adds C{x-death}.

Only 127.0.0.1 is contacted.  The queues are exclusive and the exchange is
deleted before the script ends.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from fedhub.amqp.codec import (  # noqa: E402
    FieldValue,
    body_frame,
    content_header_frame,
    method_frame,
    pack_frame,
    unpack_frame,
)
from fedhub.amqp.spec import load_spec  # noqa: E402

HOST = "127.0.0.1"
EXCHANGE = "fedhub.capture.dlx"
EXPIRING = "fedhub.capture.expiring"
DEAD = "fedhub.capture.dead"

EVERY_TYPE: dict[str, Any] = {
    "fedhub-bool": True,
    "fedhub-int8": FieldValue("b", -5),
    "fedhub-uint8": FieldValue("B", 250),
    "fedhub-int16": FieldValue("s", -300),
    "fedhub-uint16": FieldValue("u", 65000),
    "fedhub-int32": -70000,
    "fedhub-uint32": FieldValue("i", 4000000000),
    "fedhub-int64": 2**40,
    "fedhub-int64-L": FieldValue("L", 7),
    "fedhub-float": FieldValue("f", 0.25),
    "fedhub-double": 3.5,
    "fedhub-decimal": Decimal("12.34"),
    "fedhub-string": "h\u00e9llo",
    "fedhub-bytes": b"\x00\xff",
    "fedhub-array": [1, "two", [3]],
    "fedhub-time": datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc),
    "fedhub-table": {"nested": {"deeper": True}},
    "fedhub-void": None,
}
"""The headers of the published message: one value of each field type."""


class RawClient:
    """
    A blocking, single-channel AMQP client that keeps every received frame.
    """

    def __init__(self, sock: socket.socket, spec: Any) -> None:
        self.sock = sock
        self.spec = spec
        self.pending = b""
        self.received: list[bytes] = []

    def send_method(self, channel: int, name: str, *args: Any) -> None:
        self.sock.sendall(pack_frame(self.spec, method_frame(self.spec, channel, name, *args)))

    def send_content(self, channel: int, body: bytes, properties: dict[str, Any]) -> None:
        header = content_header_frame(self.spec, channel, len(body), properties)
        self.sock.sendall(pack_frame(self.spec, header))
        self.sock.sendall(pack_frame(self.spec, body_frame(channel, body)))

    def read_frame(self) -> tuple[bytes, Any]:
        while True:
            if len(self.pending) >= 7:
                (size,) = struct.unpack_from("!I", self.pending, 3)
                if len(self.pending) >= size + 8:
                    raw = self.pending[: size + 8]
                    self.pending = self.pending[size + 8 :]
                    self.received.append(raw)
                    return raw, unpack_frame(self.spec, raw)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            self.pending += chunk

    def expect(self, name: str) -> tuple[bytes, Any]:
        wanted = self.spec.parse_method(name)
        while True:
            raw, frame = self.read_frame()
            if frame.payload.type == "frame_method":
                if frame.payload.method is wanted:
                    return raw, frame
                raise RuntimeError(f"expected {name}, got {frame.payload}")


def capture(port: int) -> dict[str, bytes]:
    """
    Run the scenario and return the chosen frames by file name.
    """
    spec = load_spec()
    out: dict[str, bytes] = {}
    with socket.create_connection((HOST, port), timeout=10) as sock:
        client = RawClient(sock, spec)
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        out["connection-start.bin"], _ = client.expect("connection.start")
        client.send_method(
            0,
            "connection.start-ok",
            {"product": "fedhub capture", "capabilities": {"publisher_confirms": True}},
            "PLAIN",
            "\0guest\0guest",
            "en_US",
        )
        _, tune = client.expect("connection.tune")
        channel_max, frame_max, _ = tune.payload.args
        client.send_method(0, "connection.tune-ok", channel_max, frame_max, 0)
        client.send_method(0, "connection.open", "/", "", False)
        client.expect("connection.open-ok")
        client.send_method(1, "channel.open", "")
        client.expect("channel.open-ok")

        client.send_method(1, "exchange.declare", 0, EXCHANGE, "fanout", False, False, True, False, False, {})
        client.expect("exchange.declare-ok")
        client.send_method(1, "queue.declare", 0, DEAD, False, False, True, False, False, {})
        client.expect("queue.declare-ok")
        client.send_method(1, "queue.bind", 0, DEAD, EXCHANGE, "", False, {})
        client.expect("queue.bind-ok")
        arguments = {"x-dead-letter-exchange": EXCHANGE, "x-message-ttl": 0}
        client.send_method(1, "queue.declare", 0, EXPIRING, False, False, True, False, False, arguments)
        client.expect("queue.declare-ok")

        client.send_method(1, "confirm.select", False)
        client.expect("confirm.select-ok")
        client.send_method(1, "basic.publish", 0, "", EXPIRING, True, False)
        properties = {
            "content-type": "application/json",
            "delivery-mode": 2,
            "message-id": "6f1a2b3c-0000-4000-8000-000000000001",
            "headers": EVERY_TYPE,
        }
        client.send_content(1, b'{"hello": "world"}', properties)
        out["confirm-ack.bin"], _ = client.expect("basic.ack")

        for _attempt in range(100):
            client.send_method(1, "basic.get", 0, DEAD, True)
            raw, frame = client.read_frame()
            if frame.payload.method.name == "get-ok":
                out["dead-letter-get-ok.bin"] = raw
                out["dead-letter-header.bin"], _ = client.read_frame()
                out["dead-letter-body.bin"], _ = client.read_frame()
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the message was never dead-lettered")

        client.send_method(1, "exchange.delete", 0, EXCHANGE, False, False)
        client.expect("exchange.delete-ok")
        client.send_method(1, "channel.close", 200, "done", 0, 0)
        client.expect("channel.close-ok")
        client.send_method(0, "connection.close", 200, "done", 0, 0)
        client.expect("connection.close-ok")
    return out


def main() -> None:
    """
    Parse the command line, capture, and write the frames next to this file.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=5672)
    options = parser.parse_args()
    for name, raw in capture(options.port).items():
        (HERE / name).write_bytes(raw)
        print(f"{name}: {len(raw)} bytes")


if __name__ == "__main__":
    main()
