"""`vltune serve`: the trained GUI agent behind an OpenAI-compatible HTTP API.

Layers, each importing only the ones above it in this list:
- `options`: the server's typed arguments (limits, keys, adapters);
- `auth`: API keys -> the users each key may reach (constant-time comparison);
- `protocol`: pydantic request models, OpenAI messages -> a vltune `Sample`, image checks;
- `adapters`: per-user / named LoRA adapters loaded lazily on the one global model (LRU);
- `engine`: one batched `generate` over rows that may each use a different adapter;
- `batcher`: the bounded queue that gathers concurrent requests into engine batches;
- `metrics`: Prometheus counters and histograms;
- `app`: the FastAPI routes and the playground page (`static/playground.html`).
"""
