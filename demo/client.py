"""The demo's inference process: loads the model through the sidecar's socket and scores it.

Run as a separate process (as a real inference server would be), it prints one line that the
demo and its smoke test read::

    accuracy: unlocked=0.9889 original=0.9889 locked_file=0.0822 (chance is 0.10)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.numpy import load_file

from layerlock.demo.model import accuracy, load_data
from layerlock.shared.errors import LayerlockError
from layerlock.verifier.client import load_numpy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="the sidecar's Unix socket")
    parser.add_argument("--model", required=True, help="model id to ask the sidecar for")
    parser.add_argument("--locked", type=Path, required=True, help="the locked .safetensors file")
    parser.add_argument("--original-accuracy", type=float, required=True)
    args = parser.parse_args(argv)

    _, _, x_test, y_test = load_data()
    locked_acc = accuracy(load_file(str(args.locked)), x_test, y_test)
    try:
        weights = load_numpy(args.model, socket_path=args.socket)
    except LayerlockError as exc:
        print(f"refused: {exc.code}: {exc.message} (locked_file={locked_acc:.4f})", flush=True)
        return 3
    unlocked_acc = accuracy(weights, x_test, y_test)
    print(f"accuracy: unlocked={unlocked_acc:.4f} original={args.original_accuracy:.4f} "
          f"locked_file={locked_acc:.4f} (chance is 0.10)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
