"""The command lines of README.md and docs/*.md, as the docs test runs them.

A *command line* is a line of a code block (fenced with no language or bash/sh, or indented by four
spaces) that starts with a program a user types: `megagen`, `torchrun`, `python -m`, `launch/…`, or
environment assignments before one of these. Lines continued with a trailing backslash are joined and a
trailing `  # comment` is dropped. A line that still holds a placeholder (`CONFIG`, `CKPT`, `DIR`, `N`,
`[optional]`, `a|b`, `…`) is a *synopsis*: its command and every option it names must exist. Every other
line is *runnable* and is run as written, with a few size-reducing arguments appended (`SHRINK`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_PROGRAM = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(megagen|torchrun|python3?|launch/\S+|pytest)\s")
_PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*|[A-Z]+\d?)(?:\.\w+)?$")  # CONFIG, CKPT1, N, FILE.safetensors
_COMMENT = re.compile(r"\s+#\s.*$")


@dataclass(frozen=True)
class DocCommand:
    file: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def parts(self) -> list[list[str]]:
        """The shell commands of the line (split on `&&` and `;`), each as its words."""
        return [shlex.split(piece) for piece in re.split(r"\s+&&\s+|;\s+", self.text) if piece.strip()]

    @property
    def is_synopsis(self) -> bool:
        for words in self.parts:
            for w in words:
                value = w.split("=", 1)[1] if "=" in w and not w.startswith("-") else w
                if any(mark in w for mark in ("…", "...", "[", "]", "<", ">")) or "|" in value:
                    return True
                if _PLACEHOLDER.match(value) and not re.match(r"^[A-Z_]+=", w):
                    return True
        return False

    @property
    def multi_process(self) -> bool:
        return any(w in ("torchrun", "--nproc") or w.startswith("--nproc") for p in self.parts for w in p)


def _code_lines(path: Path):
    """(line number, text) of every line inside a shell code block of a Markdown file."""
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence is not None:
            if fence in ("", "bash", "sh", "shell", "console"):
                yield number, stripped
        elif line.startswith("    "):
            yield number, stripped


def doc_commands(paths=DOCS) -> list[DocCommand]:
    out = []
    for path in paths:
        pending, start = "", 0
        for number, text in _code_lines(path):
            if pending:
                text = pending + " " + text
            elif not _PROGRAM.match(text):
                continue
            else:
                start = number
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            pending = ""
            out.append(DocCommand(path.name, start, _COMMENT.sub("", text).strip()))
    return out


def megagen_words(words: list[str]) -> list[str] | None:
    """The words after `megagen` / `-m megagen` in one shell command, or None if it runs no megagen."""
    for i, w in enumerate(words):
        if w == "megagen" and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1 :]
    return None


def shrink(words: list[str]) -> list[str]:
    """Append what keeps a documented command small on a 2-core CPU (later values win)."""
    args = megagen_words(words)
    if not args:
        return words
    command = args[0]
    if command == "train" or args[:2] == ["launch", "local"] or "--validate" in args:
        return [*words, "train.steps=2"]
    if command == "bench":
        return [*words, "--steps", "1", "--warmup", "1"]
    if command == "sample":
        return [*words, "--steps", "2"]
    return words
