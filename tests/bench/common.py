"""Shared plumbing of the benchmarks: the service as a subprocess, the event
log read back from Redis, /proc sampling, optional py-spy, and the report.

Nothing here measures by itself; the ``bench_*`` modules decide what a figure
means. Every process started here is ended here, by its own pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import redis

from cefmp4.dev.localservers import JuiceFSGateway, SeaweedS3
from cefmp4.domain.config import Config
from cefmp4.domain.events import Event, decode
from tests.harness import ServiceProcess

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / ".cefmp4" / "bench"
PYTHON = sys.executable
_CLK_TCK = os.sysconf("SC_CLK_TCK")

T = TypeVar("T")


class BenchError(RuntimeError):
    """The benchmark could not produce a figure (timeout, crash, bad object)."""


# -- waiting ------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None], *, timeout: float, poll: float, what: str
) -> tuple[T, float]:
    """Call ``probe`` every ``poll`` s until it returns non-None; (value, wall time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value, time.time()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)


# -- the service as a subprocess ---------------------------------------------


def start_service(service: ServiceProcess, ready_timeout: float = 30) -> None:
    """Start it, or a BenchError saying why not (e.g. a ``--service-env`` it rejects)."""
    try:
        service.start(ready_timeout=ready_timeout)
    except RuntimeError as exc:
        service.stop()
        raise BenchError(f"the service did not start: {exc}") from None


@contextlib.contextmanager
def running(service: ServiceProcess) -> Iterator[ServiceProcess]:
    """``with running(service):`` like ``with service:``, failing as a BenchError."""
    start_service(service)
    try:
        yield service
    finally:
        service.stop()


# -- the event log ------------------------------------------------------------


def read_events(client: redis.Redis, key: str) -> list[Event]:
    """Every decodable event of the log, in order."""
    raw: Any = client.xrange(key, "-", "+")
    events: list[Event] = []
    for _entry_id, fields in raw:
        event = decode(fields)
        if isinstance(event, Event):
            events.append(event)
    return events


def of_stream(events: Iterable[Event], stream_id: str) -> list[Event]:
    return [e for e in events if e.stream_id == stream_id]


def ts(moment: datetime) -> float:
    """An event's ``at`` as epoch seconds (the bench and service share one clock)."""
    return moment.astimezone(UTC).timestamp()


# -- /proc sampling -----------------------------------------------------------


def proc_status_kib(pid: int) -> dict[str, int]:
    """The ``Vm*`` lines of /proc/<pid>/status, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.startswith("Vm") and rest.strip().endswith("kB"):
            values[name] = int(rest.split()[0])
    return values


def _cpu_seconds(stat_path: Path, *, children: bool = False) -> float:
    fields = stat_path.read_text().rpartition(")")[2].split()
    # fields[0] is the state (field 3 of proc(5)); utime, stime are fields 14, 15;
    # cutime, cstime (children the process has waited for) are 16, 17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU of the whole process (all threads, live or ended);
    with ``children``, plus every child it has reaped (the service's ffprobe)."""
    return _cpu_seconds(Path(f"/proc/{pid}/stat"), children=children)


def quiesce(server_pid: int, *, timeout: float = 20.0, idle_cpu: float = 0.02) -> float:
    """Flush dirty pages and wait until the S3 server is idle (less than
    ``idle_cpu`` CPU-s in half a second), so that every measured phase starts
    alike: not while the kernel writes back the previous tool's gigabyte or
    the server tidies up after it (either doubled the server's CPU per GiB
    in a phase that followed another). Returns the seconds it waited."""
    started = time.monotonic()
    os.sync()
    before = cpu_seconds(server_pid, children=True)
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now = cpu_seconds(server_pid, children=True)
        if now - before < idle_cpu:
            break
        before = now
    return time.monotonic() - started


def children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the reaped children of ``pid`` (ffprobe, for the service)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # cutime, cstime are fields 16, 17 of proc(5).
    return (int(fields[13]) + int(fields[14])) / _CLK_TCK


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU of the main thread only: for the service, its asyncio event loop."""
    return _cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


# -- passing settings through to the service -----------------------------------


def env_pair(text: str) -> tuple[str, str]:
    """``KEY=VAL`` for ``--service-env``: an argparse ``type``."""
    key, sep, value = text.partition("=")
    if not sep or not key or key != key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def known_env_names() -> set[str]:
    """The environment names the service's Config reads (upper-cased fields).

    Lets a bench say whether a ``--service-env`` setting means anything to the
    service it runs: a name it does not know is ignored by the service, which
    would make a "ceiling" run silently the same as the normal one.
    """
    return {f.encode_name for f in msgspec.structs.fields(Config)}


# -- py-spy -------------------------------------------------------------------


def py_spy_path() -> str | None:
    candidate = Path(PYTHON).parent / "py-spy"
    return str(candidate) if os.access(candidate, os.X_OK) else None


class PySpy:
    """``py-spy record --native`` attached to ``pid``; raw (collapsed) stacks."""

    def __init__(self, pid: int, output: Path, rate: int = 100) -> None:
        exe = py_spy_path()
        if exe is None:
            raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.output = output
        self._log = output.with_suffix(".log")
        output.parent.mkdir(parents=True, exist_ok=True)
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--native", "--rate", str(rate),
                 "--format", "raw", "--output", str(output)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        time.sleep(1.0)  # attach before the measured work starts
        if self._proc.poll() is not None:
            raise BenchError(f"py-spy exited at once: {self._log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# A sample whose stack has one of these is a thread waiting, not working.
_IDLE: list[tuple[str, tuple[str, ...]]] = [
    ("worker threads waiting for work", ("_queue_SimpleQueue_get",)),
    ("event loop waiting in epoll", ("EpollSelector.select",)),
    ("watchfiles notify thread", ("_rust_notify",)),
    ("other waiting threads", ("Condition.wait (threading.py", "Event.wait (threading.py")),
]
# Busy samples: checked in order against the whole stack; the first match wins.
_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("waiting for the GIL", ("pthread_cond_timedwait",)),
    ("SigV4 signing (incl. the signed payload's SHA-256)", ("botocore/auth.py", "crt/auth.py")),
    ("md5 of parts (uploader + finalizer re-check)", ("md5_of (", "MD5_", "md5_block")),
    ("sha256 of the whole file (SIDECAR_SHA256)", ("_sha256 (",)),
    ("sha256, other", ("sha256_block", "SHA256_", "sha256 (")),
    ("part bodies written to the connection", ("PartBody.write_with_length",)),
    ("socket send/recv syscalls", ("sock_send", "sock_recv", "sock_sendall")),
    ("file reads (pread)", ("read_range (",)),
    ("aiohttp (other)", ("aiohttp/",)),
    ("botocore / aiobotocore (other)", ("botocore/", "aiobotocore/")),
    ("redis event log + projection + msgspec", ("redis/", "eventlog.py", "projections/")),
    ("watcher", ("watcher.py", "watchfiles/")),
    ("asyncio event loop (scheduling, other)", ("asyncio/",)),
]


def summarize_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Busy samples per category and per thread kind, the hottest leaves, idle share.

    py-spy's ``--native`` mode cannot tell idle threads apart, so waits are
    recognised here by their frames and left out of the busy percentages.
    """
    idle: dict[str, int] = {}
    by_category: dict[str, int] = {}
    by_thread = {"event loop (main thread)": 0, "worker threads": 0}
    leaves: dict[str, int] = {}
    total = busy = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        waiting = next((c for c, keys in _IDLE if any(k in stack for k in keys)), None)
        if waiting is not None:
            idle[waiting] = idle.get(waiting, 0) + count
            continue
        busy += count
        frames = stack.split(";")
        worker = any("threading.py" in f for f in frames[:6])
        by_thread["worker threads" if worker else "event loop (main thread)"] += count
        name = next((c for c, keys in _CATEGORIES if any(k in stack for k in keys)), "other")
        by_category[name] = by_category.get(name, 0) + count
        leaf = next((f for f in reversed(frames) if "(lib" not in f), frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + count

    def share(table: dict[str, int], of: int) -> dict[str, float]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])
        return {k: round(100.0 * v / of, 1) for k, v in ranked} if of else {}

    return {
        "samples": total,
        "busy_samples": busy,
        "percent_of_busy_by_category": share(by_category, busy),
        "percent_of_busy_by_thread": share(by_thread, busy),
        "percent_of_busy_by_leaf_frame": dict(list(share(leaves, busy).items())[:top]),
        "percent_of_all_idle": share(idle, total),
    }


# -- hashing for verification ---------------------------------------------------


class PartHasher:
    """MD5 per part for a given list of part sizes, fed a stream of blocks."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self._sizes = list(sizes)
        self._index = 0
        self._left = self._sizes[0] if self._sizes else 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.digests: list[bytes] = []

    def update(self, block: memoryview) -> None:
        while len(block):
            if self._index >= len(self._sizes):
                raise ValueError("more bytes than the part plan covers")
            take = min(self._left, len(block))
            self._md5.update(block[:take])
            block = block[take:]
            self._left -= take
            if self._left == 0:
                self.digests.append(self._md5.digest())
                self._index += 1
                self._md5 = hashlib.md5(usedforsecurity=False)
                self._left = self._sizes[self._index] if self._index < len(self._sizes) else 0

    def etag(self) -> str:
        """S3's ETag: the MD5 for one part, md5-of-md5s plus ``-N`` for several."""
        if len(self.digests) == 1:
            return self.digests[0].hex()
        combined = hashlib.md5(b"".join(self.digests), usedforsecurity=False).hexdigest()
        return f"{combined}-{len(self.digests)}"


def hash_file(path: Path, plans: Sequence[PartHasher]) -> str:
    """Feed ``path`` to every plan in one pass; returns the file's SHA-256."""
    whole = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            block = view[:n]
            whole.update(block)
            for plan in plans:
                plan.update(block)
    return whole.hexdigest()


def sha256_matches(got: str | None, expected: str) -> bool:
    """A SHA-256 the service reported is right; none at all is allowed, because
    the service computes one only with SIDECAR_SHA256 (the object then carries
    the store-verified checksum instead, and its ETag is checked on its own)."""
    return not got or got == expected


def fixed_parts(size: int, part: int) -> list[int]:
    return [min(part, size - off) for off in range(0, size, part)] or [0]


# -- report -------------------------------------------------------------------


def command_line() -> str:
    return shlex.join(sys.orig_argv)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank style via statistics.quantiles; the median for q=50."""
    if len(values) == 1:
        return values[0]
    if q == 50:
        return statistics.median(values)
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` is the elapsed monotonic time."""
    box: list[float] = []
    start = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - start)


def bench_main(
    name: str,
    parse_args: Callable[[list[str] | None], Any],
    run: Callable[[Any], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    argv: list[str] | None = None,
    headline: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """``python -m tests.bench.bench_<name>``: run one bench, print, write JSON.

    With ``headline``, its figures are also printed as one JSON line
    (``RESULT {...}``), for pasting into notes and for grep.
    """
    args = parse_args(argv)
    try:
        result = run(args)
    except BenchError as exc:
        print(f"{name} bench failed: {exc}", file=sys.stderr)
        return 1
    payload = {
        "command": command_line(),
        "finished_at": now_iso(),
        "machine": machine(),
        "benches": {name: result},
    }
    print(f"command: {payload['command']}")
    print(report(result))
    if headline is not None:
        line = {"bench": name, "ok": result["ok"], **headline(result)}
        print("RESULT " + json.dumps(line, separators=(",", ":")))
    print(f"JSON: {write_json(f'{name}.json', payload)}")
    return 0 if result["ok"] else 1


def s3_server(kind: str, tmp: Path) -> JuiceFSGateway | SeaweedS3:
    """The benches' S3 server (``--s3``), not started: the JuiceFS gateway
    (fastest here; verifies no checksum header) or SeaweedFS (verifies CRCs)."""
    if kind == "juicefs":
        return JuiceFSGateway(tmp / "juicefs")
    return SeaweedS3(tmp / "seaweedfs")
