"""The OpenAI chat-completions request as pydantic models, and its conversion into a vltune `Sample`.

Images arrive as `image_url` content parts. A `data:` base64 URI is always accepted; an http(s) URL only with
--allow_remote_images and a server-side path only with --allow_local_images. Every image's size is read from
its header and checked against --max_image_pixels before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.errors import DataError
from ..data.formats import Sample, normalize_row
from ..data.images import image_size, load_image
from .options import ServeArguments


class APIError(Exception):
    """An error answered as OpenAI's {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1)
    user: str | None = None
    # outside OpenAI's schema (the openai client sends it with extra_body={"return_click": True}):
    return_click: bool = False

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_request(payload) -> ChatRequest:
    """Validate the decoded JSON body; a problem becomes a 400 naming the first offending field."""
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        # drop pydantic's union-branch names ("str", "list[...]", "text"/"image_url" tags) from the location
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or p in _FIELD_NAMES)
        param = _param(loc)
        raise APIError(400, f"{param}: {err['msg']} (see the OpenAI chat completions request format)",
                       param=param, code="invalid_" + err["type"]) from None


_FIELD_NAMES = {name for cls in (ChatRequest, Message, TextPart, ImagePart, ImageURL) for name in cls.model_fields}


def generation_limits(req: ChatRequest, opts: ServeArguments) -> int:
    """The request's max_tokens (default: the cap), after checking it and n against the server's limits."""
    if req.n != 1:
        raise APIError(400, "n: only n=1 is supported; send several requests instead", param="n")
    asked = req.max_completion_tokens or req.max_tokens
    field_name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if asked is not None and asked > opts.max_tokens_cap:
        raise APIError(400, f"{field_name}: {asked} is over this server's cap of {opts.max_tokens_cap}; ask for at "
                            f"most {opts.max_tokens_cap} (the operator sets --max_tokens_cap)", param=field_name)
    return asked or opts.max_tokens_cap


def _image_source(url: str, param: str, opts: ServeArguments):
    """The reference `load_image` reads: decoded bytes for data: URIs, else the URL / path if allowed."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise APIError(400, f"{param}: a data URI must look like data:image/png;base64,<data>", param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URI's base64 payload is malformed", param=param) from None
    if url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise APIError(400, f"{param}: image URLs are not fetched by this server; send the image as a data: "
                                f"base64 URI, or start the server with --allow_remote_images", param=param)
        return url
    if not opts.allow_local_images:
        raise APIError(400, f"{param}: server-side image paths are refused; send the image as a data: base64 URI, "
                            f"or start the server with --allow_local_images", param=param)
    return url[len("file://"):] if url.startswith("file://") else url


def _check_pixels(source, param: str, opts: ServeArguments) -> None:
    """Refuse an image whose header says it is over --max_image_pixels (nothing decoded yet)."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return  # checked after download, in load_checked_image (PIL's own bomb guard applies meanwhile)
    from PIL import Image

    try:
        w, h = image_size(source, verify=False)
    except DataError as e:
        raise APIError(400, f"{param}: {e.message}", param=param) from None
    except Image.DecompressionBombError as e:  # PIL refuses sizes far past its own limit already at open
        raise APIError(400, f"{param}: {e}; this server's limit is {opts.max_image_pixels} pixels "
                            f"(--max_image_pixels)", param=param) from None
    if w * h > opts.max_image_pixels:
        raise APIError(400, f"{param}: image of {w}x{h} = {w * h} pixels is over the server's limit of "
                            f"{opts.max_image_pixels} (--max_image_pixels); send a smaller screenshot", param=param)


def load_checked_image(url: str, param: str, opts: ServeArguments):
    """One request image as an RGB PIL image, or an APIError(400) naming `param` and the fix."""
    from PIL import Image

    source = _image_source(url, param, opts)
    _check_pixels(source, param, opts)
    try:
        image = load_image(source)
    except DataError as e:
        raise APIError(400, f"{param}: {e.message}", param=param) from None
    except Image.DecompressionBombError as e:
        raise APIError(400, f"{param}: {e} (--max_image_pixels)", param=param) from None
    if image.width * image.height > opts.max_image_pixels:
        raise APIError(400, f"{param}: image of {image.width}x{image.height} pixels is over the server's limit "
                            f"of {opts.max_image_pixels} (--max_image_pixels)", param=param)
    return image


def image_urls(req: ChatRequest) -> list[tuple[str, str]]:
    """(url, param name) of every image part, in order."""
    return [(p.image_url.url, f"messages[{i}].content[{j}].image_url")
            for i, m in enumerate(req.messages) if isinstance(m.content, list)
            for j, p in enumerate(m.content) if isinstance(p, ImagePart)]


def to_sample(req: ChatRequest, images: list) -> Sample:
    """The request's conversation as a vltune Sample (the same form `vltune infer` builds from a data set)."""
    messages = []
    for m in req.messages:
        if isinstance(m.content, str):
            content = [{"type": "text", "text": m.content}]
        else:
            content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                       for p in m.content]
        messages.append({"role": m.role, "content": content})
    try:
        sample = normalize_row({"messages": messages, "images": images}, where="request")
    except DataError as e:
        raise APIError(400, f"messages: {e.message}", param="messages") from None
    if sample.num_image_parts != len(images):
        raise APIError(400, f"messages: the text holds {sample.num_image_parts - len(images)} literal <image> tag(s) "
                            f"beyond the image parts; send images as image_url parts only", param="messages")
    return sample
