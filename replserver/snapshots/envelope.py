"""A snapshot as stored: the child's opaque bytes under a header, authenticated by HMAC.

The server never unpickles a snapshot; it only decides whether a stored one may be given to
a session's new process. The MAC covers the header (which names the session) and the bytes,
so a snapshot cannot be altered, cut short, or moved to another session's id without the
key; one written under another key, or damaged, is refused the same way.

    MAC (32 bytes, HMAC-SHA256 of the rest) | MAGIC | total size (8) | header size (4)
    | JSON header | bytes

The total size tells a snapshot cut short (a full disk, a copy interrupted) from a forged
or damaged one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import time
from dataclasses import asdict, dataclass

MAGIC = b"replserver-snapshot-1\n"
FORMAT = 1  # of the header; a stored snapshot of another format is refused as too old
MAC_SIZE = hashlib.sha256().digest_size
_SIZES = struct.Struct(">QI")
_MAX_HEADER = 64 * 1024


class Rejected(Exception):
    """A stored snapshot that must not be restored; the message says why, for the user."""


@dataclass(frozen=True, slots=True)
class Meta:
    """What the server records about a snapshot, beside the child's bytes."""

    session_id: str
    cause: str  # why it was taken: culled, evicted, shutdown, idle
    taken_at: float  # Unix time
    replica: str  # the server that took it
    format: int = FORMAT


def seal(key: bytes, meta: Meta, blob: bytes) -> bytes:
    """The stored form of `blob`."""
    header = json.dumps(asdict(meta), separators=(",", ":")).encode()
    start = MAC_SIZE + len(MAGIC) + _SIZES.size
    sizes = _SIZES.pack(start + len(header) + len(blob), len(header))
    body = b"".join((MAGIC, sizes, header, blob))
    return hmac.digest(key, body, "sha256") + body


def unseal(key: bytes, session_id: str, data: bytes, *, max_age_s: float) -> tuple[Meta, bytes]:
    """The header and the child's bytes of a stored snapshot of `session_id`, or Rejected."""
    start = MAC_SIZE + len(MAGIC) + _SIZES.size
    if len(data) < start or data[MAC_SIZE : MAC_SIZE + len(MAGIC)] != MAGIC:
        raise Rejected("it is truncated or not a snapshot")
    total, size = _SIZES.unpack_from(data, MAC_SIZE + len(MAGIC))
    if total != len(data):
        raise Rejected(f"it is truncated ({len(data)} of {total} bytes)")
    body = memoryview(data)[MAC_SIZE:]
    if not hmac.compare_digest(data[:MAC_SIZE], hmac.digest(key, body, "sha256")):
        raise Rejected("it is damaged or was not written with this server's key")
    try:
        if size > _MAX_HEADER:
            raise ValueError("header too large")
        fields = json.loads(bytes(data[start : start + size]))
        if fields.get("format") != FORMAT:
            raise Rejected(f"it was written in format {fields.get('format')!r}, not {FORMAT}")
        meta = Meta(**fields)
    except (ValueError, TypeError, AttributeError) as exc:
        raise Rejected(f"its header is unreadable ({exc})") from None
    if meta.session_id != session_id:
        raise Rejected("it belongs to another session")
    age = time.time() - meta.taken_at
    if age > max_age_s:
        raise Rejected(f"it is too old ({age / 3600:.1f} h; snapshots are kept {max_age_s:g} s)")
    return meta, data[start + size :]
