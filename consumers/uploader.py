"""The ``uploaders`` group: send whole parts while a recording grows.

Handles ``FileSeen`` and ``BytesAvailable`` (and the watcher's ``FileDeleted`` /
``FileTruncated``, which end a stream). The event is only a trigger: the
handler looks at the projection and the file *now* and sends every whole part
not yet in S3. Duplicate or late triggers therefore do nothing, and a burst of
``BytesAvailable`` costs one pass. Only whole parts are sent (see
``cefmp4.domain.partplan``); the multipart upload is created when the first exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from cefmp4.adapters import files
from cefmp4.adapters.leases import Fence
from cefmp4.domain.errors import NoSuchUpload
from cefmp4.domain.events import BytesAvailable, Event, FileDeleted, FileSeen, FileTruncated
from cefmp4.domain.partplan import whole_parts
from consumers.deps import Deps
from consumers.uploads import Uploads, check_size, matches
from projections.streams import StreamState

log = structlog.get_logger(__name__)

WANTS: tuple[type[Event], ...] = (FileSeen, BytesAvailable, FileDeleted, FileTruncated)


class Uploader:
    group = "uploaders"
    wants = WANTS

    def __init__(self, deps: Deps, uploads: Uploads) -> None:
        self._deps = deps
        self._uploads = uploads

    async def handle(self, event: Event) -> None:
        async with self._uploads.leased(event.stream_id) as held:
            if held is None:
                return
            async with self._uploads.stream_slots:
                await self.sync(*held)

    def _went_idle(self, stream_id: str) -> Callable[[], Awaitable[bool]]:
        """True once the watcher called the stream idle: the finalizer is
        waiting for the stream's lease, and will send the rest reading each part once,
        instead of us sending it and the finalizer reading it all again."""

        async def check() -> bool:
            state = (await self._deps.projection.catch_up()).streams.get(stream_id)
            return state is not None and state.status == "idle"

        return check

    async def sync(self, s: StreamState, fence: Fence) -> None:
        """Send every whole part of the current file that S3 does not have."""
        current = files.stat(s.path)
        if current is None or current.inode != s.inode:
            return  # the watcher reports what happened to the path
        plan = self._deps.plan_of(s)
        check_size(current.size, plan)  # past 5 TiB it can never complete: stop now
        spans = list(whole_parts(current.size, plan))
        if not spans or all(matches(s.parts.get(sp.number), sp) for sp in spans):
            return
        upload_id = await self._uploads.ensure_upload(s, fence)
        try:
            parts = await self._uploads.reconcile(s, upload_id, current.size, fence)
            missing = [sp for sp in spans if not matches(parts.get(sp.number), sp)]
            await self._uploads.send(
                s, upload_id, missing, "growing", fence, give_way=self._went_idle(s.stream_id)
            )
        except NoSuchUpload:
            upload_id = await self._uploads.restart_upload(s, fence)
            await self._uploads.send(s, upload_id, spans, "resend", fence)
        except (files.FileGone, files.FileShrank) as exc:
            log.info("file changed while reading; waiting for the watcher", error=str(exc))
