"""Conventions every file format and wire shape of the daemon shares (manifests, bundles, settings)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # device ids, groups, bundle names and versions: safe in topics and paths
AnswerMode = Literal["auto", "grounded", "free"]  # how `ask` answers (daemon/retrieval/rag.py)


class StrictModel(BaseModel):
    """A document we read from a file or another machine: an unknown field is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
