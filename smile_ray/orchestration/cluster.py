"""Start a local Ray or join a cluster; turn Ray's failures into one-line errors."""
from __future__ import annotations

import socket

import ray

from smile_ray.errors import SmileError


def check_address(address: str | None) -> None:
    """Fail fast on an unreachable head (``ray.init`` itself retries for minutes)."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SmileError(f"--address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SmileError(f"cannot reach a Ray cluster at --address {address!r}: {e.strerror or e}") from None


def connect(address: str | None = None) -> None:
    """Start a local Ray (no address) or join an existing cluster (``auto``, ``host:port``,
    ``ray://host:port``); an unreachable address is a one-line SmileError."""
    check_address(address)
    if ray.is_initialized():
        return
    try:
        # Workers' own lines (progress, errors) reach this terminal; Ray's log chatter does
        # not (without a dashboard, Train's placement-group cleaner warns every few seconds).
        quiet = ray.LoggingConfig(log_level="ERROR")
        if address:
            ray.init(address=address, logging_level="ERROR", logging_config=quiet)
        else:
            ray.init(logging_level="ERROR", logging_config=quiet)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise SmileError(f"cannot reach a Ray cluster at --address {address!r}: {detail}") from None


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def user_error(e: BaseException) -> SmileError | None:
    """The SmileError a worker or trial raised, found through Ray's wrappers, if any."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, SmileError):
            return SmileError(str(cur))
        stack.extend([cur.__cause__, cur.__context__])
        for attr in ("worker_failures", "errors"):
            value = getattr(cur, attr, None)
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
        text = str(cur)
        if "SmileError: " in text:
            return SmileError(text.split("SmileError: ", 1)[1].strip().splitlines()[0])
    return None
