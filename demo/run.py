"""``layerlock demo``: the whole product on one machine, as a newcomer's first ten minutes.

Each step runs the real command a vendor, an operator or a customer host would run (the same
CLIs, the same REST API, the same processes), so the demo doubles as a walkthrough: every
command is echoed before it runs.  Long-running parts (license server + embedded Redis, the
verifier sidecar) are started in their own sessions so that Ctrl-C reaches only this process,
which then stops them in order and checks that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from layerlock.demo.model import build

MODEL_ID = "digits-demo"


def _bin(name: str) -> str:
    """Console scripts live beside the interpreter in a venv; fall back to PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port on 127.0.0.1")


def _say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _run(args: list[str], env: dict[str, str], *, echo: str | None = None) -> str:
    print("  $ " + (echo or " ".join(args)), flush=True)
    done = subprocess.run(args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"demo: step failed ({done.returncode}): {' '.join(args[:3])}…\n{done.stderr.strip()}")
    return done.stdout


def _wait(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited early with code {proc.returncode}")
        try:
            if check():
                return
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: {what} not ready after {timeout:.0f} s")


class Demo:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data = data_dir.resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = dict(os.environ, LAYERLOCK_SERVER=self.url, PYTHONUNBUFFERED="1")
        self.env.pop("LAYERLOCK_REDIS_URL", None)  # the demo always uses the embedded Redis

    def _spawn(self, name: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        print("  $ " + " ".join(args) + f"   (logs: {log})", flush=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        """Stop in reverse order of start: sidecar first (it drops the model), then the server."""
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            print(f"  stopped {name} (exit {proc.returncode})", flush=True)
        self.procs.clear()

    def run(self) -> None:
        if self.data.exists():
            shutil.rmtree(self.data)  # a demo starts from nothing, every time
        for sub in ("model", "server", "verifier", "logs"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.data / "verifier", 0o700)
        logs = self.data / "logs"

        _say("1/8  vendor: train a small digits classifier (the model to protect)")
        model = self.data / "model" / "digits.safetensors"
        original = build(model)
        print(f"  wrote {model}  (test accuracy {original:.4f})")

        _say("2/8  ops: initialise the license server's keys")
        init = json.loads(_run([_bin("layerlock"), "init", "--data-dir", str(self.data / "server"), "--json"],
                               self.env))
        self.env["LAYERLOCK_API_KEY"] = init["admin_api_key"]
        print("  admin API key exported as LAYERLOCK_API_KEY for the next steps (stored only hashed)")

        _say(f"3/8  ops: start the license server (gunicorn + embedded Redis) on {self.url}")
        server = self._spawn("license server", [_bin("layerlock"), "serve", "--data-dir", str(self.data / "server"),
                                                "--bind", f"127.0.0.1:{self.port}"], logs / "server.log")
        _wait(lambda: requests.get(self.url + "/readyz", timeout=1).ok, "license server", 60, server)
        print(f"  ops console: {self.url}/console/  (sign in with the admin key {self.env['LAYERLOCK_API_KEY']})",
              flush=True)

        _say("4/8  vendor: protect the model and register its data key (sealed) with the server")
        out = _run([_bin("layerlock"), "protect", str(model), "--model-id", MODEL_ID, "--register", self.url,
                    "--no-progress", "--json"], self.env)
        info = json.loads(out)
        info = info[0] if isinstance(info, list) else info
        locked = Path(info["locked"])
        bundle = Path(info["bundle"])
        print(f"  locked file: {locked}\n  bundle:      {bundle}")

        _say("5/8  customer host: enroll the verifier (creates machine keys, pins the server's JWKS)")
        state = self.data / "verifier" / "state"
        enroll = json.loads(_run([_bin("layerlock-verifier"), "enroll", "--state-dir", str(state),
                                  "--server", self.url, "--json"], self.env))
        machine = enroll["machine"]
        print(f"  machine code: {machine}")

        _say("6/8  ops: register the machine and issue a license")
        _run([_bin("layerlock"), "machines", "add", enroll["enrollment_code"], "--customer", "demo", "--json"],
             self.env, echo="layerlock machines add LLE1.… --customer demo")
        lic = json.loads(_run([_bin("layerlock"), "licenses", "issue", "--machine", machine, "--model", MODEL_ID,
                               "--days", "30", "--token-ttl", "30", "--offline-grace", "60", "--json"], self.env))
        license_id = lic["license_id"]
        print(f"  license {license_id}: tokens live 60 s offline, renewed every ~20 s (short, to watch revocation)")

        _say("7/8  customer host: start the verifier sidecar")
        sock = self.data / "verifier" / "verifier.sock"
        config = self.data / "verifier" / "verifier.toml"
        config.write_text(
            f'server_url = "{self.url}"\n'
            f'state_dir = "{state}"\n'
            f'socket = "{sock}"\n'
            f"allowed_uids = [{os.getuid()}]\n\n"
            f'[[models]]\nid = "{MODEL_ID}"\nlocked = "{locked}"\nbundle = "{bundle}"\n')
        _run([_bin("layerlock-verifier"), "check", "--config", str(config)], self.env)
        sidecar = self._spawn("verifier sidecar", [_bin("layerlock-verifier"), "run", "--config", str(config)],
                              logs / "verifier.log")
        _wait(lambda: sock.exists() and "unlocked" in _run(
            [_bin("layerlock-verifier"), "status", "--config", str(config), "--json"], self.env, echo="(status)"),
            "verifier sidecar", 60, sidecar)

        _say("8/8  inference process: load the model through the socket and score it")
        client = [sys.executable, "-m", "layerlock.demo.client", "--socket", str(sock), "--model", MODEL_ID,
                  "--locked", str(locked), "--original-accuracy", f"{original:.6f}"]
        print("  $ " + " ".join(client[1:]), flush=True)
        subprocess.run(client, env=self.env, stdin=subprocess.DEVNULL, check=False)

        print(f"""
\033[1mRunning.\033[0m  License server {self.url}, sidecar socket {sock}.
Open the ops console in a browser: {self.url}/console/
  sign in with the demo's admin key {self.env["LAYERLOCK_API_KEY"]}
  (machines, licenses — revoke {license_id} there —, the audit trail, API keys)
Or try, in another terminal (with this venv's bin/ on PATH):
  export LAYERLOCK_SERVER={self.url}
  export LAYERLOCK_API_KEY={self.env["LAYERLOCK_API_KEY"]}   # the demo's admin key, printed once
  {client[0]} {' '.join(client[1:])}
  layerlock licenses revoke {license_id} --reason "demo"    # within ~20 s the client is refused
  layerlock audit list                                       # every step above, hash-chained
  layerlock audit verify
  layerlock-verifier status --config {config}
Licensing beyond one machine (README, "Licensing models"):
  layerlock licenses issue --customer demo --seats 2 --floating --lease 2m --model {MODEL_ID} --days 30
  layerlock licenses seats lic_…                             # who holds a seat, until when
  layerlock-verifier request --state-dir {state} --model {MODEL_ID} --out req.llr   # air-gapped: a file ...
  layerlock activate-offline req.llr --out resp.llt          # ... answered by ops ...
  layerlock-verifier import --state-dir {state} resp.llt     # ... and imported on the site
  layerlock webhooks create http://127.0.0.1:9000/hook       # signed events (see `layerlock webhooks -h`)
Ctrl-C stops everything.""", flush=True)
        while all(p.poll() is None for _, p in self.procs):
            time.sleep(0.5)
        dead = [name for name, p in self.procs if p.poll() is not None]
        raise SystemExit(f"demo: {', '.join(dead)} stopped unexpectedly; see {logs}")


def main(data_dir: Path, port: int = 8700) -> int:
    demo = Demo(data_dir, _free_port(port))
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # "Ctrl-C stops everything" even when started from a script that put it in the background:
    # a shell without job control starts background commands with SIGINT ignored, which Python
    # then leaves ignored.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo.run()
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        demo.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    return 0
