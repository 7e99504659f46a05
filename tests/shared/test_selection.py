"""Layer grouping and the lock policy."""

from __future__ import annotations

import pytest

from layerlock.shared.errors import InvalidInput
from layerlock.shared.formats import TensorInfo
from layerlock.shared.selection import LockPolicy, group_layers, input_tensors, layer_of, select


@pytest.mark.parametrize("name,layer", [
    ("fc1.weight", "fc1"), ("fc1.bias", "fc1"), ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
    ("features.0.weight", "features.0"), ("embeddings.word_embeddings.weight", "embeddings.word_embeddings"),
    ("scale", "scale"), ("model.layers.10.mlp.experts.5.w1", "model.layers.10"), ("0.weight", "0"),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_group_layers_natural_order():
    names = ["encoder.layer.10.w", "encoder.layer.2.w", "encoder.layer.2.b", "fc1.weight", "fc1.bias", "emb.weight"]
    assert group_layers(names) == [("emb", ["emb.weight"]),
                                   ("encoder.layer.2", ["encoder.layer.2.w", "encoder.layer.2.b"]),
                                   ("encoder.layer.10", ["encoder.layer.10.w"]), ("fc1", ["fc1.weight", "fc1.bias"])]


def _transformer(n=12):
    t = {"embed.weight": (1000, 64)}
    for i in range(n):
        t |= {f"layer.{i}.attn.weight": (64, 64), f"layer.{i}.attn.bias": (64,), f"layer.{i}.norm.weight": (64,)}
    return t | {"head.weight": (10, 64), "head.bias": (10,)}


def test_start_and_count():
    t = _transformer()
    # Natural order: embed, head, layer.0, layer.1, ... (safetensors keeps no module order).
    assert [k for k, _ in group_layers(list(t))][:3] == ["embed", "head", "layer.0"]
    assert select(t, LockPolicy(start=2, count=2)) == [f"layer.{i}.{p}" for i in (0, 1) for p in
                                                       ("attn.weight", "attn.bias", "norm.weight")]
    assert select(t, LockPolicy(start=0)) == ["embed.weight"]
    with pytest.raises(InvalidInput, match="out of range"):
        select(t, LockPolicy(start=99, count=1))
    assert select(t, LockPolicy(start=13, count=50)) == ["layer.11.attn.weight", "layer.11.attn.bias",
                                                         "layer.11.norm.weight"]


def test_patterns_and_union():
    t = _transformer()
    assert select(t, LockPolicy(patterns=("*.attn.weight",))) == [f"layer.{i}.attn.weight" for i in range(12)]
    assert select(t, LockPolicy(start=0, count=1, patterns=("head.*",))) == ["embed.weight", "head.weight", "head.bias"]
    with pytest.raises(InvalidInput, match="matches no tensor"):
        select(t, LockPolicy(patterns=("nothing*",)))


def test_parse_layers():
    assert LockPolicy.parse_layers("3:2") == LockPolicy(start=3, count=2)
    assert LockPolicy.parse_layers("4", ["x*"]) == LockPolicy(start=4, count=1, patterns=("x*",))
    for bad in ("", "a:b", "-1:2", "1:0", "1:2:3", "1.5"):
        with pytest.raises(InvalidInput):
            LockPolicy.parse_layers(bad)


def test_default_policy_looks_at_the_input_interface():
    """Name level: the tensors the value-aware default (shared/plan.py, tests/shared/test_plan.py) slices."""
    t = _transformer()
    assert select(t, LockPolicy()) == ["embed.weight"]  # an embedding table: where input enters
    assert input_tensors({"b.weight": (4, 4), "a.weight": (4, 4)}) == ["a.weight"]  # no order known: by name
    assert input_tensors({"b.weight": (4, 4), "a.weight": (4, 4)}, order=["b.weight", "a.weight"]) == ["b.weight"]


def test_group_layers_in_execution_order():
    names = ["head.weight", "stem.weight", "layer.1.w", "layer.0.w"]
    order = ["stem.weight", "layer.0.w", "layer.1.w", "head.weight"]
    assert [k for k, _ in group_layers(names, order)] == ["stem", "layer.0", "layer.1", "head"]


def test_default_policy_uses_tensor_info_and_skips_int_buffers():
    infos = {"pos.ids": TensorInfo("pos.ids", "I64", (1, 512), 0, 4096),
             "fc.weight": TensorInfo("fc.weight", "F32", (8, 8), 4096, 256),
             "norm.weight": TensorInfo("norm.weight", "F32", (8,), 4352, 32)}
    assert select(infos, LockPolicy()) == ["fc.weight"]
    assert select({"x": (3,)}, LockPolicy()) == ["x"]  # no matrix at all: lock what there is


def test_parse_layers_huge_numbers_are_invalid_input():
    for bad in ("9" * 5000, "1:" + "9" * 5000, "١:٢"):
        with pytest.raises(InvalidInput):
            LockPolicy.parse_layers(bad)
