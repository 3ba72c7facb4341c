"""Content digests (sha256), the one way this project identifies bytes: image files, the prepared cache,
a stage's outputs, settings and weights that a checkpoint or an embedding cache must match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 20


def feed_file(digest: "hashlib._Hash", path: str | Path) -> None:
    """Stream a file's bytes into `digest`."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    feed_file(digest, path)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_sha256(value) -> str:
    """A JSON-able value by its content (keys sorted)."""
    return bytes_sha256(json.dumps(value, sort_keys=True).encode())


def folder_sha256(folder: str | Path) -> str:
    """A flat folder by its files' names and contents (sub-folders ignored)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(path.name.encode() + file_sha256(path).encode())
    return digest.hexdigest()


def paths_sha256(paths: list[str]) -> str | None:
    """Files and folders by their relative paths and bytes, in sorted order (`.gitignore` files left out);
    None when one is missing."""
    digest = hashlib.sha256()
    for path in map(Path, sorted(paths)):
        if not path.exists():
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.name == ".gitignore":
                continue
            digest.update(file.as_posix().encode() + b"\0")
            feed_file(digest, file)
    return digest.hexdigest()
