"""Read the configuration from where an operator puts it: the environment and ./.env.

The one place that reads either; everything else is handed the immutable
``Config`` that ``cefmp4.domain.config.parse`` makes of them. The environment
wins over the file, as in most twelve-factor services.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from pathlib import Path

import msgspec
from dotenv import dotenv_values

from cefmp4.domain.config import Config, parse


def load(environ: Mapping[str, str], env_file: Path | None = Path(".env")) -> Config:
    """Build the Config from ``environ`` over ``env_file``; raise ConfigError."""
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(environ)
    return parse(values)


def named_replica(config: Config) -> Config:
    """``config`` with REPLICA_ID set: as given, else this process on this
    host (``<host>-<pid>``; platform.node() is the host name, from uname)."""
    if config.replica_id:
        return config
    return msgspec.structs.replace(config, replica_id=f"{platform.node()}-{os.getpid()}")
