"""Start-up cost: `layerlock-verifier run` imports only what activation and restore need.

Every import is paid on the way to READY=1.  numpy (the protect side of the lock format),
torch, onnx, onnxruntime and safetensors are client-side or vendor-side only.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from verifier_helpers import write_config

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnx", "onnxruntime", "safetensors", "numpy")

PROBE = """
import json, sys
import layerlock.verifier.cli
from layerlock.verifier.activation import ServerClient
from layerlock.verifier.config import load_config
from layerlock.verifier.daemon import Daemon
from layerlock.verifier.server import SocketServer
from layerlock.verifier.state import StateDir
config = load_config(sys.argv[1])
Daemon(config, StateDir(config.state_dir), ServerClient(config.server_url))
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_run_path_imports_nothing_heavy(tmp_path, machine, protected):
    config = write_config(tmp_path / "v.toml", machine, [protected])
    out = subprocess.run([sys.executable, "-c", PROBE, str(config)], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    loaded = set(json.loads(out.stdout))
    heavy = set(HEAVY)
    if any(importlib.util.find_spec(f"layerlock.shared.{m}") is None for m in ("restore", "bundle")):
        heavy.discard("numpy")  # older lock-format layout: only the facade (which imports numpy) exists
    assert not loaded & heavy, f"verifier run imports {sorted(loaded & heavy)} on its way to READY"
