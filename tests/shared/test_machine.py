"""Machine code: stable, derived (not the raw machine-id), typo-detecting."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerlock.shared.errors import MachineCodeError
from layerlock.shared.machine import MachineSources, collect_sources, derive_code, machine_code, normalize_code


def _fake_host(tmp_path, machine_id="0123456789abcdef0123456789abcdef", mac="52:54:00:12:34:56"):
    (tmp_path / "machine-id").write_text(machine_id + "\n")
    net = tmp_path / "net"
    (net / "eth0" / "device").mkdir(parents=True)
    (net / "eth0" / "address").write_text(mac + "\n")
    (net / "lo").mkdir()
    (net / "lo" / "address").write_text("00:00:00:00:00:00\n")
    return dict(machine_id_path=tmp_path / "machine-id", dmi_path=tmp_path / "missing", net_dir=net)


def test_stable_and_sources_matter(tmp_path):
    paths = _fake_host(tmp_path)
    code = machine_code(**paths)
    assert code == machine_code(**paths)
    assert code.startswith("LLK-") and len(code) == len("LLK-XXXXX-XXXXX-XXXXX-XXXXX-C")
    assert "0123456789abcdef" not in code.lower()
    assert normalize_code(code) == code
    src = collect_sources(**paths)
    assert src.mac == "52:54:00:12:34:56" and src.dmi_uuid is None
    assert derive_code(MachineSources(src.machine_id, None, "52:54:00:12:34:57")) != code
    assert derive_code(MachineSources(src.machine_id, "uuid", src.mac)) != code


def test_missing_machine_id(tmp_path):
    with pytest.raises(MachineCodeError, match="machine id"):
        machine_code(machine_id_path=tmp_path / "nope")


def test_normalize_is_forgiving_about_case_and_lookalikes():
    code = derive_code(MachineSources("abc"))
    assert normalize_code(code.lower()) == code
    assert normalize_code(code.replace("-", " ")) == code
    data = code.replace("-", "")[3:-1]
    if "1" in data:
        assert normalize_code(code.replace("1", "I", 1)) == code
    if "0" in data:
        assert normalize_code(code.replace("0", "O", 1)) == code


@settings(deadline=None)  # a loaded CI box: the property matters, not each example's speed
@given(st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ", min_size=1, max_size=1), st.integers(0, 19),
       st.binary(min_size=1, max_size=16))
def test_single_substitution_is_caught(replacement, pos, seed):
    code = derive_code(MachineSources(seed.hex()))
    raw = list(code.replace("-", "")[3:])
    if raw[pos] == replacement:
        return
    raw[pos] = replacement
    with pytest.raises(MachineCodeError, match="check character"):
        normalize_code("LLK" + "".join(raw))


def test_adjacent_transposition_is_caught():
    code = derive_code(MachineSources("transpose"))
    raw = code.replace("-", "")[3:]
    for i in range(19):
        if raw[i] == raw[i + 1]:
            continue
        swapped = raw[:i] + raw[i + 1] + raw[i] + raw[i + 2:]
        with pytest.raises(MachineCodeError):
            normalize_code("LLK" + swapped)


@pytest.mark.parametrize("bad,match", [("", "start with"), ("LLK-123", "20 characters"), (42, "string"),
                                       ("XYZ-S0QXV-GBENN-A5THD-M288J-U", "start with"),
                                       ("LLK-S0QXV-GBENN-A5THD-M288U-U", "Crockford|check")])
def test_malformed(bad, match):
    with pytest.raises(MachineCodeError, match=match):
        normalize_code(bad)


def test_sources_repr_hides_identifiers():
    assert "secret-machine-id" not in repr(MachineSources("secret-machine-id", "dmi-uuid", "aa:bb"))
