"""Hand-written mutants of the security-critical code, each run against the tests meant to kill it.

``make mutants`` (not part of ``make test``): every mutant below flips a comparison, drops a part
of the associated data, skips a check, ... in a *temporary copy* of the repository, then runs the
listed test files there with ``pytest -x``.  A mutant is

* **killed** when the tests fail (what we want: some test holds that check);
* **survived** when they pass -- no test notices that the check is gone; each survivor is either a
  missing test or a check that is redundant by design (the note says which we believe);
* **stale** when its snippet is no longer in the file (the code moved: update the list).

The working tree is never written to.  The copy imports as ``layerlock.*`` through a ``layerlock/``
folder of symlinks put first on ``PYTHONPATH`` (ahead of the editable install's finder), and the
tests' subprocesses (gunicorn, the CLIs) inherit it; the script checks which file is imported.

    .venv/bin/python bench/mutants.py            # all (~5 minutes on 2 cores)
    .venv/bin/python bench/mutants.py C1 U2      # some, by id
    .venv/bin/python bench/mutants.py --list

Why not mutmut: it generates hundreds of mutants per module and reruns the tests for each; the
audit mutants need a real gunicorn + Redis per run (~20 s), and its copy-and-trampoline layout
does not follow this repository's folder-to-namespace mapping.  A fixed list of mutations that
each model a plausible security regression is cheaper and says more per line of output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {"shared": "shared", "verifier": "verifier", "license_server": "license_server", "demo": "demo"}

CHUNK_TESTS = ("tests/shared/test_chunks_aad.py", "tests/shared/test_chunks_keystream.py",
               "tests/shared/test_lockfile.py")
TOKEN_TESTS = ("tests/shared/test_tokens.py",)
ACTIVATION_TESTS = ("tests/shared/test_activation.py",)
AUDIT_TESTS = ("tests/license_server/test_audit.py", "tests/license_server/test_audit_tamper.py",
               "tests/license_server/test_audit_atomic.py", "tests/license_server/test_two_servers.py",
               "tests/license_server/test_cli.py::test_audit_verify_finds_the_first_break")


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str
    tests: tuple[str, ...]
    note: str = ""


MUTANTS = [
    # --- shared/chunks.py: the bundle's cryptography ----------------------------------------------
    Mutant("C1", "shared/chunks.py", 'return digest + index.to_bytes(8, "big") + (b"\\x01" if final else b"\\x00")',
           'return index.to_bytes(8, "big") + (b"\\x01" if final else b"\\x00")',
           "chunk AAD without the header digest", CHUNK_TESTS),
    Mutant("C2", "shared/chunks.py", 'return digest + index.to_bytes(8, "big") + (b"\\x01" if final else b"\\x00")',
           'return digest + index.to_bytes(8, "big")', "chunk AAD without the final flag", CHUNK_TESTS),
    Mutant("C3", "shared/chunks.py", 'return digest + index.to_bytes(8, "big") + (b"\\x01" if final else b"\\x00")',
           'return digest + (b"\\x01" if final else b"\\x00")', "chunk AAD without the index", CHUNK_TESTS,
           note="redundant by design: the index is also in the nonce"),
    Mutant("C4", "shared/chunks.py", 'return salt[:4] + index.to_bytes(8, "big")', "return salt[:4] + bytes(8)",
           "one nonce for every chunk of a bundle (GCM nonce reuse)", CHUNK_TESTS),
    Mutant("C5", "shared/chunks.py", "return hmac.compare_digest(key_check(check_key, header_digest), stored)",
           "return True", "key check skipped (wrong key / edited header not reported as such)", CHUNK_TESTS),
    Mutant("C6", "shared/chunks.py", "HKDF(hashes.SHA256(), 96, salt, _KDF_INFO)",
           "HKDF(hashes.SHA256(), 96, None, _KDF_INFO)", "subkeys ignore the per-bundle salt", CHUNK_TESTS),
    Mutant("C7", "shared/chunks.py", "return hmac.compare_digest(self.tag(), expected)", "return True",
           "locked-file GMAC not checked", CHUNK_TESTS),
    Mutant("C8", "shared/chunks.py", "len(data_key) != KEY_BYTES", "len(data_key) < 16",
           "data keys of 16..31 bytes accepted", CHUNK_TESTS),
    # --- shared/tokens.py: license tokens and key pinning -----------------------------------------
    Mutant("T1", "shared/tokens.py", 'if header.get("alg") not in ALGORITHMS:\n        raise TokenError',
           'if False:\n        raise TokenError', "token algorithm allow-list check skipped", TOKEN_TESTS,
           note="PyJWT's algorithms= list refuses the same tokens (different message)"),
    Mutant("T2", "shared/tokens.py", "if verify_exp and t > claims.exp + leeway:",
           "if verify_exp and t > claims.exp + leeway + 3600:", "expired tokens accepted for an hour", TOKEN_TESTS),
    Mutant("T3", "shared/tokens.py", "if t + leeway < claims.nbf:", "if False:", "nbf not checked", TOKEN_TESTS),
    Mutant("T4", "shared/tokens.py", "if claims.sub != machine_code:", "if False:",
           "token accepted for another machine", TOKEN_TESTS),
    Mutant("T5", "shared/tokens.py", "if model_id is not None and claims.mdl != model_id:", "if False:",
           "token accepted for another model", TOKEN_TESTS),
    Mutant("T6", "shared/tokens.py", 'return payload.get("endorses") == kid and payload.get("x") == x',
           'return payload.get("endorses") == kid', "endorsement need not name the key material", TOKEN_TESTS),
    Mutant("T7", "shared/tokens.py", 'header.get("typ") != ENDORSEMENT_TYP or', "",
           "endorsement typ not checked (a token could pass as an endorsement)", TOKEN_TESTS),
    Mutant("T8", "shared/tokens.py", 'if jwk.get("kid") != kid:\n            raise TokenError',
           'if False:\n            raise TokenError', "JWKS kid need not be the key's thumbprint", TOKEN_TESTS),
    # --- shared/activation.py: signed activation requests -----------------------------------------
    Mutant("A1", "shared/activation.py", 'key.verify(b64u_decode(req.sig, field="sig"), req.signed_bytes())',
           'b64u_decode(req.sig, field="sig")', "activation signature not verified", ACTIVATION_TESTS),
    Mutant("A2", "shared/activation.py", 'payload = {"machine": machine, "model": model, "ts": ts, "nonce": nonce}',
           'payload = {"machine": machine, "ts": ts, "nonce": nonce}', "the model is not signed", ACTIVATION_TESTS),
    Mutant("A3", "shared/activation.py", '_DOMAIN = b"layerlock-activate-v1\\0"', '_DOMAIN = b""',
           "no domain separation in the signed bytes", ACTIVATION_TESTS,
           note="signer and verifier share the constant; only a known-answer vector would pin it"),
    Mutant("A4", "shared/activation.py", "len(b64u_decode(nonce, field=\"nonce\")) != NONCE_BYTES",
           "len(b64u_decode(nonce, field=\"nonce\")) < 1", "short nonces accepted", ACTIVATION_TESTS),
    # --- store/commit.py (the write path), store/audit.py and checkpoints.py: the audit chain ---------
    Mutant("U1", "license_server/store/commit.py", "if head ~= ARGV[2] then return {0, head} end", "",
           "audit append without compare-and-set on the head (chain forks under concurrency)", AUDIT_TESTS),
    Mutant("U2", "license_server/store/commit.py", "if not ok then return {-1, i} end", "",
           "commit guards ignored (lost updates)", AUDIT_TESTS),
    Mutant("U3", "license_server/store/commit.py",
           "if n and not redis.call('SET', KEYS[n[1]], '1', 'NX', 'EX', n[2]) then return {2, 0} end",
           "if n then redis.call('SET', KEYS[n[1]], '1', 'EX', n[2]) end", "activation nonce not single-use",
           AUDIT_TESTS),
    Mutant("U4", "license_server/store/commit.py", "redis.call('SET', KEYS[2], ARGV[4])\n", "",
           "head not moved on append", AUDIT_TESTS),
    Mutant("U5", "license_server/store/commit.py", "if leaked:", "if False:",
           "secret-looking fields allowed into audit records", AUDIT_TESTS,
           note="no caller passes one today; only a unit test of Commits would pin it"),
    Mutant("U6", "license_server/store/audit.py", "if head != walk.prev:", "if False:",
           "verify ignores the head (records deleted at the end go unnoticed)", AUDIT_TESTS),
    Mutant("K1", "license_server/checkpoints.py", "if dumps(rec) != canonical or h != digest(canonical):",
           "if False:", "verify ignores an edited record's own hash / canonical form", AUDIT_TESTS),
    Mutant("K2", "license_server/checkpoints.py",
           'if not isinstance(rec, dict) or rec.get("prev") != self.prev:', "if not isinstance(rec, dict):",
           "verify ignores prev (deleted or reordered records)", AUDIT_TESTS),
]


def _copy(dest: Path) -> Path:
    """The repository's source, tests and deploy files (no venv, no git, no caches) + the layerlock/ links."""
    skip = shutil.ignore_patterns(".venv", ".git", "data", "__pycache__", ".pytest_cache", ".mypy_cache",
                                  ".ruff_cache", ".hypothesis", ".typecheck", "*.llk", "*.locked.*")
    root = dest / "repo"
    shutil.copytree(REPO, root, ignore=skip, symlinks=True)
    ns = root / "layerlock"
    ns.mkdir()
    for name, folder in PARTS.items():
        if (root / folder).is_dir():
            (ns / name).symlink_to(root / folder, target_is_directory=True)
    return root


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAYERLOCK_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _imports_the_copy(root: Path) -> None:
    probe = ("import layerlock.shared.chunks as c, layerlock.license_server.store.audit as a; "
             "print(c.__file__); print(a.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=_env(root), capture_output=True, text=True,
                         check=True).stdout.split()
    assert all(Path(f).resolve().is_relative_to(root.resolve()) for f in out), f"imports the wrong tree: {out}"


def _pytest(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                            cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -1, time.monotonic() - t0, out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    return proc.returncode, time.monotonic() - t0, lines[-1] if lines else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ids", nargs="*", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.ids or m.id in args.ids]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.id:3} {m.path:32} {m.what}")
        return 0 if chosen or args.list else 2

    with tempfile.TemporaryDirectory(prefix="layerlock-mutants-") as tmp:
        root = _copy(Path(tmp))
        _imports_the_copy(root)
        for tests in dict.fromkeys(m.tests for m in chosen):  # the unmutated copy must pass first
            rc, secs, last = _pytest(root, tests, args.timeout)
            print(f"baseline {' '.join(Path(t).name for t in tests)}: {last} ({secs:.0f} s)", flush=True)
            if rc != 0:
                print("baseline fails: fix the tests before reading mutants", file=sys.stderr)
                return 1
        results: dict[str, list[Mutant]] = {"killed": [], "survived": [], "stale": [], "timeout": []}
        for m in chosen:
            target = root / m.path
            pristine = target.read_text() if target.exists() else ""
            if pristine.count(m.old) != 1:
                results["stale"].append(m)
                print(f"{m.id:3} STALE     {m.what}: snippet not found once in {m.path}", flush=True)
                continue
            target.write_text(pristine.replace(m.old, m.new))
            try:
                rc, secs, last = _pytest(root, m.tests, args.timeout)
            finally:
                target.write_text(pristine)
            verdict = "timeout" if rc == -1 else "survived" if rc == 0 else "killed"
            results[verdict].append(m)
            extra = f"  [{m.note}]" if verdict == "survived" and m.note else ""
            print(f"{m.id:3} {verdict.upper():9} {m.what} ({secs:.0f} s; {last}){extra}", flush=True)
    total = len(chosen)
    print(f"\nmutants: {total}  killed: {len(results['killed'])}  survived: {len(results['survived'])}  "
          f"stale: {len(results['stale'])}  timeout: {len(results['timeout'])}")
    for m in results["survived"]:
        print(f"  survived {m.id} {m.path}: {m.what}" + (f" -- {m.note}" if m.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
