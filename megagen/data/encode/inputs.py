"""What to encode: SRC is a directory of videos with sidecar files, or a JSON-lines list of videos.

Directory: every video file under SRC (sorted by relative path); its caption is `<stem>.txt` beside it and
pre-computed text embeddings `<stem>.<encoder>.npy` / `.safetensors`. List file: one JSON object per line,
`{"path": ..., "caption": "...", "text": {"ul2": "emb.npy"}}`, paths relative to the list's directory.
An input's key (its path relative to SRC) names it in the logs, the done-lists and the summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from megagen.data.format import DataError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
EMBEDDING_SUFFIXES = (".npy", ".safetensors")


@dataclass
class EncodeInput:
    key: str
    path: str
    index: int
    """Position in the sorted input list: the sample's caption_id (one caption per clip)."""
    caption: str | None = None
    text_files: dict[str, str] = field(default_factory=dict)
    """encoder name → pre-computed (L, D) embedding file."""


def list_inputs(src: str) -> list[EncodeInput]:
    """The inputs of SRC (a directory or a .jsonl list), in a fixed order; DataError when there are none."""
    if os.path.isdir(src):
        inputs = _from_directory(src)
    elif os.path.isfile(src):
        inputs = _from_list(src)
    else:
        raise DataError("no such directory or list file", file=src)
    if not inputs:
        raise DataError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found", file=src)
    return inputs


def _from_directory(src: str) -> list[EncodeInput]:
    keys = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        keys += [
            os.path.relpath(os.path.join(root, f), src) for f in files if f.lower().endswith(VIDEO_SUFFIXES)
        ]
    inputs = []
    for i, key in enumerate(sorted(keys)):
        path = os.path.join(src, key)
        stem = os.path.splitext(path)[0]
        caption = None
        if os.path.isfile(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                caption = f.read().strip()
        inputs.append(EncodeInput(key.replace(os.sep, "/"), path, i, caption, _sidecar_embeddings(stem)))
    return inputs


def _sidecar_embeddings(stem: str) -> dict[str, str]:
    """`<stem>.<encoder>.npy|.safetensors` files → {encoder: path}."""
    folder, base = os.path.split(stem)
    found = {}
    for name in sorted(os.listdir(folder or ".")):
        head, ext = os.path.splitext(name)
        if ext in EMBEDDING_SUFFIXES and head.startswith(base + ".") and "." not in head[len(base) + 1 :]:
            found[head[len(base) + 1 :]] = os.path.join(folder, name)
    return found


def _from_list(src: str) -> list[EncodeInput]:
    base = os.path.dirname(os.path.abspath(src))
    inputs = []
    with open(src, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                path = rec["path"]
                text = {str(k): os.path.join(base, v) for k, v in rec.get("text", {}).items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(
                    f"line {line_no}: expected {{'path': ..., 'caption'|'text': ...}}", file=src
                ) from None
            caption = rec.get("caption")
            inputs.append(EncodeInput(path, os.path.join(base, path), len(inputs), caption, text))
    keys = [i.key for i in inputs]
    if len(set(keys)) != len(keys):
        raise DataError("a video is listed twice", file=src)
    return inputs
