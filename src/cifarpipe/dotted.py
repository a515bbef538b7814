"""Dotted keys ("train.optimizer.lr"): how params.yaml's nested sections, recipes, `dvc exp run -S`
overrides and MLflow's flat params name the same value. Plain dictionaries, no schema."""
from __future__ import annotations

from typing import Any


def flatten_mapping(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"optimizer": {"lr": 0.001}}} -> {"train.optimizer.lr": 0.001}: the dotted keys
    of `dvc exp run -S` and of MLflow's params. An empty mapping inside is a value of its own;
    tuples become lists, as YAML writes them."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten_mapping(value, dotted))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.optimizer.lr": 0.001} -> {"train": {"optimizer": {"lr": 0.001}}}: flatten_mapping undone."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def set_dotted(mapping: dict[str, Any], key: str, value: Any) -> bool:
    """Set the existing leaf `key` ("train.optimizer.lr") of a nested mapping; False (nothing set)
    when the mapping has no such leaf."""
    *parents, leaf = key.split(".")
    node: Any = mapping
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], dict):
        return False
    node[leaf] = value
    return True
