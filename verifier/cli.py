"""``layerlock-verifier``: enroll, run, status, check; request and import (the air-gapped exchange).

Exit codes: 0 success; 1 a refusal the operator must fix (bad config, daemon not running,
insecure state dir, server unreachable during enroll).  Errors go to stderr as one line per
problem; ``--json`` output goes to stdout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import click

from layerlock.shared.errors import LayerlockError
from layerlock.verifier import systemd
from layerlock.verifier.config import DEFAULT_CONFIG, DEFAULT_SOCKET, DEFAULT_STATE_DIR, Config, load_config

CONFIG_ENV = "LAYERLOCK_VERIFIER_CONFIG"


def _fail(exc: LayerlockError | str) -> None:
    message = exc.message if isinstance(exc, LayerlockError) else exc
    for line in message.splitlines():
        click.echo(f"error: {line}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The layerlock verifier sidecar: unlocks licensed models in memory and serves them locally."""


# --- enroll ------------------------------------------------------------------------------------
def _claim_secret(given: str | None) -> str | None:
    """The claim from ``--claim``: ``-`` reads it from a hidden prompt (or stdin when piped), so it
    is never in a process list, a shell history or sudo's log -- whoever reads it there before the
    host redeems it could bind their own keys to this machine's code."""
    if given is None:
        return None
    if given != "-":
        click.echo("warning: a claim secret on the command line is visible to other local users (ps) and "
                   "in sudo's log until it is redeemed; next time give --claim - and paste it", err=True)
        return given.strip()
    if sys.stdin.isatty():
        secret = click.prompt("claim secret (llc_…)", hide_input=True, err=True, default="", show_default=False)
    else:
        secret = sys.stdin.readline()
    if not secret.strip():
        _fail("--claim -: no claim secret was given (paste the llc_… that ops gave you)")
    return str(secret).strip()


@main.command()
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, type=click.Path(path_type=Path))
@click.option("--server", "server_url", help="license server URL, to fetch and pin its JWKS")
@click.option("--ca-bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA bundle for the server's TLS certificate")
@click.option("--jwks-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="pin the server keys from this file instead (air-gapped sites)")
@click.option("--machine-id-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="machine-id source (default /etc/machine-id); for tests and multi-instance demos")
@click.option("--pq", is_flag=True, help="also create an ML-KEM-768 key for the post-quantum hybrid suite")
@click.option("--claim", help="the single-use claim secret (llc_…) ops created with `layerlock machines add "
              "LLK-… --claim`: binds this machine's keys at the server now (needs --server). Give - to "
              "paste it at a hidden prompt (or pipe it in): on the command line it is visible to other "
              "local users and in sudo's log until it is redeemed")
@click.option("--json", "as_json", is_flag=True)
def enroll(state_dir: Path, server_url: str | None, ca_bundle: Path | None, jwks_file: Path | None,
           machine_id_file: Path | None, pq: bool, claim: str | None, as_json: bool) -> None:
    """Create the machine keys (kept if present), pin the server keys, print the enrollment code.

    Two ways to get the keys to the license server, both proving that ops meant this host:
    give the printed enrollment code (LLE1.…) to ops for `layerlock machines add`, or, if ops
    registered the bare machine code and gave you a claim secret, pass it with --claim and the
    keys are bound now.
    """
    # Imported here, not at the top: `run` and `status` start faster without them.
    from layerlock.shared.enrollment import DeviceClass, Enrollment, make_code
    from layerlock.shared.keys import raw_public
    from layerlock.shared.machine import machine_code
    from layerlock.verifier.activation import ServerClient
    from layerlock.verifier.state import StateDir

    if not server_url and not jwks_file:
        _fail("give --server URL (fetch the server keys) or --jwks-file FILE (air-gapped)")
    if claim is not None and not server_url:
        _fail("--claim needs --server URL: the claim is redeemed at the license server")
    claim = _claim_secret(claim)
    try:
        state = StateDir(state_dir)
        state.create()
        if jwks_file:
            try:
                document = json.loads(jwks_file.read_text())
            except ValueError:
                _fail(f"{jwks_file} is not JSON")
        else:
            document = ServerClient(str(server_url), ca_bundle=ca_bundle).fetch_jwks()
        state.save_jwks(document)  # validates before any key is made
        if not state.has_keys():
            state.create_keys(pq=pq)
        elif pq:
            state.add_pq_key()
        keys = state.load_keys()
        source = str(machine_id_file.resolve()) if machine_id_file else None
        code = machine_code(machine_id_path=source) if source else machine_code()
        pq_pub = raw_public(keys.kem.mlkem768.public_key()) if keys.kem.mlkem768 else None
        enrollment = Enrollment(machine=code, sig_pub=raw_public(keys.sign.public_key()),
                                kex_pub=raw_public(keys.kem.x25519.public_key()), pq_pub=pq_pub,
                                device=DeviceClass.detect())
        enrollment_code = make_code(enrollment, keys.sign)
        state.save_machine({"machine": code, "machine_id_file": source, "enrolled_at": int(time.time()),
                            "pq": pq_pub is not None})
        if claim is not None:
            ServerClient(str(server_url), ca_bundle=ca_bundle).enroll(enrollment_code, claim)
    except LayerlockError as exc:
        _fail(f"{exc.code}: {exc.message}" if claim is not None else exc)
    if as_json:
        click.echo(json.dumps({"machine": code, "enrollment_code": enrollment_code,
                               "state_dir": str(state_dir), "pinned_kids": sorted(state.load_jwks()),
                               "pq": pq_pub is not None, "claimed": claim is not None}))
    elif claim is not None:
        click.echo(f"machine code: {code}")
        click.echo("enrolled: the license server bound this machine's keys (claim redeemed); "
                   "start the sidecar: systemctl enable --now layerlock-verifier")
    else:
        click.echo(f"machine code: {code}")
        click.echo("enrollment code (give it to your vendor: layerlock machines add CODE):")
        click.echo(enrollment_code)


# --- check -------------------------------------------------------------------------------------
@main.command()
@click.option("-c", "--config", "config_path", envvar=CONFIG_ENV, default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(path_type=Path))
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help='also print {"ok", "config", "models"} or {"ok": false, "config", "problems"} on stdout')
def check(config_path: Path, path: Path | None, as_json: bool) -> None:
    """Validate a config file; print every problem as FILE: KEY: what is wrong."""
    target = path or config_path
    try:
        config = load_config(target)
    except LayerlockError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "config": str(target), "problems": exc.message.splitlines()}))
        _fail(exc)
    if as_json:
        click.echo(json.dumps({"ok": True, "config": str(target), "models": [m.id for m in config.models]}))
        return
    click.echo(f"ok: {target}: {len(config.models)} model(s): {', '.join(m.id for m in config.models)}")


# --- run ---------------------------------------------------------------------------------------
@main.command()
@click.option("-c", "--config", "config_path", envvar=CONFIG_ENV, default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(path_type=Path))
def run(config_path: Path) -> None:
    """The daemon: activate and unlock every configured model, then serve them on the socket."""
    try:
        config = load_config(config_path)
    except LayerlockError as exc:
        _fail(exc)
    try:
        serve(config)
    except LayerlockError as exc:
        _fail(exc)


def serve(config: Config) -> None:
    from layerlock.verifier.activation import ServerClient
    from layerlock.verifier.daemon import Daemon
    from layerlock.verifier.log import log
    from layerlock.verifier.server import SocketServer
    from layerlock.verifier.state import StateDir

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = ServerClient(config.server_url, ca_bundle=config.ca_bundle, timeout=config.request_timeout)
    holder: dict[str, Daemon] = {}

    def on_change() -> None:
        if "d" in holder:
            systemd.notify(f"STATUS={holder['d'].summary()}")

    daemon = Daemon(config, StateDir(config.state_dir), server, on_change=on_change)
    holder["d"] = daemon
    log("starting", machine=daemon.machine, models=[m.id for m in config.models], pid=os.getpid())
    systemd.notify("STATUS=activating")
    daemon.start()
    while not daemon.wait_settled(timeout=0.2):
        if stop.is_set():
            daemon.stop()
            return
    sock = SocketServer.from_config(config, daemon)
    try:
        sock.start()
    except (LayerlockError, OSError):
        daemon.stop()
        raise
    systemd.notify("READY=1", f"STATUS={daemon.summary()}")
    log("ready", summary=daemon.summary(), socket=str(config.socket))
    systemd.start_watchdog(lambda: daemon.healthy() and sock.alive(), stop)
    while not stop.wait(1.0):
        pass
    systemd.notify("STOPPING=1")
    log("stopping")
    sock.stop()
    daemon.stop()


# --- status ------------------------------------------------------------------------------------
def _socket_from(config_path: Path) -> str:
    try:
        raw = tomllib.loads(config_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_SOCKET
    value = raw.get("socket")
    if not isinstance(value, str):
        return DEFAULT_SOCKET
    return value if os.path.isabs(value) else str((config_path.resolve().parent / value).resolve())


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    delta = int(ts - time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    return f"{stamp} ({'in ' + str(delta) + 's' if delta >= 0 else str(-delta) + 's ago'})"


@main.command()
@click.option("-c", "--config", "config_path", envvar=CONFIG_ENV, default=DEFAULT_CONFIG, show_default=True,
              type=click.Path(path_type=Path))
@click.option("--socket", "socket_path", help="daemon socket (default: from the config file)")
@click.option("--json", "as_json", is_flag=True)
def status(config_path: Path, socket_path: str | None, as_json: bool) -> None:
    """Ask the running daemon: machine code, each model's state, token expiry, next renewal."""
    from layerlock.verifier import client
    from layerlock.verifier.errors import SidecarRefused, SidecarUnavailable

    path = socket_path or _socket_from(config_path)
    try:
        answer = client.status(socket_path=path)
    except SidecarUnavailable:
        if as_json:
            click.echo(json.dumps({"running": False, "socket": path}))
        click.echo(f"error: layerlock-verifier is not running (nothing listens on {path})", err=True)
        sys.exit(1)
    except SidecarRefused as exc:
        _fail(f"the daemon refused the status request: {exc.code}: {exc.message}")
    answer.pop("ok", None)
    if as_json:
        click.echo(json.dumps({"running": True, **answer}))
        return
    click.echo(f"machine code: {answer.get('machine')}")
    clock = answer.get("clock") or {}
    if clock and not clock.get("ok", True):
        click.echo(f"clock: offline use stopped (clock_rollback: {clock.get('reason')})")
    for m in answer.get("models", []):
        line = f"  {m['model']}: {m['state']}"
        if m["state"] != "unlocked":
            line += f" ({m.get('reason')}: {m.get('message')})"
        line += f"; token expires {_when(m.get('expires_at'))}; next renewal {_when(m.get('renew_at'))}"
        click.echo(line)


# --- the air-gapped exchange -------------------------------------------------------------------
_STATE_DIR = click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, type=click.Path(path_type=Path),
                          help="the enrolled state directory (state_dir in the config)")


@main.command()
@click.option("--model", "model_id", required=True, help="the model id to activate")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the request file to write (carry it to ops: layerlock activate-offline FILE --out RESP)")
@_STATE_DIR
@click.option("--force", is_flag=True, help="overwrite --out if it exists")
@click.option("--json", "as_json", is_flag=True)
def request(model_id: str, out: Path, state_dir: Path, force: bool, as_json: bool) -> None:
    """Write a signed activation request for a site with no route to the license server.

    Ops answer it with `layerlock activate-offline FILE --out RESP` wherever the server is; bring
    the response back and `layerlock-verifier import RESP`.  Only the latest request per model
    can be imported; renewal is the same exchange.
    """
    from layerlock.verifier.offline import write_request
    from layerlock.verifier.state import StateDir

    try:
        doc = write_request(StateDir(state_dir), model_id, out, force=force)
    except LayerlockError as exc:
        _fail(exc)
    req = doc["request"]
    if as_json:
        click.echo(json.dumps({"file": str(out), "machine": req["machine"], "model": req["model"],
                               "nonce": req["nonce"], "ts": req["ts"]}))
    else:
        click.echo(f"wrote {out}: request for {req['model']} from {req['machine']}; ops answer it with "
                   f"layerlock activate-offline {out.name} --out RESPONSE")


@main.command("import")
@click.argument("response_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_STATE_DIR
@click.option("--issuer", default="layerlock", show_default=True, help="the token issuer (issuer in the config)")
@click.option("--json", "as_json", is_flag=True)
def import_response(response_file: Path, state_dir: Path, issuer: str, as_json: bool) -> None:
    """Install the token from an air-gapped response file (from `layerlock activate-offline`).

    The token is checked exactly as an online one (pinned server key, this machine, this model,
    the data key opens with this machine's key) and must answer this machine's latest request;
    the running sidecar unlocks with it at its next retry (or restart it).
    """
    from layerlock.verifier.offline import import_response as do_import
    from layerlock.verifier.state import StateDir

    try:
        claims = do_import(StateDir(state_dir), response_file, issuer=issuer)
    except LayerlockError as exc:
        _fail(f"{exc.code}: {exc.message}")
    if as_json:
        click.echo(json.dumps({"model": claims.mdl, "machine": claims.sub, "license": claims.lic,
                               "expires_at": claims.exp, "renew_at": claims.rna}))
    else:
        click.echo(f"imported a token for {claims.mdl} (license {claims.lic}), valid until {_when(claims.exp)}; "
                   "the sidecar unlocks with it at its next retry")


if __name__ == "__main__":
    main()
