"""Signed checkpoints anchor the audit chain outside Redis (see license_server/checkpoints.py).

Every tamper case is done the way an attacker with write access to Redis would: directly on the
stream and the head key, re-chaining (recomputing every later ``prev`` and ``h``) where the case
says so.  The server's own chain walk is fooled by the re-chained cases once the attacker also
deletes the checkpoints the server kept in Redis; a checkpoint the auditor saved elsewhere is
not, and ``layerlock audit verify --checkpoint`` checks it locally, from records fetched over REST.
"""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519
from ls_helpers import activate, world

from layerlock.license_server import checkpoints
from layerlock.license_server.cli import main
from layerlock.license_server.store import dumps
from tests.conftest import CLI, PYTHON, REPO, LicenseServer, _env

STREAM, HEAD, STORED = "{ll}:audit", "{ll}:audit:head", "{ll}:audit:checkpoints"
GENESIS = "0" * 64
Rec = tuple[str, dict[str, Any]]


# --- helpers ---------------------------------------------------------------------------------------
def cli(server: Any, *args: str) -> tuple[int, str]:
    env = {"LAYERLOCK_SERVER": server.url, "LAYERLOCK_API_KEY": server.admin_key}
    res = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return res.exit_code, res.output


def save_checkpoint(server: Any, path: Path) -> dict[str, Any]:
    code, out = cli(server, "audit", "checkpoint", "--out", str(path), "--json")
    assert code == 0, out
    return json.loads(out)


def local_verify(server: Any, *paths: Path, key: Path | None = None) -> tuple[int, dict[str, Any] | str]:
    args = ["audit", "verify", "--json", *(a for p in paths for a in ("--checkpoint", str(p)))]
    code, out = cli(server, *args, *(["--key", str(key)] if key else []))
    try:
        return code, json.loads(out[:out.rindex("}") + 1])
    except ValueError:
        return code, out


def server_verify(server: Any) -> dict[str, Any]:
    resp = server.api("GET", "/v1/audit/verify")
    assert resp.status_code == 200, resp.text
    return resp.json()


def grow(server: Any, activations: int = 1) -> None:
    m, model_id, _, _ = world(server)
    for _ in range(activations):
        assert activate(server, m, model_id).status_code == 200


def rechain(server: Any, transform: Callable[[list[Rec]], list[Rec]]) -> None:
    """The attack: rewrite the stream as ``transform(records)``, recompute every ``prev`` and ``h``
    from genesis, rebuild the stream (same ids) and reset the head, in one transaction."""
    r = server.redis()
    recs = [(sid, json.loads(f["rec"])) for sid, f in r.xrange(STREAM)]
    prev = GENESIS
    with r.pipeline(transaction=True) as pipe:
        pipe.delete(STREAM)
        for sid, rec in transform(recs):
            text = dumps({**rec, "prev": prev})
            prev = hashlib.sha256(text.encode()).hexdigest()
            pipe.xadd(STREAM, {"rec": text, "h": prev}, id=sid)
        pipe.set(HEAD, prev)
        pipe.execute()


def forget_stored(server: Any) -> None:
    """A thorough attacker also deletes the signed checkpoints the server kept in Redis."""
    server.redis().delete(STORED)


def assert_fooled(server: Any) -> None:
    """The server's own walk (no checkpoint left to compare with) says ok: the attack worked on it."""
    doc = server_verify(server)
    assert doc["ok"] is True, doc


# --- the four tamper cases against a saved checkpoint ---------------------------------------------
def test_truncated_newest_records_with_head_reset(license_server, tmp_path):
    grow(license_server)
    cp = save_checkpoint(license_server, tmp_path / "cp.json")
    grow(license_server, activations=2)
    r = license_server.redis()
    ids = [sid for sid, _ in r.xrange(STREAM)]
    n = cp["size"]
    assert len(ids) >= n + 5

    # Removing only records newer than the checkpoint is NOT detected by it (it does not cover them).
    r.xdel(STREAM, *ids[n + 2:])
    r.set(HEAD, r.xrange(STREAM)[-1][1]["h"])
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 0 and doc["ok"] is True and doc["checked"] == n + 2, doc

    # Removing records the checkpoint covers is.
    r.xdel(STREAM, *ids[n - 2:n + 2])
    r.set(HEAD, r.xrange(STREAM)[-1][1]["h"])
    forget_stored(license_server)
    assert_fooled(license_server)
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 1 and doc["ok"] is False and doc["break_at"] == "end", doc
    assert f"fewer than the {n} of a signed checkpoint: records were removed" in doc["reason"]

    # ... also once new records have grown the log past the checkpoint's size again.
    grow(license_server, activations=2)
    assert_fooled(license_server)
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 1 and doc["checked"] == n - 1, doc
    assert f"record #{n} hashes to" in doc["reason"] and "was rewritten" in doc["reason"]


def test_edited_middle_record_rechained(license_server, tmp_path):
    grow(license_server)
    grow(license_server)
    cp = save_checkpoint(license_server, tmp_path / "cp.json")
    grow(license_server)
    n = cp["size"]
    target = n // 2

    def forge(recs: list[Rec]) -> list[Rec]:
        sid, rec = recs[target]
        return [*recs[:target], (sid, {**rec, "customer": "someone-else", "forged": True}), *recs[target + 1:]]

    rechain(license_server, forge)
    # The checkpoint the server kept in Redis still catches it ...
    doc = server_verify(license_server)
    assert doc["ok"] is False and "was rewritten" in doc["reason"], doc
    # ... until the attacker deletes it; the auditor's copy does not care.
    forget_stored(license_server)
    assert_fooled(license_server)
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 1 and doc["checked"] == n - 1, doc
    assert doc["break_at"] == license_server.redis().xrange(STREAM)[n - 1][0]
    assert f"record #{n} hashes to" in doc["reason"]
    assert cp["head"][:12] in doc["reason"]


def test_deleted_middle_record_rechained(license_server, tmp_path):
    grow(license_server)
    cp = save_checkpoint(license_server, tmp_path / "cp.json")
    grow(license_server, activations=2)
    n = cp["size"]
    rechain(license_server, lambda recs: recs[:2] + recs[3:])
    forget_stored(license_server)
    assert_fooled(license_server)
    assert license_server.redis().xlen(STREAM) >= n  # still long enough: only the hash tells
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 1 and doc["ok"] is False and f"record #{n} hashes to" in doc["reason"], doc


def test_record_edited_in_place_without_rechaining(license_server, tmp_path):
    grow(license_server)
    save_checkpoint(license_server, tmp_path / "cp.json")
    r = license_server.redis()
    entries = r.xrange(STREAM)
    sid, fields = entries[1]
    edited = dumps({**json.loads(fields["rec"]), "name": "Forged"})
    with r.pipeline(transaction=True) as pipe:  # streams cannot edit an entry: rebuild, same ids
        pipe.delete(STREAM)
        for eid, f in entries:
            pipe.xadd(STREAM, {"rec": edited, "h": f["h"]} if eid == sid else f, id=eid)
        pipe.execute()
    assert server_verify(license_server)["ok"] is False  # the naive check catches this one too
    code, doc = local_verify(license_server, tmp_path / "cp.json")
    assert code == 1 and doc == {**doc, "ok": False, "checked": 1, "break_at": sid, "reason": "record was altered"}


# --- what verifies, and what is refused ------------------------------------------------------------
def test_untampered_log_that_grew_verifies_and_cli_process_reports_it(license_server, tmp_path):
    grow(license_server)
    first = save_checkpoint(license_server, tmp_path / "a.json")
    grow(license_server, activations=3)
    second = save_checkpoint(license_server, tmp_path / "b.json")
    grow(license_server)
    key = tmp_path / "checkpoint.jwk"
    assert cli(license_server, "audit", "checkpoint-key", "--out", str(key))[0] == 0
    assert checkpoints.parse_key(key.read_text()) is not None
    code, doc = local_verify(license_server, tmp_path / "a.json", tmp_path / "b.json", key=key)
    total = license_server.redis().xlen(STREAM)
    assert code == 0 and doc["ok"] is True and doc["checked"] == total > second["size"] > first["size"], doc
    assert doc["head"] == license_server.redis().get(HEAD) and doc["key"] == "pinned"
    assert [c["size"] for c in doc["checkpoints"]] == [first["size"], second["size"]]

    # The real command, as an auditor runs it: exit 0 and one line; then exit 1 and one line.
    base = [PYTHON, "-m", CLI, "audit", "verify", "--checkpoint", str(tmp_path / "b.json"), "--key", str(key),
            "--server", license_server.url, "--api-key", license_server.admin_key]
    ok = subprocess.run(base, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"audit log ok: {total} records chained from genesis; extends ")
    rechain(license_server, lambda recs: [(sid, {**rec, "actor": "nobody"}) for sid, rec in recs])
    bad = subprocess.run(base, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: audit log does not extend the checkpoint: ")
    assert "record #1 hashes to" not in bad.stderr and f"record #{second['size']} hashes to" in bad.stderr


def test_edited_checkpoint_file_is_refused(server, tmp_path):
    grow(server)
    path = tmp_path / "cp.json"
    save_checkpoint(server, path)
    good = json.loads(path.read_text())
    code, out = cli(server, "audit", "checkpoint", "--out", str(path))
    assert code == 1 and "exists (keep old checkpoints; --force overwrites)" in out
    for field, value in (("size", good["checkpoint"]["size"] - 1), ("head", "ab" * 32),
                         ("ts", good["checkpoint"]["ts"] + 3600)):
        path.write_text(json.dumps({**good, "checkpoint": {**good["checkpoint"], field: value}}))
        code, out = local_verify(server, path)
        assert code == 1 and "signature does not verify (the file was altered or forged)" in out, (field, out)


def test_checkpoint_signed_by_another_key_is_refused(server, tmp_path):
    real = server.api("GET", "/v1/audit/checkpoint").json()
    cp = real["checkpoint"]
    other = ed25519.Ed25519PrivateKey.generate()
    forged = checkpoints.sign(other, cp["size"], cp["head"], cp["ts"])
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    (tmp_path / "other.jwk").write_text(json.dumps(checkpoints.public_jwk(other.public_key())))
    (tmp_path / "real.json").write_text(json.dumps(real))
    real_kid = real["key"]["kid"]
    # self-consistent, but not the key the server publishes, nor the pinned one
    code, out = local_verify(server, tmp_path / "forged.json")
    assert code == 1 and f"not the server's published key {real_kid}" in out, out
    server_key = tmp_path / "server.jwk"
    server_key.write_text(json.dumps(server.api("GET", "/v1/audit/checkpoint-key", key="").json()))
    code, out = local_verify(server, tmp_path / "forged.json", key=server_key)
    assert code == 1 and f"not the pinned key {real_kid}" in out, out
    # a genuine checkpoint checked against a different pinned key
    code, out = local_verify(server, tmp_path / "real.json", key=tmp_path / "other.jwk")
    assert code == 1 and "not the pinned key" in out, out
    # another key's signature dressed up with the real key and kid
    (tmp_path / "swapped.json").write_text(json.dumps({**forged, "checkpoint": cp, "key": real["key"]}))
    code, out = local_verify(server, tmp_path / "swapped.json")
    assert code == 1 and "signature does not verify" in out, out
    # and the genuine one passes
    assert local_verify(server, tmp_path / "real.json", key=server_key)[0] == 0


@pytest.mark.parametrize(("content", "message"), [
    ("not json {", "is not JSON"),
    ("[1, 2]", "not a checkpoint: expected an object with checkpoint and sig"),
    ('{"checkpoint": {"typ": "llk-audit-checkpoint/v1", "head": "00"}, "sig": "x"}', "missing kid, size, ts"),
    ('{"checkpoint": {"typ": "llk-audit-checkpoint/v1", "size": "3", "head": "' + "0" * 64
     + '", "ts": 1, "kid": "k"}, "sig": "x"}', "size must be a non-negative integer"),
    ("\udcff", "cannot read checkpoint"),
])
def test_bad_checkpoint_files_get_a_one_line_error(server, tmp_path, content, message):
    path = tmp_path / "cp.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    code, out = local_verify(server, path)
    assert code == 1 and message in out and out.count("\n") == 1, out
    code, out = cli(server, "audit", "verify", "--checkpoint", str(tmp_path / "missing.json"))
    assert code == 2 and "does not exist" in out


# --- REST, stored checkpoints, the key -------------------------------------------------------------
def test_raw_export_roles_and_checkpoint_key(server):
    grow(server)
    r = server.redis()
    stream = r.xrange(STREAM)
    seen, cursor = [], None
    while True:
        doc = server.api("GET", "/v1/audit/raw", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += doc["items"]
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert seen[:len(stream)] == [{"id": sid, "rec": f["rec"], "h": f["h"]} for sid, f in stream]
    assert server.api("GET", "/v1/audit/raw", params={"cursor": "x"}).status_code == 400
    assert server.api("GET", "/v1/audit/raw", params={"limit": 0}).status_code == 400

    auditor = server.api("POST", "/v1/keys", {"role": "auditor"}).json()["api_key"]
    operator = server.api("POST", "/v1/keys", {"role": "operator"}).json()["api_key"]
    for path in ("/v1/audit/raw", "/v1/audit/checkpoint", "/v1/audit/checkpoints"):
        assert server.api("GET", path, key=auditor).status_code == 200
        assert server.api("GET", path, key=operator).status_code == 403
        assert server.api("GET", path, key="").status_code == 401
    jwk = server.api("GET", "/v1/audit/checkpoint-key", key="").json()  # public, like the JWKS
    on_disk = server.data_dir / "keys" / "checkpoint.pub"
    assert json.loads(on_disk.read_text()) == jwk and set(jwk) == {"kty", "crv", "x", "kid"}
    for name in ("checkpoint.pem", "checkpoint.pub"):
        assert stat.S_IMODE((server.data_dir / "keys" / name).stat().st_mode) == 0o600
    doc = server.api("GET", "/v1/audit/checkpoint").json()
    cp = checkpoints.verify(doc, checkpoints.parse_key(json.dumps(jwk)))
    assert cp.size == r.xlen(STREAM) and cp.head == r.get(HEAD) and abs(cp.ts - time.time()) < 5


def test_server_keeps_signed_checkpoints_and_checks_them(license_server):
    grow(license_server)
    r = license_server.redis()
    first = license_server.api("GET", "/v1/audit/checkpoint").json()
    grow(license_server)
    license_server.api("GET", "/v1/audit/checkpoint")  # not due yet: at most one per STORE_EVERY seconds
    items = license_server.api("GET", "/v1/audit/checkpoints").json()
    assert items == {"items": [first], "unverifiable": 0}
    assert server_verify(license_server)["checkpoints"] == 1
    # a stored checkpoint from a minute ago is due for a successor
    old = checkpoints.sign(checkpoints.create_key(license_server.data_dir / "keys"), first["checkpoint"]["size"],
                           first["checkpoint"]["head"], first["checkpoint"]["ts"] - checkpoints.STORE_EVERY)
    r.delete(STORED)
    r.lpush(STORED, dumps(old))
    latest = license_server.api("GET", "/v1/audit/checkpoint").json()
    assert license_server.api("GET", "/v1/audit/checkpoints").json()["items"] == [latest, old]
    # a Redis writer can delete them, but not forge one
    forged = {**latest, "checkpoint": {**latest["checkpoint"], "size": 1}}
    r.lpush(STORED, dumps(forged), "garbage")
    doc = server_verify(license_server)
    assert doc["ok"] is False and doc["break_at"] == "checkpoints" and doc["reason"].startswith("2 stored"), doc
    # the server never signs a head that is not its last record's hash
    r.set(HEAD, "f" * 64)
    resp = license_server.api("GET", "/v1/audit/checkpoint")
    assert resp.status_code == 409 and resp.json()["error"] == "bad_checkpoint", resp.text


def test_checkpoint_key_is_created_lazily_once_for_an_older_key_dir(tmp_path, redis_server):
    server = LicenseServer(tmp_path / "server", redis_server.url, workers=2)
    keys = server.data_dir / "keys"
    for name in ("checkpoint.pem", "checkpoint.pub"):
        (keys / name).unlink()  # a key dir from before checkpoints existed
    server.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            docs = list(pool.map(lambda _: server.api("GET", "/v1/audit/checkpoint").json(), range(16)))
        assert len({d["key"]["kid"] for d in docs}) == 1  # every worker signs with the one key that won
        pk = checkpoints.parse_key((keys / "checkpoint.pub").read_text())
        for doc in docs:
            checkpoints.verify(doc, pk)
        assert sorted(p.name for p in keys.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))) == [
            "checkpoint.pem", "checkpoint.pub"]
    finally:
        server.stop()
