"""Signed work items: admission signs each WorkItem it queues, executors verify it.

Without it, anything that can publish to billy.work.runs could run any container an
executor can create. The signature is HMAC-SHA256 over the exact payload bytes, with a key
shared by admission and the executors (BILLY_WORK_SIGNING_KEY), in the header
Billy-Signature as `v1=<hex>`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SIGNATURE_HEADER = "Billy-Signature"
VERSION = "v1"


def sign(key: str, payload: bytes) -> str:
    """The Billy-Signature header value for `payload`."""
    digest = hmac.new(key.encode(), payload, hashlib.sha256).hexdigest()
    return f"{VERSION}={digest}"


def verify(key: str, payload: bytes, signature: str | None) -> bool:
    """Whether `signature` is this key's signature of `payload` (constant-time)."""
    if not signature:
        return False
    return hmac.compare_digest(sign(key, payload), signature)


MIN_KEY_CHARS = 32


def ensure_key_file(path: Path) -> str:
    """The key stored at `path`, made when absent (created owner-only, in one step).

    A key shorter than MIN_KEY_CHARS (an empty file left by a crash, say) is replaced:
    an empty HMAC key would let anyone sign.
    """
    if path.exists():
        key = path.read_text().strip()
        if len(key) >= MIN_KEY_CHARS:
            return key
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    os.replace(partial, path)
    return key
