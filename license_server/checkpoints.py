"""Signed checkpoints: the audit chain's anchor outside Redis.

Why: the hash chain (``store/audit.py``) only proves that records agree *with each other*.
Whoever can write to Redis can drop the newest records and reset ``{ll}:audit:head``, or edit a
record and recompute every later ``prev``/``h`` — the chain then verifies again.  As Certificate
Transparency (signed tree heads) and Rekor/Trillian (checkpoints) do, the server signs
{size, head} with an Ed25519 key that lives in its key directory, never in Redis.  An auditor
keeps a checkpoint; later, walking the log from genesis, record #size must still hash to
``head``.  Each record carries the hash of the one before, so that one comparison pins every
record up to #size.  A Redis writer can delete checkpoints but cannot forge one; whoever holds
the key directory can sign anything (a checkpoint then proves consistency with what they signed).

A checkpoint document (what ``GET /v1/audit/checkpoint`` returns and ``layerlock audit
checkpoint --out`` saves)::

    {"checkpoint": {"typ": "llk-audit-checkpoint/v1", "size": N,
                    "head": "<sha256 hex of record #N's canonical JSON; 64 zeros when N = 0>",
                    "ts": <Unix seconds>, "kid": "<RFC 7638 thumbprint of the key>"},
     "sig": "<base64url Ed25519 signature of the canonical JSON of checkpoint>",
     "key": {"kty": "OKP", "crv": "Ed25519", "x": "<base64url>", "kid": "..."}}

Canonical JSON: keys sorted, no whitespace, ASCII (``json.dumps(sort_keys=True,
separators=(",", ":"))``); the body holds only integers and ASCII strings, so any language
rebuilds the same bytes.  ``key`` is a convenience: pin the real one out of band
(``keys/checkpoint.pub``, ``GET /v1/audit/checkpoint-key``).

Verification (:func:`verify`, :class:`ChainWalk`) is pure — no Redis, no secrets — so the CLI
checks a log fetched over REST without trusting the server's own verdict.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.license_server.store import P, dumps
from layerlock.shared.errors import ConfigError, LayerlockError
from layerlock.shared.keys import b64u_decode, b64u_encode, jwk_thumbprint, load_ed25519_private, private_pem

TYP = "llk-audit-checkpoint/v1"
GENESIS = "0" * 64
KEY_FILE = "checkpoint.pem"  # in the key dir, 0600
PUB_FILE = "checkpoint.pub"  # the public JWK, to hand to auditors
STORED = P + "audit:checkpoints"  # list, newest first: signed, so Redis can lose them but not forge them
KEEP = 100
STORE_EVERY = 60  # seconds between stored checkpoints
_FIELDS = {"typ", "size", "head", "ts", "kid"}


class CheckpointError(LayerlockError):
    """A checkpoint that does not parse or verify, or a log that does not extend it."""

    code = "bad_checkpoint"


class ChainBroken(CheckpointError):
    """The walk found a break: ``report`` is the ``{"ok": False, ...}`` verdict."""

    def __init__(self, checked: int, break_at: str, reason: str) -> None:
        super().__init__(reason)
        self.report: dict[str, Any] = {"ok": False, "checked": checked, "break_at": break_at, "reason": reason}


@dataclass(frozen=True)
class Checkpoint:
    size: int
    head: str
    ts: int
    kid: str


def digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- keys ----------------------------------------------------------------------------------------
def public_jwk(pk: ed25519.Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64u_encode(pk.public_bytes_raw()), "kid": jwk_thumbprint(pk)}


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write ``path`` (0600) only if it does not exist; False if someone else got there first.

    Unique temp name + ``link``: gunicorn workers creating the key lazily at the same moment all
    end up with the one file that won, never with a key only they hold."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def create_key(key_dir: Path, *, replace: bool = False) -> ed25519.Ed25519PrivateKey:
    """Load ``keys/checkpoint.pem``, creating it (and ``checkpoint.pub``) if absent or ``replace``."""
    path = key_dir / KEY_FILE
    try:
        if replace:
            path.unlink(missing_ok=True)
            (key_dir / PUB_FILE).unlink(missing_ok=True)
        if not path.exists():
            _create_exclusive(path, private_pem(ed25519.Ed25519PrivateKey.generate()))
        sk = load_ed25519_private(path)
        if not (key_dir / PUB_FILE).exists():
            _create_exclusive(key_dir / PUB_FILE, json.dumps(public_jwk(sk.public_key())).encode() + b"\n")
    except OSError as exc:
        raise ConfigError(f"cannot create the checkpoint key in {key_dir}: {exc.strerror}") from None
    return sk


def parse_key(text: str) -> ed25519.Ed25519PublicKey:
    """A pinned key: the JWK (``checkpoint.pub``, ``GET /v1/audit/checkpoint-key``) or a PEM public key."""
    if text.lstrip().startswith("-----BEGIN"):
        try:
            pk = serialization.load_pem_public_key(text.encode())
        except ValueError:
            raise CheckpointError("key file is not a readable PEM public key") from None
        if not isinstance(pk, ed25519.Ed25519PublicKey):
            raise CheckpointError("key file does not hold an Ed25519 public key")
        return pk
    try:
        doc = json.loads(text)
    except ValueError:
        raise CheckpointError("key file is neither JSON (JWK) nor PEM") from None
    return _jwk(doc.get("key", doc) if isinstance(doc, dict) else doc)


def _jwk(doc: Any) -> ed25519.Ed25519PublicKey:
    if not isinstance(doc, dict) or doc.get("kty") != "OKP" or doc.get("crv") != "Ed25519":
        raise CheckpointError("key is not an Ed25519 JWK (kty OKP, crv Ed25519)")
    try:
        raw = b64u_decode(doc.get("x", ""), field="key x")
        pk = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (LayerlockError, ValueError):
        raise CheckpointError("key x is not a base64url 32-byte Ed25519 public key") from None
    if "kid" in doc and doc["kid"] != jwk_thumbprint(pk):
        raise CheckpointError("key kid is not the thumbprint of its x")
    return pk


# --- signing (server side) -------------------------------------------------------------------
def sign(sk: ed25519.Ed25519PrivateKey, size: int, head: str, ts: int | None = None) -> dict[str, Any]:
    pk = sk.public_key()
    body = {"typ": TYP, "size": size, "head": head, "ts": int(time.time()) if ts is None else ts,
            "kid": jwk_thumbprint(pk)}
    return {"checkpoint": body, "sig": b64u_encode(sk.sign(dumps(body).encode())), "key": public_jwk(pk)}


# --- verification (pure) ---------------------------------------------------------------------
def verify(doc: Any, pinned: ed25519.Ed25519PublicKey | None = None, *, label: str = "the pinned key") -> Checkpoint:
    """Check a checkpoint document's shape and signature; return what it signs.

    The signature must verify under the key in the document *and*, when given, ``pinned``
    (a document carrying another key is refused before its signature is even looked at);
    ``label`` names ``pinned`` in messages."""
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoint"), dict) or "sig" not in doc:
        raise CheckpointError("not a checkpoint: expected an object with checkpoint and sig")
    body = doc["checkpoint"]
    if set(body) != _FIELDS:
        missing, extra = sorted(_FIELDS - set(body)), sorted(set(body) - _FIELDS)
        raise CheckpointError("checkpoint fields: " + "; ".join(
            p for p in (f"missing {', '.join(missing)}" if missing else "",
                        f"unknown {', '.join(extra)}" if extra else "") if p))
    if body["typ"] != TYP:
        raise CheckpointError(f"checkpoint typ must be {TYP}")
    for name in ("size", "ts"):
        if not isinstance(body[name], int) or isinstance(body[name], bool) or body[name] < 0:
            raise CheckpointError(f"checkpoint {name} must be a non-negative integer")
    head = body["head"]
    if not isinstance(head, str) or len(head) != 64 or not set(head) <= set("0123456789abcdef"):
        raise CheckpointError("checkpoint head must be 64 lowercase hex digits")
    if body["size"] == 0 and head != GENESIS:
        raise CheckpointError("a checkpoint of size 0 must have the genesis head")
    if not isinstance(body["kid"], str):
        raise CheckpointError("checkpoint kid must be a string")
    embedded = _jwk(doc["key"]) if "key" in doc else None
    if embedded is None and pinned is None:
        raise CheckpointError("checkpoint carries no key and none is pinned")
    for name, pk in (("its embedded key", embedded), (label, pinned)):
        if pk is not None and jwk_thumbprint(pk) != body["kid"]:
            raise CheckpointError(f"checkpoint is signed by key {body['kid']}, not {name} {jwk_thumbprint(pk)}")
    try:
        sig = b64u_decode(doc["sig"], field="sig")
        (pinned or embedded).verify(sig, dumps(body).encode())  # type: ignore[union-attr]
    except (LayerlockError, InvalidSignature):
        raise CheckpointError("checkpoint signature does not verify (the file was altered or forged)") from None
    return Checkpoint(size=body["size"], head=head, ts=body["ts"], kid=body["kid"])


class ChainWalk:
    """Feed records oldest first (:meth:`feed`), then :meth:`finish`: checks the chain from
    genesis and that record #size hashes to ``head`` for every checkpoint given.

    Raises :class:`ChainBroken` at the first problem.  Used by the server's ``audit verify``
    and by the CLI on records it fetched itself."""

    def __init__(self, anchors: Iterable[Checkpoint] = ()) -> None:
        self.count = 0
        self.prev = GENESIS
        self.anchors: dict[int, str] = {}
        for cp in anchors:
            if self.anchors.setdefault(cp.size, cp.head) != cp.head:
                raise ChainBroken(0, "checkpoint", f"two signed checkpoints of size {cp.size} name different "
                                  "heads: the key signed two histories")
        if self.anchors.get(0, GENESIS) != GENESIS:
            raise ChainBroken(0, "checkpoint", "a checkpoint of size 0 must have the genesis head")

    def feed(self, ident: str, canonical: str, h: str) -> None:
        try:
            rec = json.loads(canonical)
        except (ValueError, TypeError):
            raise ChainBroken(self.count, ident, "record is not JSON") from None
        if not isinstance(rec, dict) or rec.get("prev") != self.prev:
            raise ChainBroken(self.count, ident, "prev does not match the hash of the previous record")
        if dumps(rec) != canonical or h != digest(canonical):
            raise ChainBroken(self.count, ident, "record was altered")
        want = self.anchors.get(self.count + 1)
        if want is not None and h != want:
            raise ChainBroken(self.count, ident, f"record #{self.count + 1} hashes to {h[:12]}…, not the head "
                              f"{want[:12]}… of the signed checkpoint of size {self.count + 1}: history "
                              "up to that checkpoint was rewritten")
        self.prev = h
        self.count += 1

    def finish(self) -> None:
        longest = max(self.anchors, default=0)
        if longest > self.count:
            raise ChainBroken(self.count, "end", f"the log has {self.count} records, fewer than the "
                              f"{longest} of a signed checkpoint: records were removed")


# --- stored checkpoints (server side: Redis holds them, the key dir signs them) ---------------
# KEYS: the audit stream, its head.  Returns {length, head or '', the last record's hash or ''}:
# one script, so the three agree on a single Redis and on a cluster alike (a cluster client's
# MULTI returns stream entries unparsed).
_SNAPSHOT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local h = ''
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do if f[i] == 'h' then h = f[i + 1] end end
end
return {redis.call('XLEN', KEYS[1]), redis.call('GET', KEYS[2]) or '', h}
"""


def snapshot(r: Any) -> tuple[int, str]:
    """(size, head) of the chain, read atomically; refuses a head that is not the last record's."""
    size, head, last = r.eval(_SNAPSHOT, 2, P + "audit", P + "audit:head")
    if (last or None) != ((head or None) if size else None):
        raise CheckpointError("the audit head does not match the last record; run `layerlock audit verify`")
    return int(size), head or GENESIS


def stored(r: Any, pk: ed25519.Ed25519PublicKey) -> tuple[list[Checkpoint], list[dict[str, Any]], int]:
    """Stored checkpoints: (those that verify under ``pk``, their documents, how many do not)."""
    good: list[Checkpoint] = []
    docs: list[dict[str, Any]] = []
    bad = 0
    for raw in r.lrange(STORED, 0, -1):
        try:
            doc = json.loads(raw)
            good.append(verify(doc, pk))
            docs.append(doc)
        except (ValueError, CheckpointError):
            bad += 1
    return good, docs, bad


def maybe_store(r: Any, doc: dict[str, Any], latest: Checkpoint | None) -> bool:
    """Keep ``doc`` if the log grew since ``latest`` and ``STORE_EVERY`` seconds have passed."""
    cp = doc["checkpoint"]
    if latest is not None and (cp["size"] <= latest.size or cp["ts"] - latest.ts < STORE_EVERY):
        return False
    with r.pipeline(transaction=True) as pipe:
        pipe.lpush(STORED, dumps(doc))
        pipe.ltrim(STORED, 0, KEEP - 1)
        pipe.execute()
    return True
