"""Run moto in server mode as a child process on loopback, for the local stack and tests."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = REPO_ROOT / ".local"
# AWS allows one PurgeQueue per 60 s; tests empty the queues between cases, so the emulator does not throttle.
DEFAULT_MOTO_ENV = {"MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR": "false"}


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """A moto server subprocess bound to 127.0.0.1 on a free port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Child output goes to
    ``.local/moto-<port>.log`` so it never clutters the terminal.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_dir: Path | str = LOCAL_DIR,
        env: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.env = {**DEFAULT_MOTO_ENV, **(env or {})}
        self.port = port
        self.log_dir = Path(log_dir)
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("moto server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> MotoServer:
        if self._proc is not None:
            return self
        if not self.port:
            self.port = free_port(self.host)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"moto-{self.port}.log"
        self._log = open(self.log_path, "ab")  # closed in stop()
        # moto's server with DynamoDB's PartiQL INSERT semantics and SQS queues safe for concurrent pollers
        # (devtools/moto_fidelity.py says why).
        cmd = [sys.executable, "-m", "devtools.moto_fidelity", "-H", self.host, "-p", str(self.port)]
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=REPO_ROOT,  # where `devtools` is importable from
        )
        atexit.register(self.stop)  # never leave the child behind on a normal interpreter exit
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._proc.returncode}; see {self.log_path}")
            try:
                resp = requests.get(f"{self.url}/moto-api/data.json", timeout=1)
                if resp.status_code < 500:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"moto server did not answer within {timeout}s; see {self.log_path}")

    def reset(self) -> None:
        """Drop every resource in the server (moto's ``POST /moto-api/reset``)."""
        resp = requests.post(f"{self.url}/moto-api/reset", timeout=10)
        resp.raise_for_status()

    def stop(self, timeout: float = 10.0) -> None:
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
