"""Checks every reader makes before opening an input file."""

from __future__ import annotations

import os

from ..errors import FileFormatError


def check_input_file(path: str, kind: str) -> None:
    """FileFormatError naming `path` if it is missing or a directory (`kind`: ".refl")."""
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: file not found")
    if os.path.isdir(path):
        raise FileFormatError(f"{path}: is a directory, expected a {kind} file")


def read_input_bytes(path: str, kind: str) -> bytes:
    check_input_file(path, kind)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read file ({e.strerror})") from None
