"""The offline chitchat corpus (PyPI ``chitchat-dataset``), split per sender by time.

Host-side data for the demo, the benchmarks and the exporter's general-text sample; the device
never reads it (a bundle carries the general text its Personalizer checks against).
"""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import InputTextError, MissingDependencyError


@dataclass(frozen=True)
class Message:
    text: str
    timestamp: str
    sender: str


@lru_cache(maxsize=1)
def chitchat_messages() -> dict[str, list[Message]]:
    """All chitchat messages grouped by sender, each list in time order.

    Raises :class:`MissingDependencyError` if ``chitchat-dataset`` isn't installed.
    """
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "chitchat-dataset is not installed; install it with: pip install 'pocketpeft[data]'"
        )
    path = Path(spec.submodule_search_locations[0]) / "dataset.json"
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    by_sender: dict[str, list[Message]] = defaultdict(list)
    for conv in data.values():
        for turn in conv["messages"]:
            for m in turn:
                if m.get("text", "").strip():
                    by_sender[m["sender"]].append(Message(m["text"], m["timestamp"], m["sender"]))
    for msgs in by_sender.values():
        msgs.sort(key=lambda m: m.timestamp)
    return dict(by_sender)


def top_senders(min_words: int = 5000) -> list[str]:
    """Senders with at least ``min_words`` words, most prolific first (ties by id)."""
    counts = {s: sum(len(m.text.split()) for m in msgs) for s, msgs in chitchat_messages().items()}
    return sorted((s for s, c in counts.items() if c >= min_words), key=lambda s: (-counts[s], s))


def sender_split(sender: str, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train, test) texts of one sender: earlier messages train, the latest ``test_fraction`` test."""
    msgs = chitchat_messages().get(sender)
    if not msgs:
        raise InputTextError(f"unknown chitchat sender {sender!r}")
    cut = int(round(len(msgs) * (1 - test_fraction)))
    return [m.text for m in msgs[:cut]], [m.text for m in msgs[cut:]]


def general_texts(exclude: Iterable[str] = (), n: int = 2000, seed: int = 0) -> list[str]:
    """A fixed sample of other people's messages (for general-text checks), excluding ``exclude`` senders."""
    ex = set(exclude)
    pool = [m.text for s, msgs in sorted(chitchat_messages().items()) if s not in ex for m in msgs]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in sorted(idx)]


def held_out_senders(n: int = 10) -> list[str]:
    """The senders benchmarks and the demo test on (the ``n`` most prolific, the demo's default
    sender among them): global adapters learned from public text or a simulated fleet never see
    their messages."""
    return top_senders()[:n]
