"""A network's heads, in order, and the one rule that names what each head owns outside the network.

An FCN has one or more heads (SIFT Flow's: ``semantic`` and ``geometric``); the network returns their
scores as a dict by head name. The first head is the primary one: its outputs keep the bare names
(the ``mask_uri`` column, the ``masks`` folder, the top level of metrics.json, the builder's
``num_classes``), and each further head's carry its name (``geometric_mask_uri``, ``masks_geometric``,
``heads["geometric"]``, ``geometric_classes``). Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PRIMARY_HEAD = "semantic"
"""The first head of every network the builders make; the only head of a single-head network."""


def split_heads(heads: Iterable[str]) -> tuple[str, list[str]]:
    """``heads`` (in order) as the primary head, whose outputs keep the bare names, and the further heads,
    whose outputs carry their name."""
    primary, *further = heads
    return primary, further


def head_key(head: str, heads: Iterable[str], name: str, *, suffix: bool = False) -> str:
    """What ``head`` (one of ``heads``) calls ``name``: the primary head ``name`` itself, a further head
    ``<head>_<name>`` (with ``suffix``: ``<name>_<head>``). ValueError naming ``head`` if it is not one of ``heads``."""
    primary, further = split_heads(heads)
    if head == primary:
        return name
    if head not in further:
        raise ValueError(f"unknown head {head!r}; the heads are {[primary, *further]}")
    return f"{name}_{head}" if suffix else f"{head}_{name}"


def nest_heads(by_head: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One document of every head's entries: the primary head's at the top level, each further head's under
    ``heads[<head>]`` (metrics.json's shape)."""
    primary, further = split_heads(by_head)
    return {**by_head[primary], "heads": {head: dict(by_head[head]) for head in further}}


def classes_argument(head: str, heads: Iterable[str]) -> str:
    """The builder argument that sets ``head``'s number of classes: ``num_classes`` for the primary head,
    ``<head>_classes`` for a further one (``geometric_classes``)."""
    primary, _ = split_heads(heads)
    return "num_classes" if head == primary else head_key(head, heads, "classes")
