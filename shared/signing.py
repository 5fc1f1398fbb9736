"""Signed work items: admission signs each WorkItem it queues, executors verify it.

Without it, anything that can publish to billy.work.runs could run any container an
executor can create. The signature is HMAC-SHA256 over the exact payload bytes, with a key
shared by admission and the executors (BILLY_WORK_SIGNING_KEY), in the header
Billy-Signature as `v1=<hex>`.
"""

from __future__ import annotations

import hashlib
import hmac
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


def ensure_key_file(path: Path) -> str:
    """The key stored at `path`, made (readable by its owner only) when absent."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
