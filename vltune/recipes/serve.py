"""vltune serve: the trained GUI agent as an OpenAI-compatible HTTP server, one LoRA adapter per user.

    vltune serve                                            # the embedded tiny model, offline, 127.0.0.1:8000
    vltune serve --model output/demo/model                  # what `vltune demo` trained
    vltune serve --model out/global --per_user_adapters out/personal --api_keys keys.json
    vltune serve --model out/global --adapters support=out/support_lora --host 0.0.0.0 --api_key SECRET
    vltune serve policy ...                                 # a robot-policy server (see `vltune serve policy --help`)

Requests use OpenAI's chat completions format (the `openai` client works unchanged): "model": "user_7" or
"user": "7" picks that user's adapter (a user without one gets the global model; the response's "adapter"
says which answered). Concurrent requests, whatever their adapters, are gathered into one generate call.
Send "return_click": true (openai client: extra_body) to also get the answer's click in the original
screenshot's pixels. The playground page is at http://HOST:PORT/.
"""

from __future__ import annotations

import importlib
import logging
import sys

from ..args import ModelArguments, parse_args
from ..console import setup_logging
from ..errors import UsageError
from ..serve.options import LOOPBACK, ServeArguments

logger = logging.getLogger("vltune")


def _serve_policy(argv: list[str]):
    """`vltune serve policy ...` -> the robot-policy server's command (imported only when asked for)."""
    try:
        module = importlib.import_module("vltune.recipes.serve_policy")
    except ModuleNotFoundError as e:
        if e.name != "vltune.recipes.serve_policy":
            raise
        raise UsageError("vltune serve policy: the robot-policy server is not part of this vltune installation") \
            from None
    return module.main(argv)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "policy":
        return _serve_policy(argv[1:])
    model_args, opts = parse_args((ModelArguments, ServeArguments), argv, prog="vltune serve", description=__doc__)
    setup_logging()
    import uvicorn

    from ..serve.app import create_app, load_service

    try:
        service = load_service(model_args, opts)
    except ValueError as e:
        raise UsageError(f"vltune serve: {e}") from None
    if opts.host not in LOOPBACK and not service.keys.enabled:
        logger.warning("[serve] listening on %s without --api_key / --api_keys: anyone who can reach this "
                       "address can use every adapter", opts.host)
    logger.info("[serve] http://%s:%d/ (playground), OpenAI API at http://%s:%d/v1", opts.host, opts.port,
                opts.host, opts.port)
    uvicorn.run(create_app(service), host=opts.host, port=opts.port, log_level=opts.log_level)
