"""The operator's CLI (`ciris-billing`) run in this process with click's runner.

A command sees exactly the environment it is given (as a subprocess would): the settings are
read afresh for it, and the logging it sets up for itself is undone afterwards. It runs on a
thread of its own, as it calls asyncio.run and the caller may be inside an event loop. The
commands that must be processes of their own (`serve`) are started by servers.py.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from click.testing import CliRunner
from structlog._config import BoundLoggerLazyProxy

from ciris_billing.cli import main
from ciris_billing.config import get_settings


@dataclass(frozen=True)
class CliResult:
    """What a finished command left: its exit status and what it printed on each stream."""

    returncode: int
    stdout: str
    stderr: str


def cli(env: Mapping[str, str], *args: str) -> CliResult:
    """`ciris-billing ARGS` with `env` as its whole environment."""
    with ThreadPoolExecutor(1, thread_name_prefix="ciris-billing-cli") as pool:
        return pool.submit(_invoke, dict(env), args).result(timeout=120)


def create_key(env: Mapping[str, str], scopes: str = "admin") -> str:
    created = cli(env, "keys", "create", "--name", "test", "--scopes", scopes)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


def _invoke(env: dict[str, str], args: tuple[str, ...]) -> CliResult:
    # The runner sets these for the command and puts everything back after it.
    environment: dict[str, str | None] = {name: None for name in os.environ if name not in env}
    environment.update(env)
    root = logging.getLogger()
    handlers, level, logging_config = root.handlers[:], root.level, structlog.get_config()
    get_settings.cache_clear()
    _forget_cached_loggers()
    try:
        result = CliRunner().invoke(main, list(args), env=environment, catch_exceptions=True)
    finally:
        get_settings.cache_clear()
        _forget_cached_loggers()
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**logging_config)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # What the process would have printed before exiting 1.
        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


def _forget_cached_loggers() -> None:
    """Our modules' loggers keep the output they were first used with (structlog's
    cache_logger_on_first_use); a fresh process has none, so the command's own logging (to its
    stderr) takes hold, and afterwards the app's again."""
    for name, module in list(sys.modules.items()):
        if name.startswith("ciris_billing"):
            for value in vars(module).values():
                if isinstance(value, BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)
