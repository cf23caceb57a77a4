"""``cefmp4 doctor``: is this host and deployment fit to run the service?

One line per check, each with what to do when it is not ``ok``:

* the configuration parses;
* Redis: reachable, version >= 7 (XAUTOCLAIM, ``XINFO`` lag), AOF on (the log
  is the service's memory), ``maxmemory-policy noeviction`` (an evicting Redis
  drops log entries, leases or the snapshot silently);
* S3: reachable, the credentials accepted, the bucket there, and permission
  for every call the service makes - a real multipart round trip under a
  scratch key ``<S3_KEY_PREFIX>.doctor/<random>`` (create, upload a part,
  list parts, list uploads, complete, head, put, get, abort a second upload,
  list under ``EVENT_ARCHIVE_PREFIX``), always cleaned up with DeleteObject,
  the one call only doctor makes;
* ``S3_CHECKSUM``: which checksum the service will use (``auto`` probes the
  store as the service does, with a scratch FULL_OBJECT upload, deleted
  after), and whether a forced CRC is one the store verifies;
* the clock against S3's (the ``Date`` of its answer): warn above 60 s, fail
  above 15 min (S3 refuses signatures that far off: RequestTimeTooSkewed);
* ``FFPROBE_PATH -version`` runs;
* ``WATCH_DIR`` exists and is readable, and the inotify limits cover its
  directories (``max_user_watches``: one watch per directory;
  ``max_user_instances``).

Exit 1 when any check fails, 0 otherwise (warnings included). The checks
are pure functions of what the probes read (:class:`Check`); the probes are
the I/O around them. Nothing is changed but the scratch keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import os
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
import botocore.exceptions as bexc
import msgspec
import redis.asyncio as aioredis
import redis.exceptions as rexc

from cefmp4.adapters import checksums
from cefmp4.adapters.clients import s3_client
from cefmp4.adapters.logsetup import redact_url
from cefmp4.adapters.s3store import S3Store
from cefmp4.domain.config import Config
from cefmp4.domain.errors import CefError
from consumers.deps import utcnow
from consumers.uploads import PROBE_MARK, resolve_checksum

Level = Literal["ok", "warn", "fail"]

SKEW_WARN = timedelta(seconds=60)
SKEW_FAIL = timedelta(minutes=15)
MIN_INSTANCES = 16
PROC_INOTIFY = Path("/proc/sys/fs/inotify")
S3_TIMEOUT = 20.0

CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
POLICY_HINT = (
    "grant s3:PutObject, s3:GetObject, s3:ListBucket, s3:ListBucketMultipartUploads, "
    "s3:ListMultipartUploadParts and s3:AbortMultipartUpload on the bucket "
    "(for doctor also s3:DeleteObject on <S3_KEY_PREFIX>.doctor/*)"
)


class Check(msgspec.Struct, frozen=True):
    name: str
    level: Level
    detail: str
    fix: str = ""


def line(check: Check) -> str:
    fix = f"  -> {check.fix}" if check.fix and check.level != "ok" else ""
    return f"{check.level.upper():<4}  {check.name}: {check.detail}{fix}"


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level == "fail" for c in checks) else 0


# -- pure checks -------------------------------------------------------------------


def config_check(config: Config | None, error: str = "") -> Check:
    if config is None:
        return Check("config", "fail", error, "fix the variable named (see README, Configuration)")
    return Check(
        "config",
        "ok",
        f"WATCH_DIR {config.watch_root}, bucket {config.s3_bucket_name}, "
        f"Redis {redact_url(config.redis_url)}",
    )


def redis_version_check(version: str) -> Check:
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major >= 7:
        return Check("redis version", "ok", version)
    return Check("redis version", "fail", f"{version} (needs >= 7)", "upgrade Redis to 7 or later")


def aof_check(appendonly: str | None) -> Check:
    if appendonly is None:
        return Check("redis persistence", "warn", "cannot check: CONFIG is disabled",
                     "make sure Redis runs with appendonly yes")  # fmt: skip
    if appendonly == "yes":
        return Check("redis persistence", "ok", "AOF on")
    return Check("redis persistence", "fail", f"appendonly {appendonly}: a restart loses the log",
                 "CONFIG SET appendonly yes (and appendonly yes in redis.conf)")  # fmt: skip


def eviction_check(policy: str | None) -> Check:
    if policy is None:
        return Check("redis eviction", "warn", "cannot check: CONFIG is disabled",
                     "make sure maxmemory-policy is noeviction")  # fmt: skip
    if policy == "noeviction":
        return Check("redis eviction", "ok", "maxmemory-policy noeviction")
    return Check(
        "redis eviction",
        "fail",
        f"maxmemory-policy {policy}: Redis may evict log entries, leases or the snapshot",
        "CONFIG SET maxmemory-policy noeviction (and in redis.conf)",
    )


def skew_check(server: datetime | None, local: datetime) -> Check:
    if server is None:
        return Check("clock skew", "warn", "cannot check: S3 sent no Date header")
    skew = abs(server - local)
    detail = f"{skew.total_seconds():.0f} s against S3"
    fix = "synchronise the clock (chrony / systemd-timesyncd)"
    if skew > SKEW_FAIL:
        return Check("clock skew", "fail", detail + " (S3 refuses requests this far off)", fix)
    if skew > SKEW_WARN:
        return Check("clock skew", "warn", detail, fix)
    return Check("clock skew", "ok", detail)


def watch_dir_check(path: Path, *, exists: bool, readable: bool) -> Check:
    if not exists:
        return Check("watch dir", "fail", f"{path} does not exist",
                     "create it or set WATCH_DIR to the recorder's output directory")  # fmt: skip
    if not readable:
        return Check(
            "watch dir",
            "fail",
            f"{path} is not readable by this user",
            "grant read and search permission (or add the group: --group-add)",
        )
    return Check("watch dir", "ok", str(path))


def inotify_checks(
    directories: int, max_watches: int | None, max_instances: int | None, *, poll: bool
) -> list[Check]:
    if poll:
        return [Check("inotify", "ok", "WATCH_POLL=true: inotify not used")]
    if max_watches is None or max_instances is None:
        return [Check("inotify", "warn", "cannot read /proc/sys/fs/inotify limits")]
    checks = []
    detail = f"{directories} directories under WATCH_DIR, max_user_watches {max_watches}"
    fix = f"sysctl -w fs.inotify.max_user_watches={max(524288, directories * 4)} (and sysctl.d)"
    if directories >= max_watches:
        checks.append(Check("inotify watches", "fail", detail, fix))
    elif directories * 2 >= max_watches:
        checks.append(Check("inotify watches", "warn", detail + " (shared with the user's other"
                            " programs)", fix))  # fmt: skip
    else:
        checks.append(Check("inotify watches", "ok", detail))
    if max_instances < MIN_INSTANCES:
        checks.append(Check("inotify instances", "warn", f"max_user_instances {max_instances}",
                            "sysctl -w fs.inotify.max_user_instances=128"))  # fmt: skip
    else:
        checks.append(Check("inotify instances", "ok", f"max_user_instances {max_instances}"))
    return checks


def ffprobe_check(path: str, returncode: int | None, output: str) -> Check:
    fix = "install ffmpeg (Debian: apt-get install ffmpeg) or set FFPROBE_PATH"
    if returncode is None:
        return Check("ffprobe", "fail", f"{path}: {output}", fix)
    if returncode != 0:
        return Check("ffprobe", "fail", f"{path} -version exited {returncode}", fix)
    return Check("ffprobe", "ok", output.splitlines()[0] if output else path)


class Step(msgspec.Struct, frozen=True):
    """One S3 call of the round trip: ``error`` None when it went through."""

    call: str
    error: str | None = None
    skipped: bool = False


def permissions_check(steps: list[Step], leftovers: list[str]) -> list[Check]:
    failed = [s for s in steps if s.error is not None]
    checks = []
    if failed:
        detail = "; ".join(f"{s.call}: {s.error}" for s in failed)
        skipped = [s.call for s in steps if s.skipped]
        if skipped:
            detail += f" (not tried: {', '.join(skipped)})"
        checks.append(Check("s3 permissions", "fail", detail, POLICY_HINT))
    else:
        calls = ", ".join(s.call for s in steps)
        checks.append(Check("s3 permissions", "ok", calls))
    if leftovers:
        checks.append(
            Check(
                "s3 cleanup",
                "warn",
                f"left behind: {', '.join(leftovers)}",
                "delete them (or let the lifecycle rule abort the upload)",
            )
        )
    return checks


def s3_access_check(code: str | None, message: str, bucket: str, where: str) -> list[Check]:
    """From the first S3 call (ListObjectsV2): reachability, credentials, bucket."""
    if code == "connection":
        return [Check("s3 reachable", "fail", f"{where}: {message}",
                      "check S3_ENDPOINT_URL and the network")]  # fmt: skip
    reachable = Check("s3 reachable", "ok", where)
    if code == "no_credentials":
        return [reachable, Check("s3 credentials", "fail", message,
                                 "set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY")]  # fmt: skip
    if code in CREDENTIAL_CODES:
        return [reachable, Check("s3 credentials", "fail", f"{code}: {message}",
                                 "check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY")]  # fmt: skip
    credentials = Check("s3 credentials", "ok", "accepted")
    if code in ("NoSuchBucket", "404"):
        return [reachable, credentials, Check(
            "s3 bucket", "warn", f"{bucket} does not exist; the service creates it at start",
            "create it, or grant s3:CreateBucket",
        )]  # fmt: skip
    if code is not None:
        return [reachable, credentials, Check("s3 bucket", "fail", f"{bucket}: {code}: {message}",
                                              POLICY_HINT)]  # fmt: skip
    return [reachable, credentials, Check("s3 bucket", "ok", bucket)]


# -- probes (I/O) --------------------------------------------------------------------


def checksum_check(mode: str, algorithm: str, refused: list[str]) -> Check:
    """What S3_CHECKSUM comes to against this store (``refused``: why each
    checksum tried was not taken)."""
    why = "; ".join(refused)
    if mode == "auto" and checksums.is_crc(algorithm):
        return Check("s3 checksum", "ok", f"auto: {algorithm}, verified by the store end to end")
    if mode == "auto" and algorithm == "sha256":
        return Check("s3 checksum", "ok",
                     f"auto: sha256, each signed body verified by the store ({why})")  # fmt: skip
    if mode == "auto":
        return Check("s3 checksum", "warn", f"auto: md5 (no CRC or signed SHA-256 verified: {why})",
                     "none needed; a store with CRC64NVME/CRC32C costs less CPU")  # fmt: skip
    if mode == "sha256" and refused:
        return Check("s3 checksum", "warn", f"{mode}: {why}",
                     "set S3_CHECKSUM=auto: this store takes the parts unverified")  # fmt: skip
    if checksums.is_crc(mode) and refused:
        return Check("s3 checksum", "fail", f"{mode}: {why}",
                     "set S3_CHECKSUM=auto (or md5): uploads would be refused")  # fmt: skip
    if mode == "none":
        return Check("s3 checksum", "warn", "none: parts are not verified in transit",
                     "set S3_CHECKSUM=auto unless the store rejects every checksum")  # fmt: skip
    return Check("s3 checksum", "ok", mode)


async def probe_checksum(config: Config, client: Any, seconds: float) -> Check:
    store = S3Store(client, config.s3_bucket_name, timeout=seconds, attempts=1)
    scratch = f"{config.s3_key_prefix}.doctor/"
    mode = config.s3_checksum
    try:
        if checksums.is_crc(mode):  # forced: is it one the store verifies?
            crc = checksums.as_crc(mode)
            assert crc is not None
            await store.clear_scratch(f"{scratch}{PROBE_MARK}")  # a killed doctor's
            why = await store.probe_checksum(crc, f"{scratch}{PROBE_MARK}{secrets.token_hex(8)}")
            return checksum_check(mode, mode, [] if why is None else [why])
        # auto, and a forced sha256 (probed: a store may take it unchecked).
        algorithm, refused = await resolve_checksum(store, mode, scratch)
    except CefError as exc:
        return Check("s3 checksum", "warn", f"cannot check: {exc}")
    return checksum_check(mode, algorithm, refused)


async def probe_redis(config: Config) -> list[Check]:
    where = redact_url(config.redis_url)
    try:
        redis = aioredis.from_url(config.redis_url, socket_timeout=10, socket_connect_timeout=5)
    except ValueError as exc:
        return [Check("redis reachable", "fail", f"{where}: {exc}", "fix REDIS_URL")]
    try:
        try:
            info = await redis.info("server")
        except (rexc.RedisError, OSError) as exc:
            return [Check("redis reachable", "fail", f"{where}: {exc}",
                          "check REDIS_URL and that Redis runs")]  # fmt: skip
        checks = [Check("redis reachable", "ok", where)]
        checks.append(redis_version_check(str(info.get("redis_version", "?"))))
        checks.append(aof_check(await _config_get(redis, "appendonly")))
        checks.append(eviction_check(await _config_get(redis, "maxmemory-policy")))
        return checks
    finally:
        await redis.aclose()


async def _config_get(redis: aioredis.Redis, name: str) -> str | None:
    try:
        reply = await redis.config_get(name)
    except rexc.ResponseError:  # CONFIG renamed away or denied by an ACL
        return None
    values: dict[Any, Any] = dict(reply or {})
    value = values.get(name, values.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


def _code(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        return str(error.get("Code") or status), str(error.get("Message") or exc)
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return "no_credentials", str(exc)
    return "connection", f"{type(exc).__name__}: {exc}"


S3_ERRORS = (bexc.BotoCoreError, bexc.ClientError, aiohttp.ClientError, OSError, TimeoutError)


def _date_of(reply: Any) -> datetime | None:
    headers = (reply or {}).get("ResponseMetadata", {}).get("HTTPHeaders", {})
    raw = headers.get("date")
    if not raw:
        return None
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(raw).astimezone(UTC)
    return None


async def _call(op: Callable[[], Awaitable[Any]]) -> Any:
    async with asyncio.timeout(S3_TIMEOUT):
        return await op()


async def round_trip(client: Any, bucket: str, prefix: str) -> tuple[list[Step], list[str]]:
    """Every S3 call the service makes, under a scratch key; cleaned up always.

    Returns the steps and the keys or uploads that could not be cleaned up.
    """
    key = f"{prefix}.doctor/{secrets.token_hex(8)}"
    body = secrets.token_bytes(1024)
    md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
    steps: list[Step] = []
    uploads: list[str] = []
    written: list[str] = []
    state: dict[str, Any] = {}

    async def create() -> None:
        reply = await client.create_multipart_upload(Bucket=bucket, Key=key,
                                                     ContentType="video/mp4")  # fmt: skip
        state["upload"] = reply["UploadId"]
        uploads.append(reply["UploadId"])

    async def upload_part() -> None:
        reply = await client.upload_part(Bucket=bucket, Key=key, UploadId=state["upload"],
                                         PartNumber=1, Body=body, ContentMD5=md5)  # fmt: skip
        state["etag"] = reply["ETag"]

    async def complete() -> None:
        layout = {"Parts": [{"PartNumber": 1, "ETag": state["etag"]}]}
        await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=state["upload"],
                                               MultipartUpload=layout)  # fmt: skip
        uploads.remove(state["upload"])
        written.append(key)

    async def put() -> None:
        await client.put_object(Bucket=bucket, Key=key + ".metadata.json", Body=body,
                                ContentMD5=md5, ContentType="application/json")  # fmt: skip
        written.append(key + ".metadata.json")

    async def get() -> None:
        reply = await client.get_object(Bucket=bucket, Key=key + ".metadata.json")
        async with reply["Body"] as stream:
            if await stream.read() != body:
                raise ValueError("GetObject returned other bytes than PutObject sent")

    async def abort() -> None:
        reply = await client.create_multipart_upload(Bucket=bucket, Key=key + ".abort")
        uploads.append(reply["UploadId"])
        await client.abort_multipart_upload(Bucket=bucket, Key=key + ".abort",
                                            UploadId=reply["UploadId"])  # fmt: skip
        uploads.remove(reply["UploadId"])

    sequence: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("CreateMultipartUpload", create),
        ("UploadPart", upload_part),
        ("ListParts", lambda: client.list_parts(Bucket=bucket, Key=key,
                                                UploadId=state["upload"])),
        ("ListMultipartUploads", lambda: client.list_multipart_uploads(Bucket=bucket,
                                                                       Prefix=prefix)),
        ("CompleteMultipartUpload", complete),
        ("HeadObject", lambda: client.head_object(Bucket=bucket, Key=key)),
        ("PutObject", put),
        ("GetObject", get),
        ("AbortMultipartUpload", abort),
    ]  # fmt: skip
    needs = {"UploadPart": "upload", "ListParts": "upload", "CompleteMultipartUpload": "etag",
             "HeadObject": "done", "GetObject": "put"}  # fmt: skip
    try:
        for call, op in sequence:
            need = needs.get(call)
            have = {"upload": "upload" in state, "etag": "etag" in state,
                    "done": key in written, "put": key + ".metadata.json" in written}  # fmt: skip
            if need is not None and not have[need]:
                steps.append(Step(call, skipped=True))
                continue
            try:
                await _call(op)
                steps.append(Step(call))
            except (*S3_ERRORS, ValueError) as exc:
                code, message = _code(exc) if not isinstance(exc, ValueError) else ("", str(exc))
                steps.append(Step(call, error=f"{code} {message}".strip()))
    finally:
        leftovers = await _clean(client, bucket, key, uploads, written)
    return steps, leftovers


async def _clean(
    client: Any, bucket: str, key: str, uploads: list[str], written: list[str]
) -> list[str]:
    left = []
    for upload in uploads:
        try:
            with contextlib.suppress(bexc.ClientError):  # NoSuchUpload: gone already
                await _call(lambda u=upload: client.abort_multipart_upload(  # type: ignore[misc]
                    Bucket=bucket, Key=key, UploadId=u))  # fmt: skip
        except S3_ERRORS:
            left.append(f"upload {upload} of {key}")
    for written_key in written:
        try:
            await _call(lambda k=written_key: client.delete_object(Bucket=bucket, Key=k))  # type: ignore[misc]
        except S3_ERRORS:
            left.append(written_key)
    return left


async def probe_s3(config: Config, now: Callable[[], datetime] = utcnow) -> list[Check]:
    bucket = config.s3_bucket_name
    where = config.s3_endpoint_url or "AWS"
    timeout = min(config.s3_timeout_seconds, S3_TIMEOUT)
    async with s3_client(config, pool=2, request_timeout=timeout) as client:
        reply: Any = None
        code: str | None = None
        message = ""
        try:
            reply = await _call(lambda: client.list_objects_v2(
                Bucket=bucket, Prefix=config.event_archive_prefix, MaxKeys=1))  # fmt: skip
        except S3_ERRORS as exc:
            code, message = _code(exc)
            if isinstance(exc, bexc.ClientError):
                reply = exc.response
        local = now()
        checks = s3_access_check(code, message, bucket, where)
        if reply is not None:
            checks.append(skew_check(_date_of(reply), local))
        if code is None:
            steps, leftovers = await round_trip(client, bucket, config.s3_key_prefix)
            # The first call above was ListObjectsV2 (the archive's listing).
            checks += permissions_check([Step("ListObjectsV2"), *steps], leftovers)
            checks.append(await probe_checksum(config, client, timeout))
        elif checks[-1].name == "s3 bucket":
            checks.append(Check("s3 permissions", "warn", "not checked: no bucket to check in"))
        return checks


async def probe_ffprobe(path: str) -> Check:
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "-version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
    except (OSError, TimeoutError) as exc:
        return ffprobe_check(path, None, str(exc))
    return ffprobe_check(path, proc.returncode, out.decode(errors="replace"))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def count_directories(root: Path, limit: int) -> int:
    """Directories under ``root`` (itself included), counting stops past ``limit``."""
    count = 0
    for _dirpath, _dirs, _files in os.walk(root):
        count += 1
        if count > limit:
            break
    return count


async def probe_watch_dir(config: Config, proc: Path = PROC_INOTIFY) -> list[Check]:
    root = config.watch_root
    exists = root.is_dir()
    readable = exists and os.access(root, os.R_OK | os.X_OK)
    checks = [watch_dir_check(root, exists=exists, readable=readable)]
    if not readable:
        return checks
    watches = _read_int(proc / "max_user_watches")
    instances = _read_int(proc / "max_user_instances")
    limit = (watches or 1_000_000) + 1
    directories = await asyncio.to_thread(count_directories, root, limit)
    return checks + inotify_checks(directories, watches, instances, poll=config.watch_poll)


async def run_checks(config: Config) -> list[Check]:
    checks = [config_check(config)]
    checks += await probe_redis(config)
    checks += await probe_s3(config)
    checks.append(await probe_ffprobe(config.ffprobe_path))
    checks += await probe_watch_dir(config)
    return checks


def main(config: Config | None, config_error: str, out: TextIO) -> int:
    """The command: one line per check; exit 1 if any failed."""
    if config is None:
        checks = [config_check(None, config_error)]
    else:
        checks = asyncio.run(run_checks(config))
    for check in checks:
        print(line(check), file=out)
    return exit_code(checks)
