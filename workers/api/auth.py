"""API keys for `batchinfer serve`, from the file BATCHINFER_API_KEYS names.

One key a line: the key itself, or its SHA-256 in hex (64 hex digits, optionally written
`sha256:<hex>`), so the server's machine need not hold the keys; blank lines and lines
starting with # are skipped. A request's `Authorization: Bearer KEY` is hashed and looked
up. What a key creates is owned by an id derived from the key's hash: the records never
hold key material, and the server never logs or echoes a key.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from jobs.errors import UserError

API_KEYS_VARIABLE = "BATCHINFER_API_KEYS"
_HASH = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_id(hashed: str) -> str:
    """The owner of what a key creates: not the key's hash itself, so a record read by
    someone else cannot be matched against a keys file either."""
    return hashlib.sha256(f"batchinfer-owner:{hashed}".encode()).hexdigest()[:32]


class ApiKeys:
    """The accepted keys, as hashes."""

    def __init__(self, hashes: set[str]) -> None:
        if not hashes:
            raise UserError(f"{API_KEYS_VARIABLE}: the file holds no keys")
        self._hashes = frozenset(hashes)

    @classmethod
    def from_env(cls) -> ApiKeys:
        """The keys of the file BATCHINFER_API_KEYS names; UserError (one line, without
        the path's contents) when it is unset, unreadable or empty."""
        location = os.environ.get(API_KEYS_VARIABLE)
        if not location:
            raise UserError(f"{API_KEYS_VARIABLE} is not set: the server needs a file of API "
                            f"keys (one a line, or their SHA-256) and refuses to start "
                            f"without")
        try:
            lines = Path(location).expanduser().read_text().splitlines()
        except OSError as error:
            raise UserError(f"{API_KEYS_VARIABLE}: cannot read the keys file: "
                            f"{error.strerror}") from None
        hashes = set()
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            written_hash = _HASH.fullmatch(entry.lower())
            hashes.add(written_hash.group(1) if written_hash else key_hash(entry))
        return cls(hashes)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of a request's Authorization header; None if it carries no
        accepted key."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        hashed = key_hash(key.strip())
        return owner_id(hashed) if hashed in self._hashes else None
