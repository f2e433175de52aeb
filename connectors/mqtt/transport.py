"""paho-mqtt with buffered reads: one ``recv()`` per 64 KiB of the broker's stream instead of several per message.

paho 2.x reads an incoming packet with a ``select()``, a ``recv(1)`` for the fixed header, one ``recv(1)`` per
byte of the remaining length and one more for the body, and handles one QoS 0 packet per pass of its loop: four
or more system calls and a loop pass for a 40-byte Sparkplug DDATA. A counter that must keep up with 10,000
devices spends that time better on decoding (bench/mqtt_devices.py: about 8 us less CPU per message).

:class:`BufferedClient` wraps a plain TCP socket the way paho wraps its own WebSocket transport
(``_WebsocketWrapper``): ``recv`` serves small reads from a buffer filled by one large ``recv``, and ``pending()``
tells paho's loop that buffered bytes are ready (paho then skips the wait in ``select()``, as it does for TLS
sockets, which buffer the same way); ``loop_read`` handles every complete packet in the buffer in one pass.
TLS and WebSocket transports are left exactly as paho makes them. The hook is paho's private
``_create_socket`` (paho-mqtt 2.1-2.2); a paho without it never calls the override and the client is plain paho.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK_BYTES = 1 << 16


class BufferedReads:
    """A non-blocking TCP socket whose reads come from a buffer refilled by one ``recv(READ_CHUNK_BYTES)``."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, buffer_size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._sock.recv(max(buffer_size, READ_CHUNK_BYTES))  # BlockingIOError, b"" at EOF: as a socket
            if len(buf) <= buffer_size:
                return buf
            pos = 0
            self._buf = buf
        end = pos + buffer_size
        if end >= len(buf):
            self._buf, self._pos = b"", 0
            return buf[pos:]
        self._pos = end
        return buf[pos:end]

    def pending(self) -> int:
        """Bytes already read from the kernel and not yet handed to paho."""
        return len(self._buf) - self._pos

    def send(self, buffer: bytes | bytearray) -> int:
        return self._sock.send(buffer)

    def close(self) -> None:
        self._buf, self._pos = b"", 0
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:  # settimeout, shutdown, getpeername...: the socket's own
        return getattr(self._sock, name)


class BufferedClient(mqtt.Client):
    """A paho client whose plain TCP connections read through :class:`BufferedReads`, and whose ``loop_read``
    handles every packet already buffered (up to ``MAX_PACKETS_PER_READ``) instead of one per pass of the loop
    (paho reads one QoS 0 packet per ``select()``)."""

    MAX_PACKETS_PER_READ = 1000  # then paho's loop runs once more (keep-alive, writes) before the next batch

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if type(sock) is socket.socket and not isinstance(sock, ssl.SSLSocket):
            return BufferedReads(sock)
        return sock

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        sock = self._sock
        if not isinstance(sock, BufferedReads):
            return rc
        for _ in range(self.MAX_PACKETS_PER_READ):
            # Each pass consumes at least one buffered byte, or stops on an error or a closed connection.
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._sock is not sock or not sock.pending():
                break
            rc = super().loop_read(max_packets)
        return rc

