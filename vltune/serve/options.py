"""The arguments of `vltune serve` (read by the library modules, parsed by `vltune.recipes.serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeArguments:
    per_user_adapters: str | None = field(default=None, metadata={
        "help": "The --output_dir of `vltune personalize`: user_<id> adapters, picked per request by "
                "\"model\": \"user_<id>\" or OpenAI's \"user\" field. A user without an adapter gets the global model."})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "Extra named LoRA adapters as name=path (repeat or list several); a request picks one with "
                "\"model\": \"name\". The global model itself (a full model or a LoRA directory) is --model."})
    served_model_name: str | None = field(default=None, metadata={
        "help": "The id of the global model in /v1/models and in requests (default: the --model directory's "
                "name, or tiny-<family> for the embedded tiny model)."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind. Loopback by default; any other address must be given here, and the server "
                "then warns when no --api_key / --api_keys is set."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key: str | None = field(default=None, metadata={
        "help": "One key (Authorization: Bearer KEY) that reaches every adapter."})
    api_keys: str | None = field(default=None, metadata={
        "help": "JSON file {\"KEY\": [\"user_3\", \"user_4\"], \"ADMIN\": \"*\"}: each key reaches only the users "
                "(and named adapters) listed, plus the global model. A key asking for another user's adapter gets 403."})
    max_loaded_adapters: int = field(default=32, metadata={
        "help": "Adapters kept in memory at once (least recently used ones are unloaded; the base weights never are)."})
    max_batch_size: int = field(default=16, metadata={
        "help": "Requests gathered into one generate call (they may use different adapters)."})
    max_batch_wait_ms: float = field(default=5.0, metadata={
        "help": "How long the first waiting request waits for others to join its batch."})
    regather_wait_ms: float = field(default=50.0, metadata={
        "help": "After a batch is answered, how long the next one may wait for as many requests as it had (its "
                "callers sending their next ones), so concurrent clients keep sharing one generate call instead of "
                "splitting into alternating smaller batches. A lone client never waits. 0: off."})
    max_queue_size: int = field(default=256, metadata={
        "help": "Requests waiting for a batch; beyond it the server answers 429 with Retry-After."})
    request_timeout: float = field(default=60.0, metadata={
        "help": "Seconds a request may wait and run before it gets 504 (streams: until generation starts)."})
    max_tokens_cap: int = field(default=256, metadata={
        "help": "Largest max_tokens a request may ask for (also the default when it asks for none)."})
    max_images_per_request: int = field(default=4, metadata={"help": "Images allowed in one request."})
    max_image_pixels: int = field(default=16_777_216, metadata={
        "help": "Largest width*height of an uploaded image, read from its header before decoding "
                "(decompression bombs are refused without being decoded)."})
    max_request_bytes: int = field(default=20_971_520, metadata={"help": "Largest request body in bytes (413 beyond)."})
    allow_remote_images: bool = field(default=False, metadata={
        "help": "Let requests name http(s):// image URLs, which the server then downloads. Off: only data: URIs."})
    allow_local_images: bool = field(default=False, metadata={
        "help": "Let requests name image files on the server's disk (a path or file:// URL). Off: only data: URIs."})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level: critical | error | warning | info | debug."})
