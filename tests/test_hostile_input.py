"""Hostile input in WATCH_DIR: names and files other people's programs make.

Real Redis and SeaweedFS, the service in-process (``running``), except the
unreadable-file test, which needs a service that cannot read everything (see
``unprivileged``). Every name either goes up under its documented key or gets
a clear outcome, and no name stops the watcher or hides other files.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from cefmp4.dev.localservers import S3Endpoint
from cefmp4.domain.events import FileSeen
from cefmp4.domain.objectkeys import MAX_KEY_BYTES
from cefmp4.domain.pathnames import to_wire
from cefmp4.runtime.watcher import Watcher
from projections.streams import StreamState
from tests import mp4gen
from tests.harness import (
    PYTHON,
    Harness,
    History,
    ServiceProcess,
    log_only,
    objects,
    running,
    service_config,
)
from tests.test_pipeline import assert_clean, assert_stored


def wire(path: Path | bytes) -> str:
    return to_wire(os.fsencode(path))


def put(path: Path | bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def finished(s: StreamState | None) -> bool:
    return s is not None and (s.status == "failed" or s.metadata_key is not None)


async def all_finished(h: Harness, paths: list[str]) -> History:
    return await h.until(
        lambda p: all(finished(p.for_path(path)) for path in paths), what=f"{paths} to finish"
    )


def no_crash(registry: CollectorRegistry) -> None:
    """No supervised task restarted, no handler crashed, no path failed (the
    notification source restarting itself is not a path's failure)."""
    bad = {
        f"{sample.name}{sample.labels}": sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.value
        and (
            sample.name == "cefmp4_task_crashes_total"
            or (sample.name == "cefmp4_watch_errors_total" and sample.labels["kind"] != "notify")
            or (
                sample.name == "cefmp4_handler_errors_total"
                and sample.labels["kind"] in ("internal", "permanent")
            )
        )
    }
    assert not bad, bad


def skipped(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("cefmp4_files_skipped_total", {"reason": reason}) or 0.0


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many full scans the watcher finished (``[count]``): the condition
    for "several rescans happened", instead of sleeping."""
    count = [0]
    scan = Watcher.scan

    async def counted(self: Watcher) -> None:
        await scan(self)
        count[0] += 1

    monkeypatch.setattr(Watcher, "scan", counted)
    return count


async def more_scans(h: Harness, scans: list[int], n: int) -> None:
    target = scans[0] + n
    await h.until(lambda _p: scans[0] >= target, what=f"{n} more rescans")


async def test_non_utf8_name_goes_up_next_to_normal_files(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    data = sources.regular.read_bytes()
    root = os.fsencode(watch)
    # Before the start (the first scan sees them) and after it (notifications:
    # watchfiles itself cannot decode such a name and must be restarted).
    before = [root + b"/a.mp4", root + b"/caf\xe9.mp4", root + b"/m.mp4"]
    after = [root + b"/\xff\xfe.mp4", root + b"/z.mp4"]
    for path in before:
        put(path, data)
    async with running(make_config()) as h:
        await all_finished(h, [wire(p) for p in before])
        for path in after:
            put(path, data)
        done = await all_finished(h, [wire(p) for p in before + after])
        no_crash(h.registry)
        # watchfiles cannot decode the name; its watch was restarted, not ours.
        assert h.registry.get_sample_value("cefmp4_watch_errors_total", {"kind": "notify"})
    for path in before + after:
        state = done.for_path(wire(path))
        assert state is not None
        assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, len(before + after))
    odd = done.for_path(f"{watch}/caf%E9.mp4")
    assert odd is not None and odd.key == f"streams/{odd.stream_id}/caf%E9.mp4"
    sidecar = json.loads(objects(s3_client, bucket)[f"{odd.key}.metadata.json"])
    assert sidecar["relative_path"] == "caf%E9.mp4"
    assert sidecar["original_file_path"] == f"{watch}/caf%E9.mp4"
    assert sidecar["duration_seconds"] is not None  # ffprobe found the file by its bytes
    other = done.for_path(f"{watch}/%FF%FE.mp4")
    assert other is not None and other.key.endswith("/%FF%FE.mp4")


async def test_newline_in_a_name(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    data = sources.regular.read_bytes()
    path = watch / "line\nbreak.mp4"
    async with running(make_config()) as h:
        put(path, data)
        done = await all_finished(h, [wire(path)])
        no_crash(h.registry)
    state = done.for_path(f"{watch}/line%0Abreak.mp4")
    assert state is not None and state.key == f"streams/{state.stream_id}/line%0Abreak.mp4"
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert sidecar["relative_path"] == "line%0Abreak.mp4"
    assert_clean(s3_client, bucket, 1)


async def test_very_long_path_goes_up_under_a_shortened_key(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    data = sources.regular.read_bytes()
    parts = [f"{i:02d}-" + "d" * 97 for i in range(10)]  # 10 directories of 100 bytes
    rel = "/".join(parts) + "/" + "recording-" + "r" * 80 + ".mp4"
    assert len(rel.encode()) > 1_100
    path = watch / rel
    path.parent.mkdir(parents=True)
    async with running(make_config()) as h:
        put(path, data)
        done = await all_finished(h, [str(path)])
        no_crash(h.registry)
    state = done.for_path(str(path))
    assert state is not None
    assert len(state.key.encode()) <= MAX_KEY_BYTES
    assert len(f"{state.key}.metadata.json".encode()) <= 1024
    assert state.key.startswith(f"streams/{state.stream_id}/00-ddd") and state.key.endswith(".mp4")
    assert state.rel_path == rel
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert sidecar["relative_path"] == rel
    assert sidecar["original_file_path"] == str(path)
    assert_clean(s3_client, bucket, 1)


async def test_symlink_out_of_watch_dir_is_not_followed(
    make_config: Any,
    watch: Path,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    scans: list[int],
) -> None:
    secret = tmp_path / "outside" / "secret.mp4"
    secret.parent.mkdir()
    secret.write_bytes(sources.regular.read_bytes())
    link = watch / "link.mp4"
    link.symlink_to(secret)
    normal = watch / "normal.mp4"
    normal.write_bytes(sources.regular.read_bytes())
    message = "symlink leads outside WATCH_DIR; not followed (FOLLOW_SYMLINKS=inside)"
    with capture_logs() as logs:
        async with running(make_config(rescan_interval_seconds=0.2)) as h:
            done = await all_finished(h, [str(normal)])
            await more_scans(h, scans, 3)
            assert skipped(h.registry, "symlink_outside") == 1
            reported = [e for e in logs if e["event"] == message and e["path"] == str(link)]
            assert len(reported) == 1, reported
            assert reported[0]["log_level"] == "warning"
            assert reported[0]["target"] == str(secret)
            # Gone and back: a new link is reported again.
            link.unlink()
            await more_scans(h, scans, 2)
            link.symlink_to(secret)
            await more_scans(h, scans, 2)
            assert skipped(h.registry, "symlink_outside") == 2
            no_crash(h.registry)
            events = await h.events()
    assert not [e for _, e in events if isinstance(e, FileSeen) and e.path == str(link)]
    assert done.for_path(str(link)) is None
    state = done.for_path(str(normal))
    assert state is not None
    assert_stored(s3_client, bucket, state, normal.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_symlink_inside_watch_dir_goes_up_under_the_links_name(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    data = sources.regular.read_bytes()
    target = watch / "store" / "clip.bin"  # not a recording itself
    target.parent.mkdir()
    target.write_bytes(data)
    link = watch / "cam" / "link.mp4"
    link.parent.mkdir()
    link.symlink_to("../store/clip.bin")
    async with running(make_config()) as h:
        done = await all_finished(h, [str(link)])
        no_crash(h.registry)
        assert skipped(h.registry, "symlink_outside") == 0
    state = done.for_path(str(link))
    assert state is not None and state.key == f"streams/{state.stream_id}/cam/link.mp4"
    sidecar = assert_stored(s3_client, bucket, state, data)
    assert sidecar["relative_path"] == "cam/link.mp4"
    assert_clean(s3_client, bucket, 1)


async def test_fifo_named_mp4_is_never_opened(
    make_config: Any,
    watch: Path,
    sources: mp4gen.Mp4Sources,
    s3_client: Any,
    bucket: str,
    scans: list[int],
) -> None:
    fifo = watch / "x.mp4"
    os.mkfifo(fifo)
    normal = watch / "y.mp4"
    async with running(make_config(rescan_interval_seconds=0.2)) as h:
        await more_scans(h, scans, 1)
        normal.write_bytes(sources.regular.read_bytes())  # after the FIFO was seen
        done = await all_finished(h, [str(normal)])
        await more_scans(h, scans, 2)
        # A non-blocking open for writing fails with ENXIO exactly when no
        # reader has the FIFO open (a reader blocked in open() counts).
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == errno.ENXIO, exc
        else:
            os.close(fd)
            pytest.fail("the service has the FIFO open for reading")
        assert skipped(h.registry, "special_file") == 1
        no_crash(h.registry)
    assert done.for_path(str(fifo)) is None
    state = done.for_path(str(normal))
    assert state is not None
    assert_stored(s3_client, bucket, state, normal.read_bytes())
    assert_clean(s3_client, bucket, 1)


async def test_directory_named_mp4_is_a_folder(
    make_config: Any, watch: Path, sources: mp4gen.Mp4Sources, s3_client: Any, bucket: str
) -> None:
    data = sources.regular.read_bytes()
    folder = watch / "x.mp4"
    inner = folder / "inner.mp4"
    async with running(make_config()) as h:
        folder.mkdir()
        inner.write_bytes(data)
        done = await all_finished(h, [str(inner)])
        no_crash(h.registry)
        assert skipped(h.registry, "special_file") == 0
    assert done.for_path(str(folder)) is None
    state = done.for_path(str(inner))
    assert state is not None and state.key == f"streams/{state.stream_id}/x.mp4/inner.mp4"
    assert_stored(s3_client, bucket, state, data)
    assert_clean(s3_client, bucket, 1)


# -- a file the service cannot read --------------------------------------------

USER = "cefmp4-test"
# Parts of the interpreter's prefix the service never needs.
_NOT_NEEDED = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip")


def _reachable(path: Path) -> bool:
    """Can a user that is neither owner nor group member read ``path``?"""
    path = path.resolve()
    for directory in [*reversed(path.parents), *([path] if path.is_dir() else [])]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(path.stat().st_mode & stat.S_IROTH)


def _copy_interpreter(base: Path, site: Path, into: Path) -> Path:
    """The interpreter (binary, libpython, stdlib; ~60 MB) at ``into``, with
    the venv's packages as its own site-packages (linked when reachable,
    copied otherwise)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (into / "bin").mkdir(parents=True)
    python = into / "bin" / version
    shutil.copy2(Path(sys.executable).resolve(), python)
    shutil.copytree(
        base / "lib" / version,
        into / "lib" / version,
        ignore=lambda _d, names: [n for n in names if n in _NOT_NEEDED or n.startswith("config-")],
        dirs_exist_ok=True,
    )
    for lib in (base / "lib").glob("libpython*"):
        shutil.copy2(lib, into / "lib" / lib.name, follow_symlinks=True)
    packages = into / "lib" / version / "site-packages"
    if _reachable(site):
        packages.symlink_to(site)
    else:
        shutil.copytree(site, packages, symlinks=True)
    return python


class Unprivileged(msgspec.Struct):
    prefix: list[str]
    python: str
    env: dict[str, str]
    root: Path  # a directory the user can reach, for WATCH_DIR and the workdir


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[Unprivileged]:
    """How to run ``python -m cefmp4`` as the dedicated user ``cefmp4-test``
    (or, when the suite itself runs unprivileged, as is).

    Root reads every file whatever its mode, so the service runs under its
    own system user (created with ``useradd`` when missing; CI runs the suite
    as root) through ``setpriv``. That user must reach the interpreter, the
    packages and the code: on a fresh CI machine the interpreter often lives
    under ``/root/.pyenv`` behind ``/root``'s mode 700. Nothing on the machine
    is loosened for that: whatever the user cannot reach is copied into a
    test-scoped directory (interpreter prefix without its site-packages and
    test suite, the venv's site-packages, the code), removed afterwards.
    """
    if os.geteuid() != 0:  # already a user whom mode 000 keeps out
        with tempfile.TemporaryDirectory(prefix="cefmp4-unprivileged-") as here:
            here_code = str(Path(__file__).resolve().parent.parent)
            yield Unprivileged([], PYTHON, {"PYTHONPATH": here_code}, Path(here))
        return
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )
        pw = pwd.getpwnam(USER)
    root = Path(tempfile.mkdtemp(prefix="cefmp4-unprivileged-"))
    root.chmod(0o755)
    try:
        repo = Path(__file__).resolve().parent.parent
        python, env = PYTHON, {}
        code = repo
        base = Path(sys.base_prefix)
        site = next(Path(p) for p in sys.path if p.endswith("site-packages"))
        if not (_reachable(Path(sys.executable)) and _reachable(base) and _reachable(site)):
            python = str(_copy_interpreter(base, site, root / "python"))
            env["LD_LIBRARY_PATH"] = str(root / "python" / "lib")
        if not _reachable(repo / "cefmp4"):
            for package in ("cefmp4", "consumers", "projections"):
                shutil.copytree(repo / package, root / "code" / package)
            code = root / "code"
        env["PYTHONPATH"] = str(code)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
        check = subprocess.run(
            [*prefix, python, "-c", "import cefmp4.runtime.service"],
            env={**os.environ, **env},
            cwd=root,
            capture_output=True,
        )
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        yield Unprivileged(prefix, python, env, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start)]
    return sum(values)


async def test_unreadable_file_fails_with_reason_unreadable(
    redis_url: str,
    key_prefix: str,
    bucket: str,
    s3_endpoint: S3Endpoint,
    tmp_path: Path,
    sources: mp4gen.Mp4Sources,
    unprivileged: Unprivileged,
) -> None:
    watch = unprivileged.root / f"watch-{tmp_path.name}"
    watch.mkdir(mode=0o755)
    port = _free_port()
    config = service_config(watch, redis_url, key_prefix, bucket, s3_endpoint, prom_port=port)
    locked, normal = watch / "locked.mp4", watch / "normal.mp4"
    locked.write_bytes(sources.regular.read_bytes())
    locked.chmod(0)
    normal.write_bytes(sources.regular.read_bytes())
    service = ServiceProcess(
        config,
        tmp_path / "service.log",
        workdir=unprivileged.root,
        prefix=unprivileged.prefix,
        python=unprivileged.python,
    )
    service.env.update(unprivileged.env)
    try:
        service.start(ready_timeout=60)
        async with log_only(config) as (h, _service):
            done = await all_finished(h, [str(locked), str(normal)])
        state = done.for_path(str(locked))
        assert state is not None and state.status == "failed", state
        assert state.failure_reason == "unreadable", state.failure_detail
        assert "Permission denied" in state.failure_detail or "EACCES" in state.failure_detail
        normal_state = done.for_path(str(normal))
        assert normal_state is not None and normal_state.status == "completed"
        failed = 'cefmp4_streams_failed_total{reason="unreadable"}'
        assert await asyncio.to_thread(_metric, port, failed) == 1
        lines = [ln for ln in service.log_tail(1_000_000).splitlines() if "stream failed" in ln]
        assert any("unreadable" in ln and "locked.mp4" in ln for ln in lines), lines
    finally:
        service.stop()
        shutil.rmtree(watch, ignore_errors=True)
