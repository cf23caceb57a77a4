"""Talking to a running service's HTTP endpoint (tests only).

``endpoint_port`` reads the port a ``ServiceProcess`` logged (``PROM_PORT=0``
and the default pick one); ``get`` answers status and body without raising
on 4xx/5xx; ``poll`` waits for a condition with a deadline (never a sleep
standing in for one); ``promtool`` is the binary or a test failure (deploy/
bootstrap.sh installs it).
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import pytest

from tests.harness import ServiceProcess

T = TypeVar("T")

_PORT_LINE = re.compile(r"metrics endpoint.*?\bport[\"=:\s]+(\d+)")


def poll(probe: Callable[[], T | None], *, timeout: float = 60.0, what: str = "") -> T:
    """``probe()`` until it returns something other than None; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or probe}")
        time.sleep(0.05)


def endpoint_port(service: ServiceProcess, timeout: float = 30.0) -> int:
    def logged() -> int | None:
        found = _PORT_LINE.search(service.log_tail(1_000_000))
        return int(found.group(1)) if found else None

    return poll(logged, timeout=timeout, what=f"the metrics port in the log:\n{service.tail()}")


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run deploy/bootstrap.sh (Debian package prometheus)")
    return path


def until_answer(
    port: int, path: str, accept: Callable[[int], bool], *, timeout: float = 60.0, what: str = ""
) -> tuple[int, bytes]:
    """GET ``path`` until its status satisfies ``accept``; that answer."""

    def probe() -> tuple[int, bytes] | None:
        answer = get(port, path)
        return answer if accept(answer[0]) else None

    return poll(probe, timeout=timeout, what=what or f"{path} to answer as expected")
