"""Worker processes for `ciris-billing serve --workers N`: uvicorn's, each on its own socket.

uvicorn's own supervisor hands every worker the same listening socket, and whichever worker
wakes first accepts. When a client opens its connections at once (an agent fleet's pool, a load
test), one worker can end up holding most of them (measured: 53 of 64) and its queue sets
everyone's latency while the other worker idles. Here each worker listens on a socket of its
own, bound to the same address with SO_REUSEPORT, and the kernel spreads new connections across
them. The rest is uvicorn's supervision, with its own worker processes: health pings, a dead or
hung worker replaced (the parent keeps its socket open meanwhile, so connections wait in that
socket's backlog rather than being refused), SIGINT/SIGTERM stop them all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Process

logger = logging.getLogger("uvicorn.error")

# A worker answers health pings only once it has started (a spawned process first imports the
# service, 2-5 s here, more on a loaded machine): pinged before that, it looked hung and was
# killed and replaced, again and again (seen in CI: a worker killed by a fault test did not
# serve again within 60 s). Until this long after its start, only its process is checked.
STARTUP_GRACE_SECONDS = 60.0


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on host:port together (SO_REUSEPORT), to hand one per worker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]  # port 0: the others join the port the first one got
        sock.listen(2048)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


class Supervisor:
    """Runs one uvicorn worker process per socket and keeps each one alive."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.processes: list[Process] = []
        self.started_at: list[float] = []  # each process's start (monotonic)
        self.should_exit = threading.Event()

    def _start(self, sock: socket.socket) -> Process:
        process = Process(self.config, [sock])
        process.start()
        return process

    def _alive(self, index: int) -> bool:
        """Dead, or hung (not answering its health ping once past its start-up)."""
        process = self.processes[index]
        if time.monotonic() - self.started_at[index] < STARTUP_GRACE_SECONDS:
            return process.process.is_alive()  # still importing, perhaps: no ping yet
        return process.is_alive(timeout=self.config.timeout_worker_healthcheck)

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.should_exit.set())
        logger.info(f"Started parent process [{os.getpid()}]")
        self.processes = [self._start(sock) for sock in self.sockets]
        self.started_at = [time.monotonic() for _ in self.processes]
        while not self.should_exit.wait(0.5):
            self._replace_dead_workers()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join()
        logger.info(f"Stopping parent process [{os.getpid()}]")

    def _replace_dead_workers(self) -> None:
        for index, process in enumerate(self.processes):
            if self._alive(index):
                continue
            process.kill()  # dead, or hung: not answering its health ping
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It never started serving (the app, its settings or the socket are broken):
                # a replacement would fail the same way, over and over.
                logger.error(f"Child process [{process.pid}] failed to start; stopping.")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.info(f"Child process [{process.pid}] died")
            self.processes[index] = self._start(self.sockets[index])
            self.started_at[index] = time.monotonic()
