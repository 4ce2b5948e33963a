"""The `make test-ha` cluster on 127.0.0.1: etcd, two Patroni-managed PostgreSQL nodes in
synchronous mode, Redis, HAProxy (database -> the leader; HTTP -> three service instances) and
`ciris-billing serve` x 3 (2 workers each). Every process is started here, recorded by pid and
stopped by `Cluster.close()` (also on failure, a stalled one resumed first); nothing binds
outside loopback.

Patroni is PyPI's, pinned in pyproject.toml's `ha` extra and installed by scripts/ha/test-ha in
its own venv (.venv-ha; HA_PATRONI names another binary): Debian's 3.0.2 rewrote the etcd3
leader key without checking who held it, so a leader frozen past its TTL took the key back
from the node promoted meanwhile on waking, and that node's acknowledged commits were
rewound away (issue 22; fixed upstream by patroni/patroni#2689 and #2693, in 3.0.3+).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [str(ROOT / ".venv" / "bin" / "ciris-billing")]
PG_BIN = Path(os.environ.get("HA_PG_BIN", "/usr/lib/postgresql/15/bin"))
PATRONI = os.environ.get("HA_PATRONI", str(ROOT / ".venv-ha" / "bin" / "patroni"))
# synchronous_mode_strict (HA_SYNC_STRICT=1): no commit without a synchronous standby, even
# when the only standby is gone; off by default (docs/deploy.md: what it costs, measured).
SYNC_STRICT = os.environ.get("HA_SYNC_STRICT", "") == "1"
HOST = "127.0.0.1"
# Patroni: the leader key lives TTL seconds; loop_wait + 2 * retry_timeout <= ttl (Patroni's
# rule). Shorter than the defaults (30/10/10) so that a dead Patroni is replaced in ~20 s.
TTL, LOOP_WAIT, RETRY_TIMEOUT = 20, 2, 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, ready: Callable[[], bool], timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(every)


def http_status(url: str, timeout: float = 1.0) -> int:
    """The status of GET `url` (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (loopback)
            status: int = answer.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def http_json(url: str, timeout: float = 1.0) -> object:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 (loopback)
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


@dataclass
class Node:
    """One Patroni + PostgreSQL node."""

    name: str
    home: Path
    pg_port: int
    rest_port: int
    patroni: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def rest(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.pg_port}"

    def is_leader(self) -> bool:
        return http_status(f"{self.rest}/primary") == 200

    def is_sync_standby(self) -> bool:
        return http_status(f"{self.rest}/sync") == 200

    def postmaster_pid(self) -> int | None:
        """The node's postmaster, from its pid file, if that process is alive and is this
        node's postgres (never another process that reused the pid)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if str(self.data_dir).encode() in command:
                return pid
        return None


@dataclass
class Cluster:
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ciris-ha-")))
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    service_ports: dict[str, int] = field(default_factory=dict)
    etcd_port: int = 0
    redis_port: int = 0
    db_port: int = 0
    http_port: int = 0
    api_key: str = ""

    # --- processes ----------------------------------------------------------------------------

    def start(
        self, name: str, command: list[str], env: dict[str, str] | None = None, **options: object
    ) -> subprocess.Popen[bytes]:
        log = (self.home / f"{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 (fixed programs, our own arguments)
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole
            **options,  # type: ignore[call-overload]
        )
        log.close()
        self.processes.append((name, process))
        return process

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.home / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop everything this cluster started: each process group (TERM, then KILL), then
        any postmaster left behind (a Patroni killed with -9 leaves its PostgreSQL running)."""
        thaw(sorted(FROZEN))
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for node in self.nodes:
            pid = node.postmaster_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait_for(f"{node.name} stopped", lambda n=node: n.postmaster_pid() is None, 10)
        shutil.rmtree(self.home, ignore_errors=True)

    # --- the pieces ---------------------------------------------------------------------------

    def start_etcd(self) -> None:
        self.etcd_port, peer = free_port(), free_port()
        client, peers = f"http://{HOST}:{self.etcd_port}", f"http://{HOST}:{peer}"
        self.start(
            "etcd",
            [
                "etcd", "--name", "ha", "--data-dir", str(self.home / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peers, "--initial-advertise-peer-urls", peers,
                "--initial-cluster", f"ha={peers}", "--initial-cluster-state", "new",
            ],
        )  # fmt: skip
        wait_for("etcd", lambda: http_status(f"{client}/health") == 200, 30)

    def start_redis(self) -> None:
        self.redis_port = free_port()
        self.start(
            "redis",
            ["redis-server", "--bind", HOST, "--port", str(self.redis_port), "--save", "",
             "--appendonly", "no"],
        )  # fmt: skip

        def answers() -> bool:
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, self.redis_port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            return False

        wait_for("redis", answers, 20)

    def _patroni_config(self, node: Node) -> str:
        settings = {
            "scope": "ciris-ha",
            "namespace": f"/ciris-ha-{self.home.name}/",
            "name": node.name,
            "restapi": {
                "listen": f"{HOST}:{node.rest_port}",
                "connect_address": f"{HOST}:{node.rest_port}",
            },
            "etcd3": {"host": f"{HOST}:{self.etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 1048576,
                    # A crashed primary is failed over at once (to the synchronous standby,
                    # which has every acknowledged commit) rather than restarted in place.
                    "primary_start_timeout": 0,
                    # Every commit waits for the standby: an acknowledged charge is on both,
                    # and only the node named in the /sync key may be promoted.
                    "synchronous_mode": True,
                    "synchronous_mode_strict": SYNC_STRICT,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_wal_senders": 5,
                            "max_replication_slots": 5,
                            "wal_keep_size": "256MB",
                            "max_connections": 200,
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}],
            },
            "postgresql": {
                "listen": f"{HOST}:{node.pg_port}",
                "connect_address": f"{HOST}:{node.pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": str(PG_BIN),
                "pgpass": str(node.home / "pgpass"),
                # Trust on loopback (a throwaway test cluster); Patroni requires the names.
                "authentication": {
                    "superuser": {"username": "postgres", "password": "ha"},
                    "replication": {"username": "postgres", "password": "ha"},
                    "rewind": {"username": "postgres", "password": "ha"},
                },
                "parameters": {"unix_socket_directories": str(node.home)},
                "pg_hba": [
                    "local all all trust",
                    f"host all all {HOST}/32 trust",
                    f"host replication all {HOST}/32 trust",
                ],
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        return json.dumps(settings, indent=2)  # JSON is YAML

    def start_patroni(self, node: Node) -> None:
        options: dict[str, object] = {}
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            user = pwd.getpwnam("postgres")
            options = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        node.patroni = self.start(
            node.name,
            [PATRONI, str(node.home / "patroni.yml")],
            env={**os.environ, "PATH": f"{PG_BIN}:{os.environ.get('PATH', '')}"},
            cwd=str(node.home),
            **options,
        )

    def start_nodes(self) -> None:
        os.chmod(self.home, 0o755)  # noqa: S103 (the postgres user must reach its node's folder)
        for name in ("pg1", "pg2"):
            node = Node(name, self.home / name, free_port(), free_port())
            node.home.mkdir()
            (node.home / "patroni.yml").write_text(self._patroni_config(node))
            if os.geteuid() == 0:
                shutil.chown(node.home, "postgres", "postgres")
                shutil.chown(node.home / "patroni.yml", "postgres", "postgres")
            self.nodes.append(node)
        self.start_patroni(self.nodes[0])
        wait_for("pg1 leader", self.nodes[0].is_leader, 90)
        self.start_patroni(self.nodes[1])
        wait_for("pg2 synchronous standby", self.nodes[1].is_sync_standby, 90)

    def leader(self) -> Node | None:
        return next((node for node in self.nodes if node.is_leader()), None)

    def start_haproxy(self, services: int) -> None:
        self.db_port, self.http_port = free_port(), free_port()
        self.service_ports = {f"svc{n}": free_port() for n in range(1, services + 1)}
        pg_servers = "\n".join(
            f"    server {node.name} {HOST}:{node.pg_port} check port {node.rest_port}"
            for node in self.nodes
        )
        web_servers = "\n".join(
            f"    server {name} {HOST}:{port} check" for name, port in self.service_ports.items()
        )
        config = f"""
global
    maxconn 4000

defaults
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout check 1s

# PostgreSQL: only the node whose Patroni answers /primary with 200 (the leader). When a node
# stops being the leader, its sessions are cut at once (on-marked-down shutdown-sessions): no
# client keeps writing to a demoted node.
listen postgres
    mode tcp
    bind {HOST}:{self.db_port}
    # A refused connection (the leader's postgres just died) is closed at once, not retried:
    # the service answers 503 + Retry-After and its client comes back.
    retries 0
    option httpchk
    http-check send meth GET uri /primary
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions
{pg_servers}

# HTTP: round robin over the service instances; a request whose connection failed goes to
# another (redispatch). The check is an HTTP one: a dead instance refuses it, and a frozen one
# (SIGSTOP: its socket still accepts connections) does not answer it within 1 s; either is
# taken out and its sessions cut. /health answers 503 while the database is away: still a live
# instance (every instance sees the same database; all of them out would only add 503s).
listen billing
    mode http
    bind {HOST}:{self.http_port}
    balance roundrobin
    option redispatch
    retries 3
    timeout server 30s
    timeout client 30s
    option httpchk
    http-check send meth GET uri /health
    http-check expect rstatus ^(200|503)$
    default-server inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions
{web_servers}
"""
        path = self.home / "haproxy.cfg"
        path.write_text(config)
        self.start("haproxy", ["haproxy", "-db", "-f", str(path)])
        wait_for("haproxy", lambda: _listening(self.db_port) and _listening(self.http_port), 20)

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.db_port}/billing"

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": f"redis://{HOST}:{self.redis_port}/0",
            "LOG_LEVEL": "WARNING",
            "ACCESS_LOG": "false",
            "DB_POOL_SIZE": "6",
            # Limits stay on (through Redis), far above this storm's rates.
            "RATE_LIMIT_KEY_PER_SECOND": "100000",
            "RATE_LIMIT_ACCOUNT_PER_MINUTE": "1000000",
            # JOBS_POLL_SECONDS and RECONCILE_AFTER_SECONDS keep their defaults (10 s, 180 s).
            # The storm's webhook receiver is on loopback.
            "ALLOW_PRIVATE_WEBHOOK_URLS": "true",
            "PUBLIC_BASE_URL": f"http://{HOST}:{self.http_port}/",
        }

    def run_cli(self, *args: str, database_url: str | None = None, timeout: float = 120) -> str:
        env = self.service_env()
        if database_url is not None:
            env["DATABASE_URL"] = database_url
        done = subprocess.run(  # noqa: S603 (our own command)
            [*CLI, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ciris-billing {args[0]} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def start_services(self) -> None:
        for name, port in self.service_ports.items():
            self.services[name] = self.start(
                name,
                [*CLI, "serve", "--host", HOST, "--port", str(port), "--workers", "2",
                 "--no-migrate"],
                env=self.service_env(),
            )  # fmt: skip
        for name, port in self.service_ports.items():
            wait_for(name, lambda p=port: http_status(f"http://{HOST}:{p}/health", 2) == 200, 90)

    def stop_service(self, name: str) -> list[int]:
        """SIGSTOP an instance: its parent and its workers."""
        return freeze(self.services[name].pid)

    def kill_service(self, name: str) -> None:
        """kill -9 an instance: its parent and its workers (its own process group)."""
        os.killpg(self.services[name].pid, signal.SIGKILL)
        self.services[name].wait()


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The field after the parenthesised command name: state, then the parent.
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    return children


def tree(*roots: int) -> list[int]:
    """`roots` and all their descendants (a postmaster and its backends; Patroni and its
    postgres), parents first."""
    children, found = _children(), list(roots)
    for pid in found:
        found += [child for child in children.get(pid, []) if child not in found]
    return found


FROZEN: set[int] = set()  # SIGSTOPped and not yet resumed: close() resumes them first


def freeze(*roots: int) -> list[int]:
    """SIGSTOP `roots` and all their descendants, parents first; again until no process is
    found that the last pass missed (one forked between the listing and its parent's stop)."""
    stopped: list[int] = []
    while new := [pid for pid in tree(*roots) if pid not in stopped]:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                FROZEN.add(pid)
            stopped.append(pid)
    return stopped


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        FROZEN.discard(pid)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
        return True
    return False


def require_programs() -> None:
    missing = [
        program
        for program in ("etcd", PATRONI, "haproxy", "redis-server")
        if shutil.which(program) is None
    ]
    if missing or not (PG_BIN / "postgres").exists():
        sys.exit(f"missing: {missing or [str(PG_BIN / 'postgres')]} (scripts/ha/test-ha installs)")
