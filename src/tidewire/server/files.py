"""Placeholder: being written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

if TYPE_CHECKING:
    from ..app import Tidewire


def add_file_routes(router: APIRouter, tw: Tidewire) -> None:
    pass
