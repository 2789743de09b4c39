"""vltune serve policy: serve a trained VLA policy to robots over HTTP / websocket (OpenVLA-OFT's POST /act).

    vltune serve policy --policy out/mw                       # http://127.0.0.1:8777/act
    vltune serve policy --policy out/mw --host 0.0.0.0 --api_key "$KEY"
    vltune eval vla --policy_server http://127.0.0.1:8777 --tasks drawer-open-v3    # the env in the client

Clients: an OpenVLA-OFT script (`requests.post(url + "/act", json=obs)` with json_numpy) works unchanged;
`vltune.vla.client.PolicyClient(url).step(obs)` adds robot sessions, msgpack bodies and background chunk
fetching. Routes, encodings and sessions: vltune/vla/server.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..args import parse_args
from ..console import setup_logging
from ..errors import UsageError
from ..hardware import torch_threads

logger = logging.getLogger("vltune")
SMOKE_POLICY = "output/vla"  # where `vltune vla --max_steps 20` (the offline smoke run) writes its policy


@dataclass
class PolicyServeArguments:
    policy: str | None = field(default=None, metadata={
        "help": f"A `vltune vla` output or checkpoint directory. Default: {SMOKE_POLICY}, the policy of the offline "
                "smoke run `vltune vla --max_steps 20`."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind. The default answers this machine only; 0.0.0.0 opens it to the network "
                "(set --api_key then)."})
    port: int = field(default=8777, metadata={"help": "TCP port (8777 is OpenVLA-OFT's)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Require `Authorization: Bearer KEY` (or X-API-Key) on every route but /health. Default: the "
                "VLTUNE_API_KEY environment variable, else no key."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | mps."})
    threads: int = field(default=1, metadata={
        "help": "torch threads for the policy (1 = steady latency beside other work on a CPU)."})
    max_batch: int = field(default=8, metadata={
        "help": "Most robot sessions whose frames go through the backbone in one forward."})
    batch_wait_ms: float = field(default=0.0, metadata={
        "help": "Extra time to wait for more sessions before a forward (0 = batch only what queued while the "
                "previous forward ran; more = larger batches, more latency)."})
    max_sessions: int = field(default=64, metadata={"help": "Robot sessions open at once."})
    session_ttl_s: float = field(default=600.0, metadata={"help": "Idle sessions are dropped after this many seconds."})
    max_body_mb: float = field(default=16.0, metadata={"help": "Largest request body (413 above it)."})
    access_log: bool = field(default=False, metadata={"help": "Log every request (costs latency)."})


def _fail(message: str) -> None:
    raise UsageError(f"vltune serve policy: {message}")


def build(a: PolicyServeArguments):
    """(app, policy directory) for these arguments; user mistakes exit 2 with one line."""
    from ..hardware import detect_device
    from ..vla.policy import Policy
    from ..vla.server import ServerSettings, create_app

    directory = a.policy or SMOKE_POLICY
    if not Path(directory, "policy_config.json").exists():
        if a.policy is None:
            _fail(f"no --policy given and {SMOKE_POLICY} holds no policy; make one with `vltune vla --max_steps 20` "
                  "(offline, about a minute) or pass --policy DIR")
        _fail(f"--policy {directory}: no policy_config.json there; pass a `vltune vla` output or checkpoint directory")
    if a.max_batch < 1 or a.max_sessions < 1 or a.max_body_mb <= 0:
        _fail("--max_batch, --max_sessions and --max_body_mb must be positive")
    policy = Policy.from_pretrained(directory, device=detect_device(a.device))
    settings = ServerSettings(api_key=a.api_key or os.environ.get("VLTUNE_API_KEY") or None, max_batch=a.max_batch,
                              batch_wait_ms=a.batch_wait_ms, max_sessions=a.max_sessions,
                              session_ttl_s=a.session_ttl_s, max_body_bytes=int(a.max_body_mb * 1024 * 1024))
    return create_app(policy, settings), directory, settings


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    (a,) = parse_args((PolicyServeArguments,), argv, prog="vltune serve policy", description=__doc__)
    with torch_threads(max(1, a.threads)):  # the caller's setting comes back when the server stops
        serve(a)


def serve(a: PolicyServeArguments) -> None:
    import uvicorn

    from ..vla.server import bound_socket

    app, directory, settings = build(a)
    cfg = app.state.policy.config
    logger.info("[serve] %s: cameras %s, state %s, chunk %d x %d actions; http://%s:%d/act (json-numpy | msgpack), "
                "ws://%s:%d/ws%s", directory, cfg.cameras if cfg.use_images else "none", cfg.state_dim or "none",
                cfg.fwd_pred_next_n, cfg.action_dim, a.host, a.port, a.host, a.port,
                "; API key required" if settings.api_key else "")
    if a.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        logger.warning("[serve] listening on %s without --api_key: anyone who can reach the port can drive the robot",
                       a.host)
    try:
        sock = bound_socket(a.host, a.port)
    except OSError as e:  # port taken, address not on this machine
        _fail(f"cannot listen on {a.host}:{a.port} ({e.strerror or e}); choose another --port or --host")
    config = uvicorn.Config(app, log_level="warning", access_log=a.access_log, ws_max_size=settings.max_body_bytes)
    uvicorn.Server(config).run(sockets=[sock])
