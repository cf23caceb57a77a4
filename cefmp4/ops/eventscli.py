"""``cefmp4 events``: print the event log, read-only.

What it prints
--------------
* By default the entries Redis holds now (the recent window once the log is
  trimmed); ``--from-start`` first the archive (``cefmp4.adapters.archive``), then
  Redis from the entry after the last archived one, so an entry that is in
  both comes out once; everything in id order.
* ``--follow`` then waits for new entries (``XREAD BLOCK``) and prints them
  as they come, until SIGINT or SIGTERM (exit 0).
* ``--stream ID`` (``data.stream_id``) and ``--type T`` keep only matching
  entries; each may be given several times (any of them matches).
* ``--json``: one object per line, ``id``, ``type``, ``v``, ``replica``,
  ``data`` (the event's JSON object): the archive's own line format, so
  ``cefmp4 events --from-start --json`` and ``zcat`` of the segments agree.
  Otherwise one readable line: id, type, stream id, replica, then the other
  fields of ``data`` as ``name=value``.

Design
------
* Nothing is written: no snapshot, no trim, no archive segment, no group.
* One cursor, the greatest id read so far (filtered out or not), decides
  what is new: :class:`View` folds pages from any source through
  ``archive_format.fresh``, so the archive/Redis overlap (entries archived
  but not yet trimmed), overlapping segments and a tail that re-reads its
  last page all print each id once. It is pure; the I/O is around it.
* Entries are not decoded into events: types and versions this build does
  not know are printed as they are, like everything else in the audit trail.
* Exit 2, with one line on stderr, when Redis or (for ``--from-start``) S3
  cannot be reached at the start: both are probed once, without retries,
  before anything is printed. Later blips are retried (Redis until it is
  back: a follower waits for the log rather than giving up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any, TextIO

import msgspec

from cefmp4.adapters.archive import EventArchive
from cefmp4.adapters.clients import Unreachable, probed_redis, s3_client
from cefmp4.adapters.eventlog import EventLog
from cefmp4.adapters.s3store import S3Store
from cefmp4.domain.archive_format import RawEntry, encode_lines, fresh
from cefmp4.domain.config import Config
from cefmp4.domain.entryids import ZERO_ID, EntryId, format_id, parse_id
from cefmp4.domain.errors import CefError

PAGE = 5_000  # entries per Redis read and per write to the output
BLOCK_MS = 5_000  # one XREAD BLOCK; below the client's socket timeout
S3_ATTEMPTS = 3


class Options(msgspec.Struct, frozen=True, kw_only=True):
    from_start: bool = False
    follow: bool = False
    json: bool = False
    streams: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()


# -- pure: filter, format, fold ---------------------------------------------


class _StreamRef(msgspec.Struct):
    stream_id: str | None = None


_stream_ref = msgspec.json.Decoder(_StreamRef)
_any = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def stream_of(entry: RawEntry) -> str | None:
    """``data.stream_id``; None when there is none (or ``data`` is no object)."""
    try:
        return _stream_ref.decode(entry.data).stream_id
    except msgspec.DecodeError:
        return None


def matches(entry: RawEntry, options: Options) -> bool:
    if options.types and entry.type not in options.types:
        return False
    return not options.streams or stream_of(entry) in options.streams


def _value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\\n\t'):
        return value
    return _encoder.encode(value).decode()


def readable(entry: RawEntry) -> str:
    """``<id> <type> <stream_id> <replica> name=value ...`` (``-`` for none)."""
    data = _any.decode(entry.data)
    if isinstance(data, dict):
        stream = data.pop("stream_id", None)
        rest = [f"{name}={_value(value)}" for name, value in data.items()]
    else:
        stream, rest = None, [f"data={_value(data)}"]
    head = [entry.id, entry.type or "-", _value(stream) if stream else "-", entry.replica or "-"]
    return " ".join(head + rest)


class View:
    """The output so far: the cursor, the filter and the format (no I/O)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._cursor: EntryId = parse_id(ZERO_ID)

    @property
    def cursor(self) -> str:
        """The greatest id seen, printed or filtered out."""
        return format_id(self._cursor)

    def page(self, entries: Iterable[RawEntry]) -> str:
        """The text for the entries of ``entries`` not seen yet (may be empty)."""
        kept, self._cursor = fresh(entries, self._cursor)
        shown = [e for e in kept if matches(e, self.options)]
        if self.options.json:
            return encode_lines(shown).decode()
        return "".join(readable(e) + "\n" for e in shown)


# -- I/O ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _archive(config: Config) -> AsyncIterator[EventArchive]:
    async with s3_client(config) as client:
        timeout, bucket = config.s3_timeout_seconds, config.s3_bucket_name
        prefix = config.event_archive_prefix
        probe = S3Store(client, bucket, timeout=timeout, attempts=1)
        try:
            # One request, no retries: a missing bucket, bad credentials or no
            # answer end the command before anything is printed.
            await probe.list_keys(prefix + ".cefmp4-probe")
        except CefError as exc:
            where = f"s3://{bucket}/{prefix} at {config.s3_endpoint_url or 'AWS'}"
            raise Unreachable(f"cannot read the archive {where}: {exc}") from exc
        yield EventArchive(S3Store(client, bucket, timeout=timeout, attempts=S3_ATTEMPTS), prefix)


class _Output:
    def __init__(self, out: TextIO) -> None:
        self._out = out

    def write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()  # a follower's reader (a pipe) sees each page at once


async def _print_archive(
    archive: EventArchive, view: View, out: _Output, stop: asyncio.Event
) -> None:
    batch: list[RawEntry] = []
    async for entry in archive.read():
        batch.append(entry)
        if len(batch) >= PAGE:
            out.write(view.page(batch))
            batch = []
            if stop.is_set():
                return
    out.write(view.page(batch))


async def _until_stopped(stop: asyncio.Event, read: asyncio.Future[list[RawEntry]]) -> bool:
    """Wait for ``read`` or ``stop``; True if stopped (``read`` cancelled)."""
    stopping = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {read, stopping}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if read.done():
        return False
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read
    return True


async def print_events(config: Config, options: Options, out: TextIO, stop: asyncio.Event) -> None:
    """Print the log as ``options`` say; return when done or when ``stop`` is set."""
    view, output = View(options), _Output(out)
    async with probed_redis(config) as redis:
        log = EventLog(redis, config.events_key, config.replica)
        if options.from_start:
            async with _archive(config) as archive:
                await _print_archive(archive, view, output, stop)
        while not stop.is_set():
            page = await log.read_raw_after(view.cursor, PAGE)
            if not page:
                break
            output.write(view.page(page))
        while options.follow and not stop.is_set():
            read = asyncio.ensure_future(log.wait_raw_after(view.cursor, PAGE, BLOCK_MS))
            if await _until_stopped(stop, read):
                return
            output.write(view.page(read.result()))


# -- command line ---------------------------------------------------------------


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``events`` on the CLI's subparsers."""
    events = commands.add_parser(
        "events", help="print the event log (read-only); --from-start includes the archive"
    )
    events.add_argument(
        "--from-start", action="store_true", help="the archive in S3 first, then Redis"
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="then print new entries until interrupted"
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument(
        "--stream", action="append", default=[], metavar="ID", help="only this stream_id"
    )
    events.add_argument(
        "--type", action="append", default=[], metavar="T", help="only events of this type"
    )


def options_from(args: argparse.Namespace) -> Options:
    return Options(
        from_start=args.from_start,
        follow=args.follow,
        json=args.json,
        streams=frozenset(args.stream),
        types=frozenset(args.type),
    )


async def _run(config: Config, options: Options, out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await print_events(config, options, out, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(config: Config, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the command; the exit code (0, or 2 when Redis/S3 cannot be read)."""
    out = out or sys.stdout
    try:
        asyncio.run(_run(config, options_from(args), out))
    except CefError as exc:
        print(f"cefmp4 events: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``| head``): done. Point stdout at /dev/null
        # so the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
