"""``cefmp4 events`` (``cefmp4.ops.eventscli``).

Pure parts as properties: however the archive's segments and the Redis window
overlap, the output has every id once, in order; filters keep exactly the
matching entries; the JSON line is the archive's line. End to end on a real
Redis and S3: archive part of a log, trim it from Redis, and ``--from-start``
prints the whole log once; the default prints only Redis' window; nothing is
changed; ``--follow`` prints an entry appended after it started and exits 0 on
SIGINT; an unreachable Redis or S3 exits 2 with one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from cefmp4 import cli
from cefmp4.adapters.archive import EventArchive, archive_through
from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.logsetup import redact_url
from cefmp4.dev.localservers import free_port
from cefmp4.domain.archive_format import RawEntry, raw_entry
from cefmp4.domain.config import Config
from cefmp4.domain.entryids import format_id
from cefmp4.domain.events import EVENT_TYPES, BytesAvailable, FileSeen, StreamIdle
from cefmp4.ops.eventscli import (
    Options,
    View,
    add_parser,
    matches,
    options_from,
    readable,
)
from cefmp4.runtime.service import connect
from tests.harness import PYTHON, subprocess_env

AT = datetime(2026, 1, 1, tzinfo=UTC)


def entry(entry_id: str, kind: str = "BytesAvailable", stream: str | None = "s1") -> RawEntry:
    data = {"size": 1} if stream is None else {"stream_id": stream, "size": 1}
    return RawEntry(entry_id, kind, 1, "r", msgspec.Raw(msgspec.json.encode(data)))


# -- pure ------------------------------------------------------------------------

KINDS = ["FileSeen", "BytesAvailable", "StreamIdle"]
STREAMS = ["s1", "s2", None]


@st.composite
def logs(draw: st.DrawFn) -> list[RawEntry]:
    # (Redis never makes 0-0: XADD refuses it)
    ids = sorted(draw(st.sets(st.tuples(st.integers(1, 50), st.integers(0, 3)), max_size=40)))
    return [
        entry(format_id(i), draw(st.sampled_from(KINDS)), draw(st.sampled_from(STREAMS)))
        for i in ids
    ]


def ids_of(text: str) -> list[str]:
    return [json.loads(line)["id"] for line in text.splitlines()]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    log=logs(),
    archived=st.integers(0, 40),
    window=st.integers(0, 40),
    segment=st.integers(1, 8),
    overlap=st.integers(0, 4),
    types=st.sets(st.sampled_from(KINDS)),
    streams=st.sets(st.sampled_from(["s1", "s2", "s3"])),
)
def test_archive_then_redis_prints_each_id_once_in_order(
    log: list[RawEntry],
    archived: int,
    window: int,
    segment: int,
    overlap: int,
    types: set[str],
    streams: set[str],
) -> None:
    archived = min(archived, len(log))
    start = min(window, archived)  # Redis keeps from here on (no gap to the archive)
    # Segments that overlap by ``overlap`` entries, then Redis' window in pages.
    pages = [
        log[max(0, lo - overlap) : min(archived, lo + segment)]
        for lo in range(0, archived, segment)
    ]
    pages += [log[lo : lo + segment] for lo in range(start, len(log), segment)]
    options = Options(json=True, types=frozenset(types), streams=frozenset(streams))
    view = View(options)
    text = "".join(view.page(page) for page in pages)
    assert ids_of(text) == [e.id for e in log if matches(e, options)]
    assert view.cursor == (log[-1].id if log else "0-0")
    # A tail re-reading what it already printed adds nothing.
    assert view.page(log) == ""


def test_filters_are_any_of_within_and_all_of_across() -> None:
    a, b = entry("1-0", "FileSeen", "s1"), entry("2-0", "StreamIdle", "s2")
    c, odd = entry("3-0", "FileSeen", None), raw_entry("4-0", {b"type": b"X", b"data": b"junk"})
    every = [a, b, c, odd]

    def kept(types: set[str] = set(), streams: set[str] = set()) -> list[RawEntry]:  # noqa: B006
        options = Options(types=frozenset(types), streams=frozenset(streams))
        return [e for e in every if matches(e, options)]

    assert kept() == every
    assert kept(types={"FileSeen"}) == [a, c]
    assert kept(types={"FileSeen", "X"}) == [a, c, odd]
    assert kept(streams={"s1", "s2"}) == [a, b]
    assert kept(streams={"s2"}, types={"FileSeen"}) == []


def test_lines() -> None:
    fields = {
        b"type": b"FileSeen",
        b"v": b"1",
        b"replica": b"host-1",
        b"data": b'{"stream_id":"s-1","at":"2026-01-01T00:00:00Z","path":"/w/a b.mp4","size":3,'
        b'"error":null}',
    }
    e = raw_entry("17-2", fields)
    assert readable(e) == (
        '17-2 FileSeen s-1 host-1 at=2026-01-01T00:00:00Z path="/w/a b.mp4" size=3 error=null'
    )
    assert readable(raw_entry("17-3", {b"data": b"junk"})) == "17-3 - - - data=junk"
    line = View(Options(json=True)).page([e])
    assert json.loads(line) == {
        "id": "17-2",
        "type": "FileSeen",
        "v": 1,
        "replica": "host-1",
        "data": json.loads(fields[b"data"]),
    }


def test_redis_password_is_not_printed() -> None:
    assert redact_url("redis://u:secret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:secret@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["events", "--from-start", "-f", "--type", "A", "--type", "B", "--stream", "s"]
    )
    assert options_from(args) == Options(
        from_start=True, follow=True, types=frozenset({"A", "B"}), streams=frozenset({"s"})
    )
    assert options_from(parser.parse_args(["events"])) == Options()


# -- end to end ---------------------------------------------------------------------


def use_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: Config) -> None:
    for name, value in subprocess_env(config).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no stray .env


async def build_log(config: Config) -> tuple[list[str], list[str], int]:
    """40 entries for two streams; the first 25 archived, the first 20 trimmed
    (so 20..24 are in both). Returns (all ids, s2's ids, archive segment count)."""
    async with connect(config) as (redis, store):
        log = EventLog(redis, config.events_key, "t")
        ids, s2 = [], []
        for i in range(40):
            stream = "s2" if i % 3 == 0 else "s1"
            event = (
                FileSeen(
                    stream_id=stream,
                    at=AT,
                    path=f"/w/{i}",
                    rel_path=str(i),
                    bucket="b",
                    key=f"k{i}",
                    size=i,
                    mtime_ns=i,
                    inode=i,
                )
                if i % 5 == 0
                else BytesAvailable(stream_id=stream, at=AT, size=i, mtime_ns=i)
            )
            ids.append(await log.append(event))
            if stream == "s2":
                s2.append(ids[-1])
        archive = EventArchive(store, config.event_archive_prefix)
        assert await archive_through(log, archive, ids[25], max_segment_entries=6) == ids[24]
        await redis.xtrim(config.events_key, minid=ids[20], approximate=False)
        return ids, s2, len(await store.list_keys(config.event_archive_prefix))


async def state(config: Config) -> tuple[int, list[str]]:
    async with connect(config) as (redis, store):
        return await redis.xlen(config.events_key), await store.list_keys("")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    code = cli.main(["events", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_from_start_prints_the_whole_log_once_and_changes_nothing(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config()
    ids, s2, segments = asyncio.run(build_log(config))
    assert segments == 5
    before = asyncio.run(state(config))
    use_env(monkeypatch, tmp_path, config)

    code, lines, _ = run_cli(capsys, "--from-start", "--json")
    assert code == 0
    objects = [json.loads(line) for line in lines]
    assert [o["id"] for o in objects] == ids
    assert objects[5]["type"] == "FileSeen" and objects[5]["data"]["key"] == "k5"
    assert all(o["v"] == EVENT_TYPES[o["type"]].VERSION and o["replica"] == "t" for o in objects)

    code, lines, _ = run_cli(capsys, "--json")  # only what Redis holds
    assert (code, [json.loads(line)["id"] for line in lines]) == (0, ids[20:])

    code, lines, _ = run_cli(capsys, "--from-start", "--stream", "s2", "--type", "FileSeen")
    expected = [i for n, i in enumerate(ids) if i in s2 and n % 5 == 0]
    assert code == 0 and [line.split()[0] for line in lines] == expected
    assert all(line.split()[1:3] == ["FileSeen", "s2"] for line in lines)

    assert asyncio.run(state(config)) == before  # read-only


def test_unreachable_redis_or_s3_exits_2_with_one_line(
    make_config: Callable[..., Config],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = make_config()
    dead = f"http://127.0.0.1:{free_port()}"
    use_env(monkeypatch, tmp_path, replace(config, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    code, lines, err = run_cli(capsys)
    assert (code, lines) == (2, [])
    assert err.count("\n") == 1 and "cannot reach Redis" in err and "Traceback" not in err

    use_env(monkeypatch, tmp_path, replace(config, s3_endpoint_url=dead))
    code, lines, err = run_cli(capsys, "--from-start")
    assert (code, lines) == (2, [])
    assert err.count("\n") == 1 and "cannot read the archive" in err and "Traceback" not in err

    use_env(monkeypatch, tmp_path, replace(config, s3_bucket_name="no-such-bucket-here"))
    code, lines, err = run_cli(capsys, "--from-start")
    assert (code, lines, err.count("\n")) == (2, [], 1)


async def test_follow_prints_new_entries_until_sigint(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config()
    async with connect(config) as (redis, _):
        log = EventLog(redis, config.events_key, "t")
        first = [
            await log.append(BytesAvailable(stream_id="s", at=AT, size=i, mtime_ns=i))
            for i in range(3)
        ]
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "cefmp4", "events", "--follow", "--json",
            env=subprocess_env(config), cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        try:

            async def next_id() -> str:
                async with asyncio.timeout(60):
                    line = await proc.stdout.readline()  # type: ignore[union-attr]
                assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                return str(json.loads(line)["id"])

            assert [await next_id() for _ in first] == first
            later = await log.append(
                StreamIdle(
                    stream_id="s", at=AT, size=3, mtime_ns=3, reason="settled", mp4="complete"
                )
            )
            assert await next_id() == later
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(30):
                code = await proc.wait()
            err = (await proc.stderr.read()).decode()
            assert code == 0, err
            assert "Traceback" not in err
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
