"""The machine code: a stable, human-friendly name for one customer host.

Why not the raw ``/etc/machine-id``?  systemd documents it as confidential to the host, and
handing it to a vendor would let them correlate the host across other software.  We instead
publish an app-specific HMAC-SHA256 of the host's identifiers, keyed with a constant that is
unique to layerlock, so the code is stable across reboots but says nothing reusable.

Sources, in order (each one that is readable is mixed in, labelled, so a missing source
changes the code rather than silently colliding):

1. ``/etc/machine-id`` (required; systemd's per-installation id),
2. ``/sys/class/dmi/id/product_uuid`` (the board's UUID, root-only on most systems),
3. the MAC address of the first physical network interface, by name.

The rendering is Crockford base32 (no I, L, O, U: nothing to misread) with Crockford's mod-37
check symbol, so a typo made while copying a code between tickets and terminals is caught
before it reaches the server: ``LLK-7Q2MA-BCDEF-GHJKM-NPQRS-Z``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

from layerlock.shared.errors import MachineCodeError

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CHECK_ALPHABET = _ALPHABET + "*~$=U"
_HMAC_KEY = b"layerlock/machine-code/v1"
_DATA_CHARS = 20  # 100 bits: collisions are out of reach for any fleet
PREFIX = "LLK"


@dataclass(frozen=True)
class MachineSources:
    """The raw identifiers a machine code is derived from (never sent anywhere)."""

    # Confidential to the host (systemd says so of machine-id): kept out of reprs and logs.
    machine_id: str = field(repr=False)
    dmi_uuid: str | None = field(default=None, repr=False)
    mac: str | None = field(default=None, repr=False)


def _read(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return value or None


def _primary_mac(net_dir: Path) -> str | None:
    try:
        names = sorted(os.listdir(net_dir))
    except OSError:
        return None
    for name in names:
        iface = net_dir / name
        # Virtual interfaces (lo, docker0, veth*, bridges) come and go; only physical ones count.
        if (iface / "device").exists():
            mac = _read(iface / "address")
            if mac and mac != "00:00:00:00:00:00":
                return mac.lower()
    return None


def collect_sources(
    machine_id_path: str | os.PathLike[str] = "/etc/machine-id",
    dmi_path: str | os.PathLike[str] = "/sys/class/dmi/id/product_uuid",
    net_dir: str | os.PathLike[str] = "/sys/class/net",
) -> MachineSources:
    """Read this host's identifiers; paths are parameters so tests can fake a second host."""
    machine_id = _read(Path(machine_id_path))
    if not machine_id:
        raise MachineCodeError(f"cannot read a machine id from {machine_id_path}")
    dmi = _read(Path(dmi_path))
    return MachineSources(machine_id=machine_id, dmi_uuid=dmi.lower() if dmi else None,
                          mac=_primary_mac(Path(net_dir)))


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _check_symbol(data: str) -> str:
    value = 0
    for ch in data:
        value = value * 32 + _ALPHABET.index(ch)
    return _CHECK_ALPHABET[value % 37]


def derive_code(sources: MachineSources) -> str:
    """The canonical machine code of these sources."""
    parts = [f"machine-id={sources.machine_id}"]
    if sources.dmi_uuid:
        parts.append(f"dmi={sources.dmi_uuid}")
    if sources.mac:
        parts.append(f"mac={sources.mac}")
    digest = hmac.new(_HMAC_KEY, "\n".join(parts).encode(), hashlib.sha256).digest()
    data = _encode(int.from_bytes(digest[:13], "big") >> 4, _DATA_CHARS)
    return format_code(data + _check_symbol(data))


def machine_code(**paths: str | os.PathLike[str]) -> str:
    """This host's machine code."""
    return derive_code(collect_sources(**paths))


def format_code(raw: str) -> str:
    groups = [raw[i:i + 5] for i in range(0, _DATA_CHARS, 5)]
    return "-".join([PREFIX, *groups, raw[_DATA_CHARS:]])


def normalize_code(text: str) -> str:
    """Parse a machine code as a person may have typed it; raise on a typo.

    Case, hyphens and spaces do not matter; ``I``/``L`` read as 1 and ``O`` as 0 (Crockford).
    """
    if not isinstance(text, str):
        raise MachineCodeError("machine code must be a string")
    raw = text.strip().upper().replace("-", "").replace(" ", "")
    if not raw.startswith(PREFIX):
        raise MachineCodeError(f"machine code must start with {PREFIX}-")
    raw = raw[len(PREFIX):]
    if len(raw) != _DATA_CHARS + 1:
        raise MachineCodeError(
            f"machine code must have {_DATA_CHARS} characters and a check character, got {len(raw)}")
    data = raw[:_DATA_CHARS].translate(str.maketrans("ILO", "110"))
    check = raw[_DATA_CHARS:]
    if any(ch not in _ALPHABET for ch in data):
        raise MachineCodeError("machine code contains a character outside Crockford base32")
    if not hmac.compare_digest(_check_symbol(data), check):
        raise MachineCodeError("machine code check character does not match (a typo?)")
    return format_code(data + check)
