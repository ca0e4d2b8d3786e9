"""Start a local Ray or join a cluster; turn Ray's failures into one-line errors."""
from __future__ import annotations

import os
import socket

import ray

from smile_ray.errors import SmileError


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_OWN: dict[str, str | None] = {"api_server": None}  # the value this process set, if any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            # One machine that we start ourselves is not preempted; Ray Train's preemption
            # watcher would only print a core-worker error line (its actor's arguments sit
            # in the object store) for a run that works. On a cluster it stays on.
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
            # Ray Train's placement-group cleaner asks the state API about its controller
            # without an address; with two Ray instances on the machine (two jobs, or a
            # test beside a run) it finds both, and its thread dies with a traceback on the
            # terminal. Name this instance's API server (its dashboard, where one is
            # installed) so that it asks this one, and fails quietly where none runs.
            port = _free_port()
            if API_SERVER_ENV not in os.environ or os.environ[API_SERVER_ENV] == _OWN["api_server"]:
                _OWN["api_server"] = os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
            ray.init(logging_level="ERROR", logging_config=quiet, dashboard_host="127.0.0.1", dashboard_port=port)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise SmileError(f"cannot reach a Ray cluster at --address {address!r}: {detail}") from None


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0) >= v for k, v in need.items())


def _shown(resources: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU") and v > 0) or "nothing"


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """The resources of each node type the cluster's autoscaler may still add (max_count
    not 0), or None where the cluster publishes no autoscaler config (a local Ray, or a
    cluster started by hand; also an autoscaler this Ray cannot read)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an internal API: unreadable means unknown, not refused
        return None
    if config is None:
        return None
    return [dict(group.resources) for group in config.node_group_configs if group.max_count != 0]


def check_fits(bundles: list[dict[str, float]], what: str, started_here: bool) -> None:
    """Refuse at once a run whose processes no node could ever hold: no live node has a
    process's resources (``bundles``: one per kind of process, e.g. ``{"CPU": 1, "GPU":
    1}``) and no node type of the autoscaler can add one. Ray would otherwise wait for
    ever, printing "No available node types can fulfill..." every 30 s. A cluster that
    publishes no autoscaler config is refused only where this process started it
    (``started_here``: a local Ray has no autoscaler); elsewhere an autoscaler we cannot
    see may still add the node, so the run waits as Ray makes it."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    types = autoscaler_node_types()
    for bundle in bundles:
        need = {k: v for k, v in bundle.items() if v > 0}
        if any(_fits(need, r) for r in nodes) or any(_fits(need, t) for t in types or []):
            continue
        if types is None and not started_here:
            continue
        biggest = ", ".join(dict.fromkeys(_shown(r) for r in nodes)) or "none"
        scaler = "; its autoscaler adds none that has it" if types is not None else ""
        raise SmileError(f"{what} asks for {_shown(need)} per process, and no node of the Ray cluster has that "
                         f"(its nodes: {biggest}{scaler})")


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def assigned_device(name: str):
    """The device of a run inside a Ray task, actor or Train worker: ``device=auto`` is
    the GPUs Ray assigned to this process (:func:`smile_ray.recipe.pick_device`), and GPUs
    assigned where CUDA does not work fail in one line naming the node."""
    from smile_ray.recipe import resolve_device

    where = f"node {ray.util.get_node_ip_address()} ({socket.gethostname()})"
    return resolve_device(name, [str(i) for i in ray.get_gpu_ids()], where=where)


def user_error(e: BaseException) -> SmileError | None:
    """The SmileError a worker or trial raised, found through Ray's wrappers, if any."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, SmileError) and "SmileError: " not in str(cur):  # not Ray's wrapper of one
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
