"""sd_notify over real datagram sockets, the daemon's READY/WATCHDOG/STATUS as a real process,
and the unit file (systemd-analyze verify when available, directive checks always)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from verifier_helpers import write_config

from layerlock.verifier import systemd

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "layerlock-verifier.service"


def _listener(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(5)
    return s


def test_notify_path_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sock = _listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert systemd.notify("READY=1", "STATUS=ok")
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    sock.close()


def test_notify_abstract_socket(monkeypatch):
    name = f"layerlock-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = _listener("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    assert systemd.notify("WATCHDOG=1")
    assert sock.recv(4096) == b"WATCHDOG=1"
    sock.close()


def test_notify_without_systemd_is_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None


def test_daemon_process_notifies_ready_watchdog_and_status(tmp_path, machine, protected):
    """A real sidecar process with the license server unreachable: READY=1 once the model's
    first attempt is settled, WATCHDOG=1 pings, `status` over the socket, clean SIGTERM."""
    sock_path = Path(f"/tmp/llk-{os.getpid()}-{time.monotonic_ns()}.sock")
    cfg = write_config(tmp_path / "v.toml", machine, [protected], socket=sock_path)
    notify_path = tmp_path / "notify"
    listener = _listener(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "300000",
           "PYTHONPATH": str(ROOT)}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "verifier", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ("READY=1" in seen and "WATCHDOG=1" in seen):
            seen.extend(listener.recv(4096).decode().split("\n"))
        assert "READY=1" in seen and "WATCHDOG=1" in seen, seen
        assert any(s.startswith("STATUS=0/1 models unlocked") for s in seen), seen
        out = subprocess.run([sys.executable, "-m", "verifier", "status", "--config", str(cfg), "--json"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["running"] and doc["machine"] == machine.code
        assert doc["models"][0]["state"] == "locked" and doc["models"][0]["reason"] == "server_unreachable"
        human = subprocess.run([sys.executable, "-m", "verifier", "status", "--config", str(cfg)],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert "model-a: locked (server_unreachable" in human.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=20)
        listener.close()
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in stdout.splitlines() if line.startswith("{")]
    assert "ready" in events and "stopping" in events
    assert not sock_path.exists()
    # not running any more: status says so, exit 1
    gone = subprocess.run([sys.executable, "-m", "verifier", "status", "--config", str(cfg)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "not running" in gone.stderr


def _unit() -> dict[str, list[str]]:
    """The unit's directives (repeatable ones keep every value)."""
    parser = configparser.RawConfigParser(strict=False, dict_type=_MultiDict)
    parser.optionxform = str  # type: ignore[assignment]
    parser.read(UNIT)
    return {k: v for section in parser.sections() for k, v in parser.items(section)}


class _MultiDict(dict):
    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_unit_file_directives():
    d = {k: (v if isinstance(v, list) else [v]) for k, v in _unit().items()}
    expect = {"Type": "notify", "RuntimeDirectory": "layerlock", "StateDirectory": "layerlock",
              "StateDirectoryMode": "0700", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
              "ProtectHome": "yes", "PrivateTmp": "yes", "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
              "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "SystemCallFilter": "@system-service"}
    for key, value in expect.items():
        assert value in [v.strip() for v in d.get(key, [])], f"{key}={value} missing"
    assert "WatchdogSec" in d
    assert "layerlock-verifier run" in d["ExecStart"][0]


def test_unit_file_verifies():
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd (make test does)"
    out = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "layerlock-verifier.service" not in out.stderr, out.stderr  # no warnings about our unit


def test_unit_documents_socket_group_drop_in(tmp_path):
    """The drop-in the unit's comments show for `socket_group` (SupplementaryGroups=, plus Group= and
    RuntimeDirectoryMode=0750 to hide the directory) verifies cleanly on top of the unit."""
    text = UNIT.read_text()
    for needle in ("socket_group", "allowed_gids", "SupplementaryGroups=inference", "RuntimeDirectoryMode=0750",
                   "Group=inference"):
        assert needle in text, needle
    shown = [line[4:] for line in text.splitlines() if re.match(r"#   \S", line)]  # the indented example
    assert shown == ["[Service]", "SupplementaryGroups=inference"], shown
    units = tmp_path / "units"
    (units / f"{UNIT.name}.d").mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    (units / f"{UNIT.name}.d" / "group.conf").write_text(
        "\n".join(shown + ["Group=inference", "RuntimeDirectoryMode=0750"]) + "\n")
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: apt-get install systemd (make test does)"
    out = subprocess.run(["systemd-analyze", "verify", str(units / UNIT.name)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert out.returncode == 0, out.stderr
    assert UNIT.name not in out.stderr, out.stderr
