"""API keys and their roles, read from VAE_API_KEYS or a keys file and kept only as SHA-256
digests. `python -m app.http.api_keys ID [--role admin]` makes a key and its keys-file line."""

from __future__ import annotations

import argparse
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

USER, ADMIN = "user", "admin"
ROLES = (USER, ADMIN)  # an admin key may do all a user key may
MIN_KEY_CHARS = 16
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class KeyConfigError(ValueError):
    """A key setting or keys file that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    role: str
    digest: bytes = field(repr=False)  # SHA-256 of the key; the key itself is never kept


def digest_of(key: str) -> bytes:
    # Keys are long random tokens, so a fast hash is enough (no password stretching needed).
    return hashlib.sha256(key.encode()).digest()


def _checked(key_id: str, role: str, where: str) -> None:
    if not _KEY_ID.fullmatch(key_id):
        raise KeyConfigError(f"{where}: key id {key_id!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    if role not in ROLES:
        raise KeyConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")


def keys_from_setting(value: str) -> list[ApiKey]:
    """VAE_API_KEYS: comma-separated ID:ROLE:KEY entries, hashed here; the plain keys are
    dropped with the setting's string."""
    keys = []
    for number, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), 1):
        parts = entry.split(":", 2)
        where = f"VAE_API_KEYS entry {number}"
        if len(parts) != 3:
            raise KeyConfigError(f"{where} is not ID:ROLE:KEY (role: {' or '.join(ROLES)})")
        key_id, role, key = parts
        _checked(key_id, role, where)
        if len(key) < MIN_KEY_CHARS:
            raise KeyConfigError(
                f"{where} ({key_id}): the key is shorter than {MIN_KEY_CHARS} characters; "
                "make one with `python -m app.http.api_keys ID`"
            )
        keys.append(ApiKey(key_id, role, digest_of(key)))
    return keys


def keys_from_file(path: Path) -> list[ApiKey]:
    """A keys file: one `ID ROLE sha256:HEX` line per key (`python -m app.http.api_keys`
    prints them); blank lines and # comments are skipped. It holds digests only, never keys."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyConfigError(f"VAE_API_KEYS_FILE {path} cannot be read: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {number}"
        parts = line.split()
        match = _DIGEST.fullmatch(parts[2]) if len(parts) == 3 else None
        if match is None:
            raise KeyConfigError(
                f"{where} is not `ID ROLE sha256:HEX` (64 lowercase hex digits of the key's "
                "SHA-256); `python -m app.http.api_keys ID` prints such a line"
            )
        _checked(parts[0], parts[1], where)
        keys.append(ApiKey(parts[0], parts[1], bytes.fromhex(match.group(1))))
    return keys


def load_keys(setting: str, file: Path | None) -> list[ApiKey]:
    """Every configured key; ids must be unique across the setting and the file."""
    keys = keys_from_setting(setting) + (keys_from_file(file) if file is not None else [])
    seen: set[str] = set()
    for key in keys:
        if key.key_id in seen:
            raise KeyConfigError(f"key id {key.key_id!r} is configured twice; ids must be unique")
        seen.add(key.key_id)
    return keys


class KeyRing:
    """Looks a presented key up in constant time with respect to which key (if any) matches."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str) -> ApiKey | None:
        wanted = digest_of(presented)
        found = None
        for key in self.keys:  # every key compared: no early exit to time
            if hmac.compare_digest(key.digest, wanted):
                found = key
        return found


def main(argv: list[str] | None = None) -> int:
    """Make a key: prints the key (give it to the client, once) and its keys-file line."""
    parser = argparse.ArgumentParser(prog="python -m app.http.api_keys", description=main.__doc__)
    parser.add_argument("key_id", help="a name for the key: 1-64 of A-Z a-z 0-9 _ . -")
    parser.add_argument("--role", choices=ROLES, default=USER)
    args = parser.parse_args(argv)
    try:
        _checked(args.key_id, args.role, "key")
    except KeyConfigError as exc:
        parser.error(str(exc))
    key = secrets.token_urlsafe(32)
    sys.stdout.write(f"key: {key}\n")
    sys.stdout.write(f"keys-file line: {args.key_id} {args.role} sha256:{digest_of(key).hex()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
