"""``layerlock inspect``: a model's layers, in the order ``--layers`` counts them, and what a policy locks.

Layers (tensor groups by module prefix, :func:`layerlock.shared.selection.layer_of`) are listed in
execution order where the format knows it -- ONNX graph order, a PyTorch state dict's own
order, an ncnn ``.param``'s layer order -- and otherwise (safetensors) in natural name order,
with index, tensor count, parameter count, dtypes and what the default policy (or ``--base``)
would lock there.  Nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerlock.shared import formats
from layerlock.shared.bundle import representable
from layerlock.shared.plan import describe, execution_order, load_base, make_plan, mapped
from layerlock.shared.selection import LockPolicy, group_layers, is_buffer

_ORDER = {"onnx": "ONNX graph order", "pytorch": "state dict order", "ncnn": ".param layer order",
          "safetensors": "name order (safetensors keeps no execution order)"}


def inventory(path: Path, workdir: Path, *, weights: Path | None = None, base: Path | None = None,
              include_int: bool = False) -> dict[str, Any]:
    """The model's layers and the plan of the default policy (or of ``--base``), as a dict."""
    path = Path(path)
    source_format = formats.detect_format(path)
    plain = formats.open_plain(path, workdir, weights)
    try:
        size = plain.path.stat().st_size
        infos = {t.name: t for t in plain.tensors if representable(t, size)}
        order = execution_order(plain)
        policy = (LockPolicy(base=str(base), include_int=include_int) if base is not None
                  else LockPolicy(include_int=include_int))
        base_tensors = load_base(base, workdir) if base is not None else None
        with mapped(plain) as view:
            plan = make_plan(plain, view, policy, infos, base_tensors)
    finally:
        if plain.temporary:
            plain.path.unlink(missing_ok=True)
    locks = {lk.name: lk for lk in plan.locks}
    by_name = {t.name: t for t in plain.tensors}
    layers = []
    for index, (key, members) in enumerate(group_layers(list(by_name), order)):
        tensors = [by_name[m] for m in members]
        locked = [locks[m] for m in members if m in locks]
        layers.append({
            "index": index, "layer": key, "tensors": len(tensors), "params": sum(t.numel for t in tensors),
            "dtypes": sorted({t.dtype for t in tensors}),
            "buffers": [t.name for t in tensors if is_buffer(t)],
            "locked_params": sum(lk.elements for lk in locked),
            "lock": [f"{lk.name.removeprefix(key + '.') if lk.name != key else lk.name}: {lk.part}" for lk in locked],
        })
    order_kind = source_format if source_format != "onnx" or order else "safetensors"
    return {
        "model": str(path), "format": plain.format, "order": _ORDER.get(order_kind, "name order"),
        "total_params": plan.total_params, "layers": layers,
        "policy": plan.policy, "locked_params": plan.locked_params, "fraction": round(plan.fraction, 6),
        "locks": describe(plan), "warnings": plan.warnings,
    }


def render(doc: dict[str, Any]) -> list[str]:
    """The inventory as text lines (a table, then the policy's summary)."""
    lines = [f"{doc['model']}: {doc['format']}, {doc['total_params']:,} parameters, "
             f"{len(doc['layers'])} layers in {doc['order']}"]
    head = ("#", "layer", "tensors", "params", "dtype", f"{doc['policy']} policy locks")
    rows = [(str(layer["index"]), layer["layer"], str(layer["tensors"]), f"{layer['params']:,}",
             ",".join(layer["dtypes"]) + (" (buffer)" if layer["buffers"] and len(layer["buffers"]) == layer["tensors"]
                                          else ""),
             "; ".join(layer["lock"]) or "-") for layer in doc["layers"]]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    for r in [head, *rows]:
        lines.append("  ".join(c.rjust(w) if i in (0, 2, 3) else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r[:5], widths, strict=True))) + "  " + r[5])
    lines.append(f"{doc['policy']} policy: {doc['locked_params']:,} of {doc['total_params']:,} parameters "
                 f"({100 * doc['fraction']:.1f}%) in {len(doc['locks'])} tensors")
    lines += [f"warning: {w}" for w in doc["warnings"]]
    return lines
