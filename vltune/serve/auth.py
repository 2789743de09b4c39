"""API keys -> the users (adapter identities) each key may reach, compared in constant time."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

ALL = "*"


def _identity(value) -> str:
    """3 / "3" / "user_3" -> "user_3"; other names (named adapters) stay as they are."""
    text = str(value)
    return f"user_{text}" if text.isdigit() else text


def load_key_file(path: str) -> dict[str, frozenset[str]]:
    """Read --api_keys: {"KEY": "user_3" | ["user_3", 4, "support"] | "*"}; raises ValueError naming the problem."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--api_keys {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--api_keys {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--api_keys {path}: expected a non-empty object {{\"KEY\": [\"user_3\"], ...}}")
    keys = {}
    for key, reach in raw.items():
        if not key:
            raise ValueError(f"--api_keys {path}: an empty key")
        reach = reach if isinstance(reach, list) else [reach]
        if not reach or not all(isinstance(r, (str, int)) and str(r) for r in reach):
            raise ValueError(f"--api_keys {path}: key {key[:4]}...: give a user, a list of users or \"*\"")
        keys[key] = frozenset(ALL if r == ALL else _identity(r) for r in reach)
    return keys


class KeyRing:
    """Who may reach what. No keys configured: everyone reaches everything."""

    def __init__(self, single_key: str | None = None, keys: dict[str, frozenset[str]] | None = None):
        self.keys = dict(keys or {})
        if single_key:
            self.keys[single_key] = frozenset({ALL})

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, given: str | None) -> frozenset[str] | None:
        """The reach of the presented key, or None if it matches no key. Every configured key is compared
        (hmac.compare_digest, no early exit), so the time taken does not tell how close a guess was."""
        if not self.enabled:
            return frozenset({ALL})
        candidate = (given or "").encode()
        found = None
        for key, reach in self.keys.items():
            if hmac.compare_digest(key.encode(), candidate):
                found = reach
        return found

    @staticmethod
    def allows(reach: frozenset[str], identity: str | None) -> bool:
        """May a key with `reach` act for `identity` (None: the global model without a user)?"""
        return identity is None or ALL in reach or identity in reach
