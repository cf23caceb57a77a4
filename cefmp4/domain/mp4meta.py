"""What a finished MP4's boxes say about it: duration, tracks, codecs.

The metadata sidecar used to run ffprobe on every recording; for a backlog of
small files that process was most of the cost. For the common case - H.264
video and AAC-LC audio in a plain (not fragmented) MP4 - everything the
sidecar lists can be read from ``moov`` exactly as ffprobe's mov demuxer and
H.264 parser compute it:

* format ``duration`` = ``mvhd`` duration / timescale, rounded to microseconds;
  format ``bit_rate`` = file size * 8 / that duration;
* per track: ``hdlr`` handler type -> ``codec_type``; ``stsd`` fourcc (plus the
  ``esds`` object type) -> ``codec_name``; ``avcC``'s SPS -> ``profile``, the
  cropped ``width``/``height`` and ``pix_fmt`` (``yuvj420p`` when full-range);
  the AAC AudioSpecificConfig -> ``profile``, ``sample_rate``, ``channels``;
  ``stsz`` sum * 8 / the track's duration (its one edit, else ``mdhd``) ->
  ``bit_rate``; sample count / duration -> ``avg_frame_rate``.

Anything outside that set (another codec, HE-AAC, 10-bit or 4:2:2 video,
several edits, fragments, a moov that does not parse) gives ``None`` with a
reason, and the caller asks ffprobe. ``describe_moov`` is pure and never
raises; there is no I/O here (``cefmp4.adapters.mp4files.describe_file`` reads).
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from typing import Any

import msgspec

from cefmp4.domain.mp4 import Source

__all__ = ["BoxDescription", "Undescribed", "describe_moov", "describe_source", "find_moov"]

FORMAT_NAME = "mov,mp4,m4a,3gp,3g2,mj2"  # ffprobe's name for its mov demuxer
FORMAT_LONG_NAME = "QuickTime / MOV"
# A moov bigger than this is read by ffprobe instead (hours of recording at a
# high frame rate stay far below it: ~12 bytes per sample).
MAX_MOOV_BYTES = 64 * 1024 * 1024
_INT_MAX = 2**31 - 1
# The order of consumers.metadata's ffprobe stream summary, so the sidecar's
# JSON reads the same whichever way it was described.
STREAM_FIELDS = ("index", "codec_type", "codec_name", "profile", "width", "height", "pix_fmt",
                 "avg_frame_rate", "sample_rate", "channels", "bit_rate")  # fmt: skip
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000,
              7350)  # fmt: skip
# profile_idc whose stream is 8-bit 4:2:0 by definition (no chroma/bit-depth syntax).
_PLAIN_H264 = {66: "Baseline", 77: "Main", 88: "Extended", 100: "High"}
_HIGH_SYNTAX = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


class BoxDescription(msgspec.Struct, frozen=True):
    """ffprobe's summary fields, as ``consumers.metadata.summarize`` keeps them."""

    duration_seconds: float
    container: dict[str, Any]
    streams: list[dict[str, Any]]


class Undescribed(msgspec.Struct, frozen=True):
    """The boxes do not settle it; ``reason`` says why (for logs and tests)."""

    reason: str


class _Bad(Exception):
    """The boxes do not give a description (unsupported or malformed)."""


def _boxes(buf: bytes, start: int, end: int) -> dict[str, list[tuple[int, int]]]:
    """Children of ``buf[start:end]`` by type: (payload start, end) each."""
    found: dict[str, list[tuple[int, int]]] = {}
    offset = start
    while offset + 8 <= end:
        size, raw = struct.unpack_from(">I4s", buf, offset)
        header = 8
        if size == 1:
            if offset + 16 > end:
                raise _Bad("truncated largesize header")
            (size,) = struct.unpack_from(">Q", buf, offset + 8)
            header = 16
        if size < header or offset + size > end:
            raise _Bad(f"box {raw!r} does not fit its parent")
        found.setdefault(raw.decode("latin-1"), []).append((offset + header, offset + size))
        offset += size
    if offset != end:
        raise _Bad("boxes do not tile their parent")
    return found


def _one(children: dict[str, list[tuple[int, int]]], name: str) -> tuple[int, int]:
    got = children.get(name, [])
    if len(got) != 1:
        raise _Bad(f"{len(got)} {name} boxes")
    return got[0]


def _full_box_times(buf: bytes, start: int) -> tuple[int, int]:
    """(timescale, duration) of an mvhd/mdhd payload (version 0 or 1)."""
    version = buf[start]
    if version == 1:
        timescale, duration = struct.unpack_from(">IQ", buf, start + 20)
    elif version == 0:
        timescale, duration = struct.unpack_from(">II", buf, start + 12)
    else:
        raise _Bad(f"header version {version}")
    if timescale == 0:
        raise _Bad("timescale 0")
    return timescale, duration


def _rescale(a: int, b: int, c: int) -> int:
    """a * b / c rounded half away from zero, as FFmpeg's av_rescale."""
    return (2 * a * b + c) // (2 * c)


class _Bits:
    """A big-endian bit reader over an RBSP (emulation prevention removed)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._left = len(data) * 8

    def u(self, n: int) -> int:
        if n > self._left:
            raise _Bad("SPS ends early")
        self._left -= n
        return (self._value >> self._left) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise _Bad("exp-Golomb code too long")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def _rbsp(nal: bytes) -> bytes:
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt != 0:
            nxt = (last + bits.se() + 256) % 256
        last = nxt if nxt != 0 else last


def _h264(sps_nal: bytes) -> dict[str, Any]:
    """profile, width, height, pix_fmt from an SPS NAL unit (header byte included)."""
    bits = _Bits(_rbsp(sps_nal[1:]))
    profile_idc, flags = bits.u(8), bits.u(8)
    bits.u(8)  # level
    bits.ue()  # seq_parameter_set_id
    if profile_idc not in _PLAIN_H264:
        raise _Bad(f"H.264 profile_idc {profile_idc}")
    if profile_idc in _HIGH_SYNTAX:
        if bits.ue() != 1 or bits.ue() != 0 or bits.ue() != 0:  # 4:2:0, 8-bit luma and chroma
            raise _Bad("H.264 High profile SPS is not 8-bit 4:2:0")
        bits.u(1)  # qpprime_y_zero_transform_bypass
        if bits.u(1):  # seq_scaling_matrix_present
            for i in range(8):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        for _ in range(min(bits.ue(), 255)):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_allowed
    mbs_w, map_h = bits.ue() + 1, bits.ue() + 1
    frame_mbs_only = bits.u(1)
    if not frame_mbs_only:
        raise _Bad("interlaced H.264")  # field pictures: leave the arithmetic to ffprobe
    bits.u(1)  # direct_8x8_inference
    crop = (bits.ue(), bits.ue(), bits.ue(), bits.ue()) if bits.u(1) else (0, 0, 0, 0)
    full_range = 0
    if bits.u(1):  # vui_parameters_present
        if bits.u(1) and bits.u(8) == 255:  # aspect_ratio_info, Extended_SAR
            bits.u(32)
        if bits.u(1):  # overscan_info_present
            bits.u(1)
        if bits.u(1):  # video_signal_type_present
            bits.u(3)
            full_range = bits.u(1)
    width = mbs_w * 16 - 2 * (crop[0] + crop[1])
    height = map_h * 16 - 2 * (crop[2] + crop[3])
    if width <= 0 or height <= 0:
        raise _Bad("H.264 cropping leaves no picture")
    profile = _PLAIN_H264[profile_idc]
    if profile_idc == 66 and flags & 0x40:  # constraint_set1
        profile = "Constrained Baseline"
    return {
        "profile": profile,
        "width": width,
        "height": height,
        "pix_fmt": "yuvj420p" if full_range else "yuv420p",
    }


def _avcc_sps(buf: bytes, start: int, end: int) -> bytes:
    if end - start < 8 or buf[start] != 1:
        raise _Bad("avcC version")
    count = buf[start + 5] & 0x1F
    if count < 1:
        raise _Bad("avcC without SPS")
    (length,) = struct.unpack_from(">H", buf, start + 6)
    if start + 8 + length > end or length < 4:
        raise _Bad("avcC SPS does not fit")
    return buf[start + 8 : start + 8 + length]


def _descriptor(buf: bytes, offset: int, end: int) -> tuple[int, int, int]:
    """(tag, payload start, payload end) of an MPEG-4 descriptor."""
    if offset >= end:
        raise _Bad("esds ends early")
    tag = buf[offset]
    size = 0
    offset += 1
    for _ in range(4):
        if offset >= end:
            raise _Bad("esds ends early")
        byte = buf[offset]
        offset += 1
        size = (size << 7) | (byte & 0x7F)
        if not byte & 0x80:
            break
    if offset + size > end:
        raise _Bad("esds descriptor does not fit")
    return tag, offset, offset + size


def _aac(buf: bytes, start: int, end: int) -> dict[str, Any]:
    """profile, sample_rate, channels from an esds payload (AAC-LC only)."""
    tag, p, q = _descriptor(buf, start + 4, end)  # after version/flags
    if tag != 3:
        raise _Bad("esds without ES_Descriptor")
    es_flags = buf[p + 2]
    p += 3 + (2 if es_flags & 0x80 else 0)
    if es_flags & 0x40:
        p += 1 + buf[p]
    if es_flags & 0x20:
        p += 2
    tag, p, q = _descriptor(buf, p, q)
    if tag != 4 or q - p < 13:
        raise _Bad("esds without DecoderConfigDescriptor")
    if buf[p] != 0x40:
        raise _Bad(f"mp4a object type 0x{buf[p]:02x} is not AAC")
    tag, p, q = _descriptor(buf, p + 13, q)
    if tag != 5 or q - p < 2:
        raise _Bad("AAC without AudioSpecificConfig")
    bits = _Bits(buf[p:q])
    aot, rate_index, channels = bits.u(5), bits.u(4), bits.u(4)
    if aot != 2 or rate_index >= len(_AAC_RATES) or not 1 <= channels <= 6:
        raise _Bad(f"AAC object type {aot}, rate index {rate_index}, channels {channels}")
    return {"profile": "LC", "sample_rate": str(_AAC_RATES[rate_index]), "channels": channels}


def _table_total(buf: bytes, start: int, end: int, kind: str) -> tuple[int, int]:
    """stts: (sample count, duration sum); stsz: (sample count, byte sum)."""
    if end - start < 8:
        raise _Bad(f"{kind} too short")
    if kind == "stsz":
        fixed, count = struct.unpack_from(">II", buf, start + 4)
        if fixed:
            return count, fixed * count
        if 12 + 4 * count > end - start:
            raise _Bad("stsz entries do not fit")
        return count, sum(struct.unpack_from(f">{count}I", buf, start + 12))
    (entries,) = struct.unpack_from(">I", buf, start + 4)
    if 8 + 8 * entries > end - start:
        raise _Bad("stts entries do not fit")
    pairs = struct.unpack_from(f">{2 * entries}I", buf, start + 8)
    counts, deltas = pairs[0::2], pairs[1::2]
    return sum(counts), sum(c * d for c, d in zip(counts, deltas, strict=True))


def _check_edits(buf: bytes, trak: dict[str, list[tuple[int, int]]]) -> None:
    """No edit list, or one edit that is not empty."""
    if "edts" not in trak:
        return
    edts = _boxes(buf, *_one(trak, "edts"))
    start, end = _one(edts, "elst")
    version = buf[start]
    (entries,) = struct.unpack_from(">I", buf, start + 4)
    if entries != 1:
        raise _Bad(f"edit list with {entries} entries")
    if version == 1:
        (media_time,) = struct.unpack_from(">q", buf, start + 16)
    else:
        (media_time,) = struct.unpack_from(">i", buf, start + 12)
    if media_time < 0 or end - start < 8 + (20 if version == 1 else 12):
        raise _Bad("empty or malformed edit")


def _track(buf: bytes, start: int, end: int, index: int) -> dict[str, Any]:
    trak = _boxes(buf, start, end)
    mdia = _boxes(buf, *_one(trak, "mdia"))
    timescale, media_duration = _full_box_times(buf, _one(mdia, "mdhd")[0])
    hdlr_start, _ = _one(mdia, "hdlr")
    handler = buf[hdlr_start + 8 : hdlr_start + 12]
    stbl = _boxes(buf, *_one(_boxes(buf, *_one(mdia, "minf")), "stbl"))
    stsd_start, stsd_end = _one(stbl, "stsd")
    (entries,) = struct.unpack_from(">I", buf, stsd_start + 4)
    entry = _boxes(buf, stsd_start + 8, stsd_end)
    if entries != 1 or sum(len(v) for v in entry.values()) != 1:
        raise _Bad("stsd does not hold exactly one sample entry")
    fourcc, ((e_start, e_end),) = next(iter(entry.items()))
    samples, stts_sum = _table_total(buf, *_one(stbl, "stts"), "stts")
    sizes, data_size = _table_total(buf, *_one(stbl, "stsz"), "stsz")
    if samples != sizes:
        raise _Bad("stts and stsz disagree on the sample count")
    # ffprobe's track duration (for bit_rate and avg_frame_rate) is mdhd's,
    # cut to the sample durations; the edit list does not enter it, but only
    # the plain single-edit case is known to agree.
    duration = min(media_duration, stts_sum) if stts_sum else media_duration
    _check_edits(buf, trak)
    if duration <= 0:
        raise _Bad("track without duration")
    bit_rate = data_size * 8 * timescale // duration  # FFmpeg 5.1 truncates
    stream: dict[str, Any] = {"index": index}
    if handler == b"vide" and fourcc in ("avc1", "avc3"):
        # VisualSampleEntry: 8 reserved + 70 bytes of fields, then its boxes.
        avcc = _one(_boxes(buf, e_start + 78, e_end), "avcC")
        rate = Fraction(samples * timescale, duration)
        if rate.numerator > _INT_MAX or rate.denominator > _INT_MAX:
            raise _Bad("frame rate does not reduce to 32-bit terms")
        stream |= {"codec_type": "video", "codec_name": "h264"}
        stream |= _h264(_avcc_sps(buf, *avcc))
        stream |= {"avg_frame_rate": f"{rate.numerator}/{rate.denominator}"}
    elif handler == b"soun" and fourcc == "mp4a":
        # AudioSampleEntry v0: 8 reserved + 20 bytes of fields, then its boxes.
        if struct.unpack_from(">H", buf, e_start + 8)[0] != 0:
            raise _Bad("QuickTime sound sample entry version")
        esds = _one(_boxes(buf, e_start + 28, e_end), "esds")
        stream |= {"codec_type": "audio", "codec_name": "aac"}
        stream |= _aac(buf, *esds)
        stream |= {"avg_frame_rate": "0/0"}
    else:
        raise _Bad(f"track {index}: handler {handler!r} with {fourcc!r}")
    stream["bit_rate"] = str(bit_rate)
    return {k: stream[k] for k in STREAM_FIELDS if k in stream}


def describe_moov(moov: bytes, file_size: int) -> BoxDescription | Undescribed:
    """Pure: ffprobe's summary of a file of ``file_size`` bytes whose moov
    payload (the bytes after its header) is ``moov``. Never raises."""
    try:
        top = _boxes(moov, 0, len(moov))
        if "mvex" in top:
            raise _Bad("fragmented (mvex)")
        movie_timescale, movie_duration = _full_box_times(moov, _one(top, "mvhd")[0])
        traks = top.get("trak", [])
        if not traks:
            raise _Bad("no tracks")
        streams = [_track(moov, s, e, i) for i, (s, e) in enumerate(traks)]
    except _Bad as exc:
        return Undescribed(str(exc))
    except (struct.error, IndexError, ValueError, ZeroDivisionError) as exc:
        return Undescribed(f"malformed moov: {exc}")
    duration_us = _rescale(movie_duration, 1_000_000, movie_timescale)
    if duration_us <= 0:
        return Undescribed("movie without duration")
    bit_rate = file_size * 8.0 * 1_000_000 / duration_us
    seconds = duration_us / 1_000_000
    if not math.isfinite(bit_rate):
        return Undescribed("movie bit rate out of range")
    container = {
        "format_name": FORMAT_NAME,
        "format_long_name": FORMAT_LONG_NAME,
        "bit_rate": int(bit_rate),
        "nb_streams": len(streams),
    }
    return BoxDescription(seconds, container, streams)


def find_moov(src: Source) -> bytes | str:
    """The payload of the one top-level moov of ``src``, or why not. Pure
    over the slicing interface (``mp4.Source``); a short slice is a file that
    shrank under the reader."""
    size = len(src)
    offset = 0
    found: bytes | None = None
    while offset + 8 <= size:
        head = bytes(src[offset : offset + 16])
        if len(head) < 8:
            return "file shrank"
        box_size, raw = struct.unpack_from(">I4s", head)
        header = 8
        if box_size == 1 and len(head) == 16:
            (box_size,) = struct.unpack_from(">Q", head, 8)
            header = 16
        if box_size < header or offset + box_size > size:
            return f"top-level box {raw!r} does not fit the file"
        if raw in (b"moof", b"mfra"):
            return "fragmented"
        if raw == b"moov":
            if found is not None:
                return "several moov boxes"
            if box_size - header > MAX_MOOV_BYTES:
                return f"moov of {box_size} bytes"
            found = bytes(src[offset + header : offset + box_size])
            if len(found) != box_size - header:
                return "file shrank"
        offset += box_size
    return found if found is not None else "no moov box"


def describe_source(src: Source) -> BoxDescription | Undescribed:
    """``describe_moov`` of the file ``src`` reads (``cefmp4.adapters.mp4files``)."""
    moov = find_moov(src)
    if isinstance(moov, str):
        return Undescribed(moov)
    return describe_moov(moov, len(src))
