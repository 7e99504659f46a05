"""Audit-chain verification against tampering done directly in Redis, on a real server.

``GET /v1/audit/verify`` walks the stream oldest first.  Each record is checked three ways, and
each way is pinned by its own case here (``test_cli.py`` only deletes a middle record):

* its ``prev`` must be the hash of the record before (a deletion or reordering in the middle);
* its JSON must be canonical and hash to its stored ``h`` -- an edit in place is reported *at the
  edited record*, not one record later as the next ``prev`` alone would;
* after the last record, the head hash must be the last record's hash -- deleting records at the
  end leaves every remaining link intact, and only the head tells.

Redis streams cannot edit an entry, so an edit in place rebuilds the stream with the same ids
(``DEL`` + ``XADD <id>`` in one transaction), leaving the head key alone, as an attacker with
Redis access would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from ls_helpers import add_model, issue, world

from layerlock.license_server.store import dumps

STREAM, HEAD = "{ll}:audit", "{ll}:audit:head"
ALTERED = "record was altered"
PREV = "prev does not match the hash of the previous record"


def _records(server: Any) -> list[tuple[str, dict[str, str]]]:
    recs = server.redis().xrange(STREAM)
    assert server.api("GET", "/v1/audit/verify").json() == {"ok": True, "checked": len(recs),
                                                            "head": recs[-1][1]["h"]}
    return recs


def _rewrite(server: Any, sid: str, edit: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Replace the fields of stream entry ``sid`` by ``edit(fields)``, keeping every id and the head."""
    r = server.redis()
    entries = r.xrange(STREAM)
    head = r.get(HEAD)
    with r.pipeline(transaction=True) as pipe:
        pipe.delete(STREAM)
        for eid, fields in entries:
            pipe.xadd(STREAM, edit(fields) if eid == sid else fields, id=eid)
        pipe.execute()
    assert [eid for eid, _ in r.xrange(STREAM)] == [eid for eid, _ in entries] and r.get(HEAD) == head


def _verify(server: Any) -> dict[str, Any]:
    resp = server.api("GET", "/v1/audit/verify")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _edited(fields: dict[str, str], *, rehash: bool = False, canonical: bool = True, **changes: Any) -> dict[str, str]:
    rec = {**json.loads(fields["rec"]), **changes}
    text = dumps(rec) if canonical else json.dumps(rec, indent=1)
    return {"rec": text, "h": hashlib.sha256(text.encode()).hexdigest() if rehash else fields["h"]}


def test_record_edited_in_place_is_reported_at_that_record(license_server):
    """Breaks caught: dropping the ``h``/canonical-JSON check (the break would be reported one record late)."""
    world(license_server)
    recs = _records(license_server)
    assert len(recs) >= 4
    sid = recs[1][0]
    assert [json.loads(f["rec"])["type"] for _, f in recs[:4]] == [
        "apikey_created", "machine_registered", "model_registered", "license_issued"]
    _rewrite(license_server, sid, lambda f: _edited(f, customer="someone-else"))
    assert _verify(license_server) == {"ok": False, "checked": 1, "break_at": sid, "reason": ALTERED}


def test_non_canonical_record_with_matching_hash_is_reported_at_that_record(license_server):
    """Same content, re-encoded non-canonically with ``h`` recomputed: ``h`` matches, canonical form does not."""
    world(license_server)
    recs = _records(license_server)
    sid = recs[2][0]
    _rewrite(license_server, sid, lambda f: _edited(f, rehash=True, canonical=False))
    assert json.loads(license_server.redis().xrange(STREAM, sid, sid)[0][1]["rec"]) == json.loads(recs[2][1]["rec"])
    assert _verify(license_server) == {"ok": False, "checked": 2, "break_at": sid, "reason": ALTERED}


def test_consistently_rehashed_edit_breaks_the_next_link(license_server):
    """An edit with its own ``h`` recomputed passes its own check; the next record's ``prev`` catches it."""
    world(license_server)
    recs = _records(license_server)
    _rewrite(license_server, recs[1][0], lambda f: _edited(f, rehash=True, customer="someone-else"))
    assert _verify(license_server) == {"ok": False, "checked": 2, "break_at": recs[2][0], "reason": PREV}


def test_last_record_edited_in_place(license_server):
    """The last record has no successor: only its own check (unhashed edit) or the head (rehashed) tell."""
    m, _, _, _ = world(license_server)
    issue(license_server, m, add_model(license_server)[0], days=1)
    recs = _records(license_server)
    sid, n = recs[-1][0], len(recs)
    assert json.loads(recs[-1][1]["rec"])["type"] == "license_issued"
    _rewrite(license_server, sid, lambda f: _edited(f, machine="LLK-FORGED"))
    assert _verify(license_server) == {"ok": False, "checked": n - 1, "break_at": sid, "reason": ALTERED}
    _rewrite(license_server, sid, lambda f: _edited(f, rehash=True))
    doc = _verify(license_server)
    assert doc["ok"] is False and doc["checked"] == n and doc["break_at"] == "head"
    assert "head hash does not match the last record" in doc["reason"]


def test_records_deleted_at_the_end_are_reported_by_the_head(license_server):
    """Breaks caught: dropping the head comparison (every remaining link is intact)."""
    m, _, _, _ = world(license_server)
    for _ in range(2):
        issue(license_server, m, add_model(license_server)[0])
    r = license_server.redis()
    recs = _records(license_server)
    n = len(recs)
    assert n >= 5
    for deleted in (1, 3, n):  # the last one, then two more, then every record
        assert r.xdel(STREAM, *[sid for sid, _ in recs[n - deleted:]]) >= 1
        doc = _verify(license_server)
        assert doc["ok"] is False and doc["checked"] == n - deleted and doc["break_at"] == "head", doc
        assert "head hash does not match the last record" in doc["reason"]
    assert r.get(HEAD) == recs[-1][1]["h"]  # the head itself was never touched
