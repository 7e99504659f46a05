"""Every command in the README's ```sh blocks runs, as written, against a real license server.

So the README cannot drift from the CLI again.  The blocks are parsed (not copied here): whatever
they say is what runs, in README order, in one shared working directory, against the
``license_server`` fixture (real gunicorn + real redis-server, see tests/conftest.py) with
``LAYERLOCK_SERVER`` and ``LAYERLOCK_API_KEY`` set.  Each command must exit 0.  Each block is one
recipe on its own customer host (the README shows alternative enrollment flows one after the
other): a new machine id and verifier state dir per block; the server and its models are shared.

What is changed before a command runs, and only this:

* ``sudo`` is dropped: the command runs as the test's user, in temporary directories.
* ``https://license.example.com`` becomes the fixture's URL; ``server/…`` (the server's data dir
  in ``layerlock init --data-dir server``) becomes the fixture's data dir; absolute system paths
  (``/var/lib/…``, ``/etc/…``, ``/opt/…``, ``/run/…``) are re-rooted under a temporary directory.
* A placeholder ending in ``…`` (``LLK-…``, ``LLE1.…``, ``llc_…``, or any other ``PREFIX…``)
  becomes the most recent token starting with ``PREFIX`` that an earlier command of the same
  block printed (the machine and enrollment codes ``layerlock-verifier enroll`` prints, the claim
  secret ``machines add --claim`` prints, …); failing that, this block's host's machine code (what
  the host's admin reads off and hands to ops); failing that, what an earlier block printed.
* ``layerlock-verifier enroll`` gets ``--state-dir`` and ``--machine-id-file`` (the block's host)
  unless the README gives them: the defaults are ``/var/lib/layerlock`` and ``/etc/machine-id``,
  which need root and would make every block the same machine.
* ``model.safetensors`` is made here (a small real MLP saved with safetensors.numpy), in the
  working directory, for ``layerlock protect``.

Commands that are NOT run are named in ``NOT_RUN`` below, each with the reason; a command that
is neither ``layerlock``/``layerlock-verifier`` nor listed there fails the test, so nothing is
skipped silently.  Each ``[[models]] id`` in the README's ```toml blocks must be a model the
commands registered.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy as stnp

from layerlock.shared.machine import machine_code
from tests.conftest import _env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = {"layerlock", "layerlock-verifier"}

# argv prefixes (after `sudo` is dropped) that are not run, and why.
NOT_RUN: dict[tuple[str, ...], str] = {
    ("make", "run"): "runs the whole demo until Ctrl-C; tests/test_make_run.py runs it",
    ("make", "test"): "is the whole test suite, which includes this test",
    ("systemctl",): "needs root and systemd; the units are checked by tests/license_server/test_deploy.py "
                    "and tests/verifier/test_verifier_systemd.py",
}
SERVER_URL = "https://license.example.com"
SYSTEM_DIRS = ("/var/lib/", "/etc/", "/opt/", "/run/")


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """Each command line of a sh block as argv: continuations joined, comments dropped."""
    out = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def _model(path: Path) -> None:
    rng = np.random.default_rng(0)
    stnp.save_file({"fc1.weight": rng.normal(0, 0.3, (32, 16)).astype(np.float32),
                    "fc1.bias": rng.normal(0, 0.1, 32).astype(np.float32),
                    "fc2.weight": rng.normal(0, 0.3, (24, 32)).astype(np.float32),
                    "fc2.bias": rng.normal(0, 0.1, 24).astype(np.float32),
                    "fc3.weight": rng.normal(0, 0.3, (10, 24)).astype(np.float32),
                    "fc3.bias": rng.normal(0, 0.1, 10).astype(np.float32)}, path)


class Runner:
    def __init__(self, server, tmp: Path) -> None:
        self.server = server
        self.tmp = tmp
        self.work = tmp / "work"
        self.work.mkdir()
        self.printed: list[str] = []  # stdout + stderr of every command so far
        self.block_start = 0
        self.host = tmp
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.env = _env(LAYERLOCK_SERVER=server.url, LAYERLOCK_API_KEY=server.admin_key,
                        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "/usr/bin:/bin")]))

    def new_host(self, n: int) -> None:
        """A fresh customer host for the next block: its own machine id and verifier state dir."""
        self.host = self.tmp / f"host-{n}"
        self.host.mkdir()
        (self.host / "machine-id").write_text(os.urandom(16).hex() + "\n")
        self.block_start = len(self.printed)

    def placeholder(self, token: str) -> str:
        prefix = token.split("…", 1)[0]
        host_facts = f"machine code: {machine_code(machine_id_path=self.host / 'machine-id')}"
        sources = [*reversed(self.printed[self.block_start:]), host_facts, *reversed(self.printed[:self.block_start])]
        for text in sources:
            # (a machine code's check character may be one of * ~ $ = too)
            found = re.findall(re.escape(prefix) + r"[A-Za-z0-9._~*$=-]+", text)
            if found:
                return found[-1]
        raise AssertionError(f"README placeholder {token!r}: no earlier command printed a {prefix!r}… value")

    def substitute(self, token: str) -> str:
        if "…" in token:
            return self.placeholder(token)
        token = token.replace(SERVER_URL, self.server.url)
        if token.startswith("server/"):
            return str(self.server.data_dir / token[len("server/"):])
        if token.startswith(SYSTEM_DIRS):
            target = self.tmp / "root" / token.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            return str(target)
        return token

    def run(self, argv: list[str]) -> None:
        shown = shlex.join(argv)
        if argv[0] == "sudo":
            argv = argv[1:]
        for prefix, _reason in NOT_RUN.items():
            if tuple(argv[:len(prefix)]) == prefix:
                self.skipped.append(shown)
                return
        assert argv[0] in RUN, (f"README runs {shown!r}: the test only runs {sorted(RUN)}; if it cannot run "
                                "here, name it in NOT_RUN with the reason")
        args = [self.substitute(a) for a in argv]
        if args[:2] == ["layerlock-verifier", "enroll"]:
            if "--state-dir" not in args:
                args += ["--state-dir", str(self.host / "state")]
            if "--machine-id-file" not in args:
                args += ["--machine-id-file", str(self.host / "machine-id")]
        # `--claim -` reads the claim the way the host's admin gives it: pasted (here piped) in
        pasted = self.placeholder("llc_…") + "\n" if _claim_from_stdin(args) else None
        stdin: dict[str, Any] = {"input": pasted} if pasted else {"stdin": subprocess.DEVNULL}
        done = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=120, **stdin)
        assert done.returncode == 0, (f"README command {shown!r} (run as {shlex.join(args)}) exited "
                                      f"{done.returncode}:\n{done.stdout}\n{done.stderr}")
        self.printed.append(done.stdout + "\n" + done.stderr)
        self.ran.append(shown)


def _claim_from_stdin(args: list[str]) -> bool:
    return any(a == "--claim" and b == "-" for a, b in zip(args, args[1:], strict=False))


def test_readme_sh_blocks_parse_into_commands():
    blocks = readme_blocks("sh")
    assert len(blocks) >= 3
    programs = {argv[1] if argv[0] == "sudo" else argv[0] for b in blocks for argv in commands(b)}
    assert {"layerlock", "make"} <= programs


def test_every_readme_command_runs_against_a_real_server(license_server, tmp_path):
    runner = Runner(license_server, tmp_path)
    _model(runner.work / "model.safetensors")
    for n, block in enumerate(readme_blocks("sh")):
        runner.new_host(n)
        for argv in commands(block):
            runner.run(argv)
    print("\nran:\n  " + "\n  ".join(runner.ran) + "\nnot run (NOT_RUN):\n  " + "\n  ".join(runner.skipped))
    assert any(c.startswith("layerlock protect") for c in runner.ran), runner.ran
    assert len(runner.ran) >= 4, runner.ran
    registered = {m["model_id"] for m in license_server.api("GET", "/v1/models").json()["items"]}
    for block in readme_blocks("toml"):
        for model in tomllib.loads(block).get("models", []):
            assert model["id"] in registered, (f"the README's verifier config names model {model['id']!r}; "
                                               f"its commands registered {sorted(registered)}")
