"""Start a private Mosquitto broker on a free loopback port (demo and tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, kept below the ephemeral range."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 32768:
            return port
        # The kernel gave an ephemeral port; try a random one in 20000-32000 instead.
        import random

        candidate = random.randint(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free TCP port found on 127.0.0.1 after 200 tries")


def wait_for_port(host: str, port: int, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s} s") from None
            time.sleep(0.05)


class PrivateMosquitto:
    """A mosquitto process of our own: loopback only, anonymous, queue limits lifted for throughput work."""

    def __init__(self, *, port: int | None = None, extra_conf: str = "") -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._extra_conf = extra_conf
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def binary() -> str:
        found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if not found:
            raise FileNotFoundError(
                "mosquitto not found: expected the Debian package 'mosquitto' (make deps installs it)"
            )
        return found

    def start(self) -> PrivateMosquitto:
        self._dir = tempfile.TemporaryDirectory(prefix="tianping-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "sys_interval 1\n"
            f"{self._extra_conf}\n"
        )
        self._log = open(Path(self._dir.name) / "mosquitto.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen([self.binary(), "-c", str(conf)], stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> PrivateMosquitto:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
