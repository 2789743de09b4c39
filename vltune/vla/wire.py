"""Wire formats of the policy server, and the checks that turn a malformed observation into a 4xx naming the field.

Two encodings of the same observation dict `{<camera>: image, "state": (S,), "instruction": str, ...}`:
- JSON with json-numpy arrays (`{"__numpy__": base64, "dtype", "shape"}`), as OpenVLA-OFT's `POST /act`
  sends it; `{"encoded": "<json-numpy string>"}` (OFT's fallback for clients without json_numpy) and plain
  JSON lists are accepted too.
- msgpack with numpy arrays in either common layout: the `msgpack-numpy` package's (`{"nd": True, "type",
  "shape", "data"}`) or openpi's (`{"__ndarray__": True, "dtype", "shape", "data"}`).
Images may be raw uint8 arrays (H, W, 3), PNG/JPEG bytes (msgpack) or base64 PNG/JPEG strings (JSON).

Nothing here unpickles: object and structured dtypes are refused (msgpack-numpy's own `decode` would call
`pickle.loads` on them, so it is never used on incoming bytes).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 8
MAX_INSTRUCTION_CHARS = 2000


class BadRequest(ValueError):
    """A client mistake: HTTP `status`, the offending `field`, and what to send instead."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def payload(self) -> dict:
        return {"detail": str(self), "field": self.field}


# ---------------------------------------------------------------------------- numpy <-> msgpack
def _array_from(data: bytes, dtype: str, shape, field: str) -> np.ndarray:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise BadRequest(field, f"unknown array dtype {dtype!r}", 400) from e
    if dt.kind in ("O", "V"):
        raise BadRequest(field, f"array dtype {dt} is not accepted (object/structured arrays would need pickle)", 400)
    try:
        return np.frombuffer(data, dtype=dt).reshape([int(s) for s in shape])
    except (ValueError, TypeError) as e:
        raise BadRequest(field, f"array data does not fit dtype {dt} and shape {list(shape)}: {e}", 400) from e


def _msgpack_hook(obj: dict):
    def get(*keys):
        return next((obj[k] for k in keys if k in obj), None)

    if get(b"nd", "nd") is True:  # msgpack-numpy layout
        kind = get(b"kind", "kind") or b""
        if kind not in (b"", ""):
            raise BadRequest("body", f"msgpack-numpy array of kind {kind!r} refused (it would be unpickled)", 400)
        dtype = get(b"type", "type")
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return _array_from(get(b"data", "data"), dtype, get(b"shape", "shape"), "body")
    if get(b"__ndarray__", "__ndarray__") is True:  # openpi layout
        dtype = get(b"dtype", "dtype")
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return _array_from(get(b"data", "data"), dtype, get(b"shape", "shape"), "body")
    if get(b"nd", "nd") is False:  # msgpack-numpy scalar
        dtype = get(b"type", "type")
        dtype = dtype.decode() if isinstance(dtype, bytes) else dtype
        return _array_from(get(b"data", "data"), dtype, (), "body")[()]
    return obj


def _msgpack_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in ("O", "V"):
            raise TypeError(f"cannot send a {obj.dtype} array")
        a = np.ascontiguousarray(obj)
        return {b"nd": True, b"type": a.dtype.str, b"kind": b"", b"shape": list(a.shape), b"data": a.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def msgpack_dumps(obj) -> bytes:
    """msgpack bytes; numpy arrays in msgpack-numpy's layout (readable with `msgpack_numpy.unpackb` too)."""
    import msgpack

    return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)


def msgpack_loads(data: bytes):
    import msgpack

    try:
        return msgpack.unpackb(data, object_hook=_msgpack_hook, raw=False, strict_map_key=False)
    except BadRequest:
        raise
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise BadRequest("body", f"not a msgpack body ({type(e).__name__}: {e}); send msgpack with "
                         f"Content-Type: {MSGPACK}, or JSON", 400) from e


# ---------------------------------------------------------------------------- numpy <-> JSON
def _json_hook(d: dict):
    if "__numpy__" in d:
        try:
            data = base64.b64decode(d["__numpy__"], validate=True)
        except (binascii.Error, TypeError) as e:
            raise BadRequest("body", f"json-numpy array with invalid base64 data ({e})", 400) from e
        dtype = d.get("dtype", "")
        if isinstance(dtype, list):  # json-numpy's descr of a structured dtype
            raise BadRequest("body", "structured json-numpy arrays are not accepted", 400)
        shape = d.get("shape") or []
        a = _array_from(data, dtype, shape, "body")
        return a if shape else a[()]
    return d


def json_dumps(obj) -> str:
    """JSON with numpy arrays in json-numpy's layout (OpenVLA-OFT clients decode it with json_numpy)."""
    import json_numpy

    return json.dumps(obj, default=json_numpy.default, separators=(",", ":"))


def json_loads(text: str | bytes):
    try:
        return json.loads(text, object_hook=_json_hook)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest("body", f"not a JSON body ({e}); send a JSON observation dict (json-numpy arrays) or "
                         f"msgpack with Content-Type: {MSGPACK}", 400) from e


@dataclass
class Decoded:
    payload: dict
    encoding: str  # "json" | "msgpack"
    double_encoded: bool = False  # OFT's {"encoded": "<json-numpy string>"}


def decode_body(body: bytes, content_type: str | None) -> Decoded:
    """Request bytes -> observation dict (msgpack when the content type says so, JSON otherwise)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in MSGPACK_TYPES:
        payload, encoding = msgpack_loads(body), "msgpack"
    else:
        payload, encoding = (json_loads(body) if body.strip() else {}), "json"
    if not isinstance(payload, dict):
        raise BadRequest("body", f"expected an observation dict, got {type(payload).__name__}", 400)
    if "encoded" in payload:
        if set(payload) != {"encoded"} or not isinstance(payload["encoded"], str):
            raise BadRequest("encoded", "an {\"encoded\": ...} body holds exactly one key, a json-numpy string", 400)
        inner = json_loads(payload["encoded"])
        if not isinstance(inner, dict):
            raise BadRequest("encoded", f"expected an observation dict, got {type(inner).__name__}", 400)
        return Decoded(inner, encoding, True)
    return Decoded(payload, encoding)


def encode_body(obj, encoding: str, double_encoded: bool = False) -> tuple[bytes, str]:
    """(bytes, content type) of a response in the request's encoding."""
    if encoding == "msgpack":
        return msgpack_dumps(obj), MSGPACK
    text = json_dumps(obj)
    return ((json.dumps(text) if double_encoded else text).encode(), JSON)


# ---------------------------------------------------------------------------- images
def image_bytes(image: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """uint8 (H, W, 3) -> PNG or JPEG bytes (the compact image encodings a client may send)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else "PNG",
                                                             **({"quality": quality} if fmt in ("jpg", "jpeg") else {}))
    return buf.getvalue()


def _decode_image_bytes(data: bytes, field: str) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_SIDE * MAX_IMAGE_SIDE:
            raise BadRequest(field, f"image of {img.width}x{img.height} px is too large")
        return np.asarray(img.convert("RGB"))
    except BadRequest:
        raise
    except Exception as e:
        raise BadRequest(field, f"bytes are not a PNG/JPEG image ({type(e).__name__}); send uint8 (H, W, 3) or "
                         "PNG/JPEG bytes") from e


def to_image(value, field: str) -> np.ndarray:
    """A camera value in any accepted form -> uint8 (H, W, 3), or BadRequest naming `field`."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_image_bytes(bytes(value), field)
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            return _decode_image_bytes(base64.b64decode(text, validate=True), field)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(field, "a string image must be base64 PNG/JPEG (optionally a data: URL)") from e
    if isinstance(value, list):  # plain JSON nested lists of 0-255 integers
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise BadRequest(field, f"ragged nested lists are not an image ({e})") from e
        if arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        value = arr
    if not isinstance(value, np.ndarray):
        raise BadRequest(field, f"expected an image (uint8 array (H, W, 3) or PNG/JPEG bytes), got "
                         f"{type(value).__name__}")
    if value.dtype != np.uint8:
        raise BadRequest(field, f"image dtype {value.dtype}, expected uint8 (H, W, 3) with values 0-255")
    if value.ndim != 3 or value.shape[2] != 3:
        raise BadRequest(field, f"image shape {tuple(value.shape)}, expected (H, W, 3) RGB")
    h, w = value.shape[:2]
    if not (MIN_IMAGE_SIDE <= h <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= w <= MAX_IMAGE_SIDE):
        raise BadRequest(field, f"image shape {tuple(value.shape)}: height and width must be "
                         f"{MIN_IMAGE_SIDE}-{MAX_IMAGE_SIDE} px")
    return value if value.flags.writeable else value.copy()  # torch refuses read-only buffers


# ---------------------------------------------------------------------------- observations
# Camera names other clients use for the same roles (OpenVLA-OFT's LIBERO client, CALVIN, LeRobot).
CAMERA_ALIASES = {
    "static": ("static", "full_image", "image", "rgb_static", "observation.images.static", "primary"),
    "gripper": ("gripper", "wrist_image", "rgb_gripper", "observation.images.gripper", "wrist"),
}
STATE_KEYS = ("state", "proprio", "robot_obs", "observation.state")
MODES = ("chunk", "step", "observe")


@dataclass
class ObservationSpec:
    """What the served policy needs in each observation."""

    cameras: list[str]
    use_images: bool
    state_length: int  # entries the raw state must have (0 = no state)

    @classmethod
    def of(cls, config) -> ObservationSpec:
        length = 0
        if config.state_dim:
            idx = list(config.state_indices)
            length = max(idx) + 1
        return cls(list(config.cameras), bool(config.use_images), length)

    def info(self) -> dict:
        return {"cameras": self.cameras, "camera_aliases": {c: list(CAMERA_ALIASES.get(c, (c,))) for c in self.cameras},
                "use_images": self.use_images, "state_length": self.state_length}


@dataclass
class Observation:
    images: dict[str, np.ndarray] | None  # role -> uint8 (H, W, 3); None for a policy without images
    state: np.ndarray | None  # float32 (state_length,)
    instruction: str
    session_id: str | None
    mode: str


def parse_observation(d: dict, spec: ObservationSpec) -> Observation:
    """Check an observation dict against the policy; every mistake raises BadRequest naming the field."""
    sid = d.get("session_id")
    if sid is not None and not isinstance(sid, str):
        raise BadRequest("session_id", f"must be a string, got {type(sid).__name__}")
    mode = d.get("mode", "chunk")
    if mode not in MODES:
        raise BadRequest("mode", f"{mode!r}; choose one of {', '.join(MODES)}")
    instruction = d.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRequest("instruction", "missing or empty: send the task in words, e.g. \"open the drawer\"")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise BadRequest("instruction", f"{len(instruction)} characters; at most {MAX_INSTRUCTION_CHARS}")
    images = None
    if spec.use_images:
        images = {}
        for role in spec.cameras:
            names = CAMERA_ALIASES.get(role, (role,))
            key = next((k for k in names if k in d), None)
            if key is None:
                raise BadRequest(role, f"camera {role!r} missing (send it under one of {', '.join(names)}); the "
                                 f"policy uses cameras {spec.cameras}")
            images[role] = to_image(d[key], key)
    state = None
    if spec.state_length:
        key = next((k for k in STATE_KEYS if k in d), None)
        if key is None:
            raise BadRequest("state", f"missing: the policy reads a proprio state of {spec.state_length} values")
        try:
            state = np.asarray(d[key], dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise BadRequest(key, f"not a numeric vector ({e})") from e
        if state.shape[0] != spec.state_length:
            raise BadRequest(key, f"has {state.shape[0]} values, the policy was trained on {spec.state_length}")
        if not np.isfinite(state).all():
            bad = int(np.argwhere(~np.isfinite(state))[0][0])
            raise BadRequest(key, f"value {state[bad]} at index {bad} is not finite")
    return Observation(images, state, instruction, sid, mode)
