"""What the server's processes share: how one is started, how it starts, how it runs its loop.

The supervisor (``muxserve serve``) starts the engine process and K frontend processes as
``python -m <module> <address>``, the settings in one environment variable (JSON). Each child
dies with its parent (SIGTERM, so it still drains) and leaves Ctrl-C to the supervisor.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from muxserve.serving.settings import Settings

SETTINGS_ENV = "MUXSERVE_PROCESS_SETTINGS"
READY_FD_ENV = "MUXSERVE_READY_FD"
PR_SET_PDEATHSIG = 1


OPEN_FILES_UNLIMITED = 1 << 20  # the soft limit taken under an unlimited hard one (Linux's default nr_open)


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit, for this process and the ones it
    starts (they inherit it), as nginx's ``worker_rlimit_nofile`` and Go's runtime do. Every
    connection is a file, and a soft limit of 1024 (a common default) is one client address's
    burst of new connections (``--client-connection-burst``): past it the frontend could
    accept nobody else. Returns the soft limit now in force (0 where there is none to read)."""
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, OPEN_FILES_UNLIMITED)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def spawn(module: str, args: Sequence[str], settings: Settings, pass_fds: Sequence[int] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, **(env or {}), SETTINGS_ENV: settings.model_dump_json()}
    return subprocess.Popen([sys.executable, "-m", module, *args], env=environment, pass_fds=tuple(pass_fds))


def child_settings() -> Settings:
    """In a child: the supervisor's settings; logging configured; dies with the supervisor."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own SIGTERM still drains us
        pass
    return settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def wait_while(busy: Callable[[], bool], changed: asyncio.Event, grace: float) -> None:
    """Wait while ``busy()``, at most ``grace`` seconds, looking again whenever ``changed`` is set
    (a server draining its connections: ``changed`` is set as each one finishes a call)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while busy() and loop.time() < deadline:
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), deadline - loop.time())
        except TimeoutError:
            return


def signal_ready() -> None:
    """Tell the supervisor (through the pipe it passed) that this process serves."""
    fd = os.environ.get(READY_FD_ENV)
    if fd:
        os.write(int(fd), b"R")
        os.close(int(fd))
