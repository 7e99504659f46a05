"""The enrollment code a customer host prints and an operator pastes into ``machines add``.

One line, copy-pasteable: ``LLE1.<payload>.<signature>`` (both base64url).  The payload is
canonical JSON with the machine code, the machine's public keys and its device class; the
signature is by the machine's own Ed25519 key over a domain-separated copy of the payload.  The
self-signature proves the code was made by the holder of the signing key it names (no one can
register somebody else's public key under their machine code by accident), and the server
re-derives nothing from it but checks every field.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from layerlock.shared.errors import InvalidInput, SignatureError
from layerlock.shared.keys import b64u_decode, b64u_encode, ed25519_public, mlkem768_public, x25519_public
from layerlock.shared.machine import normalize_code

PREFIX = "LLE1"
_DOMAIN = b"layerlock-enroll-v1\0"
MAX_CODE_LEN = 8192


@dataclass(frozen=True)
class DeviceClass:
    """What the server's suite policy looks at: vendor → device type → OS version, plus AES."""

    vendor: str = "unknown"
    type: str = "unknown"
    os: str = "unknown"
    aes: bool = True

    @classmethod
    def detect(cls) -> DeviceClass:
        """Best effort from /sys, /etc/os-release and /proc/cpuinfo; unknowns stay 'unknown'."""
        def read(path: str) -> str:
            try:
                return Path(path).read_text(errors="replace").strip()
            except OSError:
                return ""
        os_name = "unknown"
        for line in read("/etc/os-release").splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
        cpuinfo = read("/proc/cpuinfo")
        aes = " aes " in f" {cpuinfo.replace(chr(10), ' ')} " or "Features" in cpuinfo and " aes" in cpuinfo
        return cls(vendor=read("/sys/class/dmi/id/sys_vendor") or "unknown",
                   type=platform.machine() or "unknown", os=os_name, aes=aes)


@dataclass(frozen=True)
class Enrollment:
    machine: str
    sig_pub: bytes  # Ed25519, 32 bytes: verifies activation requests
    kex_pub: bytes  # X25519, 32 bytes: receives the wrapped data key
    pq_pub: bytes | None = None  # ML-KEM-768 public key, for the hybrid suite
    device: DeviceClass = field(default_factory=DeviceClass)

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": 1, "machine": self.machine, "sig_pub": b64u_encode(self.sig_pub),
                               "kex_pub": b64u_encode(self.kex_pub), "device": asdict(self.device)}
        if self.pq_pub is not None:
            out["pq_pub"] = b64u_encode(self.pq_pub)
        return out


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def make_code(enrollment: Enrollment, signing_key: ed25519.Ed25519PrivateKey) -> str:
    body = _canonical(enrollment.payload())
    sig = signing_key.sign(_DOMAIN + body)
    return f"{PREFIX}.{b64u_encode(body)}.{b64u_encode(sig)}"


def _str(obj: dict[str, Any], key: str, limit: int = 128) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise InvalidInput(
            f"enrollment code: '{key}' must be a non-empty printable string of at most {limit} chars")
    return value


def parse_code(code: str) -> Enrollment:
    """Parse and verify an enrollment code; raise InvalidInput/SignatureError with the reason."""
    if not isinstance(code, str) or len(code) > MAX_CODE_LEN:
        raise InvalidInput("enrollment code must be a string of at most 8192 characters")
    parts = code.strip().split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise InvalidInput(f"enrollment code must look like {PREFIX}.<payload>.<signature>")
    body = b64u_decode(parts[1], field="enrollment payload")
    sig = b64u_decode(parts[2], field="enrollment signature")
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidInput("enrollment payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise InvalidInput("enrollment payload has an unknown version")
    machine = normalize_code(_str(payload, "machine"))
    sig_pub = b64u_decode(_str(payload, "sig_pub", 64), field="sig_pub")
    kex_pub = b64u_decode(_str(payload, "kex_pub", 64), field="kex_pub")
    signing_key = ed25519_public(sig_pub, field="sig_pub")
    x25519_public(kex_pub, field="kex_pub")
    pq_pub = None
    if "pq_pub" in payload:
        pq_pub = b64u_decode(_str(payload, "pq_pub", 2048), field="pq_pub")
        mlkem768_public(pq_pub, field="pq_pub")
    dev = payload.get("device")
    if not isinstance(dev, dict) or not isinstance(dev.get("aes"), bool):
        raise InvalidInput("enrollment code: 'device' must be an object with a boolean 'aes'")
    device = DeviceClass(vendor=_str(dev, "vendor"), type=_str(dev, "type"), os=_str(dev, "os"), aes=dev["aes"])
    try:
        signing_key.verify(sig, _DOMAIN + body)
    except InvalidSignature:
        raise SignatureError("enrollment code self-signature does not verify (altered or truncated?)") from None
    return Enrollment(machine=machine, sig_pub=sig_pub, kex_pub=kex_pub, pq_pub=pq_pub, device=device)
