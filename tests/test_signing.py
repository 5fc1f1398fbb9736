"""Work item signatures and the signing key file."""

import stat

import pytest
from pydantic import ValidationError

from shared.settings import Settings
from shared.signing import ensure_key_file, sign, verify


def test_signature_verifies_only_the_signed_payload_with_the_same_key():
    key = "k" * 32
    signature = sign(key, b"payload")
    assert verify(key, b"payload", signature)
    assert not verify(key, b"payload!", signature)
    assert not verify("x" * 32, b"payload", signature)
    assert not verify(key, b"payload", None)


def test_key_file_is_made_owner_only_and_kept(tmp_path):
    path = tmp_path / "state" / "work-signing.key"
    key = ensure_key_file(path)
    assert len(key) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key_file(path) == key


def test_empty_key_file_is_replaced_never_used(tmp_path):
    path = tmp_path / "work-signing.key"
    path.write_text("\n")
    key = ensure_key_file(path)
    assert len(key) == 64
    assert path.read_text().strip() == key


def test_settings_refuse_a_short_signing_key():
    with pytest.raises(ValidationError, match="work_signing_key"):
        Settings(work_signing_key="short")
