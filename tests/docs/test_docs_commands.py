"""Every command line of README.md and docs/*.md works as written, so the docs cannot drift from the code.

Runnable lines run in order, one fresh copy of the examples per document (commands of one document may use
what earlier ones made), with a few size-reducing arguments appended (tests/docs/commands.py `SHRINK`);
multi-process ones are `slow`. Synopsis lines (with placeholders) must name a command that exists and only
options it accepts. A line that cannot run here says why in `NOT_RUN`; nothing else may be left out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.commands import ROOT, doc_commands, megagen_words, shrink

NOT_RUN = {
    "python3 -m venv .venv": "installs the project: exactly what .ci/run does before this suite",
    "python -m pip install -e examples/plugin_spec": "installs into this venv: done by the plug-in fixture",
    "--rdzv_id demo": "two nodes in two shells: tests/distributed/test_multinode.py runs this launch",
    "--world-size 6144": "two minutes and 3.6 GB of memory: tests/unit/test_rehearse.py rehearses "
    "512–1,024-rank layouts of the same path",
}

COMMANDS = doc_commands()
_seen: dict[str, str] = {}
RUNNABLE, SYNOPSES = [], []
for _c in COMMANDS:
    if any(key in _c.text for key in NOT_RUN):
        continue
    if _c.is_synopsis:
        SYNOPSES.append(_c)
    elif _c.text in _seen:  # the same line in two documents runs once
        continue
    else:
        _seen[_c.text] = _c.id
        RUNNABLE.append(_c)


def _param(c):
    return pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.multi_process else [])


_workspaces: dict[str, Path] = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One working directory per document, with fresh copies of examples/ and launch/."""

    def get(doc: str) -> Path:
        if doc not in _workspaces:
            root = tmp_path_factory.mktemp(doc.replace(".", "_"))
            for sub in ("examples", "launch"):
                shutil.copytree(
                    ROOT / sub, root / sub, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
                )
            _workspaces[doc] = root
        return _workspaces[doc]

    return get


def _environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


def _resolve(words: list[str]) -> list[str]:
    """`python` / `python3` is this interpreter; env assignments stay in front (run through `env`)."""
    out = []
    for w in words:
        out.append(sys.executable if w in ("python", "python3") and not out else w)
    return ["env", *out] if "=" in out[0] else out


_done: set[str] = set()


def _run(command, cwd: Path) -> None:
    for words in command.parts:
        words = _resolve(shrink(words))
        proc = subprocess.run(words, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=600)
        shown = f"{command.id}: `{' '.join(words)}` exited {proc.returncode}"
        assert proc.returncode == 0, f"{shown}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    _done.add(command.id)


@pytest.mark.parametrize("command", [_param(c) for c in RUNNABLE])
def test_documented_command_runs(command, workspace, request):
    if "plugin_spec" in command.text:
        request.getfixturevalue("plugin")
    cwd = workspace(command.file)
    for earlier in RUNNABLE[: RUNNABLE.index(command)]:  # what a reader ran before (when deselected here)
        if earlier.file == command.file and earlier.id not in _done:
            _run(earlier, cwd)
    _run(command, cwd)


def _subparser(
    parser: argparse.ArgumentParser, words: list[str]
) -> tuple[argparse.ArgumentParser, list[str]]:
    """Follow sub-command words down the parser tree; returns the deepest parser and the words left."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


@pytest.mark.parametrize("command", [pytest.param(c, id=c.id) for c in SYNOPSES])
def test_documented_synopsis_names_real_options(command):
    from megagen.cli import _parser

    for words in command.parts:
        args = megagen_words(words)
        if args is None:
            script = next((w for w in words if w.startswith("launch/")), None)
            assert script is None or (ROOT / script).exists(), f"{command.id}: {script} does not exist"
            continue
        parser, rest = _subparser(_parser(), args)
        assert parser.prog != "megagen" or not args, f"{command.id}: no command {args[0]!r}"
        known = {o for a in parser._actions for o in a.option_strings}
        for w in rest:
            option = w.strip("[]").split("=", 1)[0]
            if option.startswith("--"):
                assert option in known, f"{command.id}: `{parser.prog}` has no option {option}"


def test_every_command_line_is_run_or_checked():
    """Nothing is silently dropped: each extracted line is runnable, a synopsis, or has a stated reason."""
    assert len(COMMANDS) > 40
    accounted = {c.id for c in RUNNABLE} | {c.id for c in SYNOPSES}
    for c in COMMANDS:
        reason = next((why for key, why in NOT_RUN.items() if key in c.text), None)
        assert c.id in accounted or reason or c.text in _seen, c.id
    for key in NOT_RUN:
        assert any(key in c.text for c in COMMANDS), f"NOT_RUN entry {key!r} matches no documented line"


@pytest.fixture(scope="module")
def plugin():
    from tests.distributed.test_plugin_spec import install_plugin

    return install_plugin()
