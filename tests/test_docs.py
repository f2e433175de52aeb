"""Docs that run: the quick start is executed as written, and every command the docs name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from simulator.cli import build_parser as sim_parser
from simulator.mosquitto import free_port
from verifier.cli import _parser as verifier_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent


def runnable_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- runnable -->\s*```sh\n(.*?)```", text, re.S)


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    (block,) = runnable_blocks((ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8"))
    port = str(free_port())
    script = block.replace("8700", port)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TIANPING_DB", None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert '"enrolled": true' in done.stdout
    assert "token_used" in done.stderr  # the reused token was refused, and said why
    assert "连接设备数超 1 万台" in done.stdout


def _subcommands(parser: object) -> set[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names.add(name)
                names |= {f"{name} {n}" for n in _subcommands(sub)}
    return names


PARSERS = {"tianping-agent": agent_parser, "tianping-verifier": verifier_parser, "tianping-sim": sim_parser}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for tool, build in PARSERS.items():
        known = _subcommands(build())
        for m in re.finditer(rf"`?{tool}((?: \[--[a-z]+ [A-Z]+\])?(?: [a-z][a-z-]*)+)", text):
            words = [w for w in re.sub(r"\[--[a-z]+ [A-Z]+\]", "", m.group(1)).split() if not w.startswith("-")]
            named = " ".join(words[:2]) if " ".join(words[:2]) in known else (words[0] if words else "")
            assert named in known, f"{doc.name}: {tool} {' '.join(words)} is not a command ({sorted(known)})"
