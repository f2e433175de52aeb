"""docs/operations.md runs: its ``runnable`` shell blocks are run in order in one bash, in a scratch directory, with
the project's virtual environment on PATH (a verifier over HTTPS with a private CA, enrollment of a real agent,
key rotation, backup and restore, upgrade). Blocks that need a container engine, a cluster or systemd are marked
``cannot-run-here``; every repository file they name must exist (tests/test_deploy.py checks the files)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.mosquitto import free_port

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
BLOCK = re.compile(r"<!-- (runnable(?:: postgres)?|cannot-run-here: [^>]+) -->\n```bash\n(.*?)```", re.S)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))]


def test_every_shell_block_is_marked() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.count("```bash") == len(blocks()), "a ```bash block without a runnable/cannot-run-here marker"
    kinds = [k for k, _ in blocks()]
    assert kinds.count("runnable") >= 5 and any(k.startswith("cannot-run-here") for k in kinds)


def test_files_named_by_the_blocks_that_cannot_run_here_exist() -> None:
    for kind, body in blocks():
        if kind.startswith("cannot-run-here"):
            for rel in re.findall(r'\$TIANPING_SRC/([\w./-]+)', body):
                if not rel.endswith("/out"):
                    assert (ROOT / rel).exists(), f"{rel} named in operations.md does not exist"


def _psql(sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", PG_ADMIN, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql], capture_output=True,
                          text=True, timeout=30)


def _postgres_available() -> bool:
    if shutil.which("psql") is None or shutil.which("pg_dump") is None:
        return False
    try:
        return _psql("SELECT 1").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_runnable_blocks_run_in_order(tmp_path: Path) -> None:
    for tool in ("openssl", "curl", "sqlite3"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {tool})")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIANPING_", "SSL_CERT"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", TIANPING_SRC=str(ROOT),
               PORT=str(free_port()), HOME=str(tmp_path))
    selected = [body for kind, body in blocks() if kind == "runnable"]
    databases: list[str] = []
    if _postgres_available():
        suffix = secrets.token_hex(4)
        databases = [f"tp_doc_{suffix}", f"tp_doc_{suffix}_restored"]
        for name in databases:
            assert _psql(f"CREATE DATABASE {name}").returncode == 0
        env.update(PG_URL=f"postgresql://postgres@127.0.0.1:5432/{databases[0]}",
                   PG_RESTORE_URL=f"postgresql://postgres@127.0.0.1:5432/{databases[1]}")
        init = subprocess.run(["tianping-verifier", "--db",
                               f"postgresql+psycopg://postgres@127.0.0.1:5432/{databases[0]}", "init"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert init.returncode == 0, init.stderr
        pg_blocks = [body for kind, body in blocks() if kind == "runnable: postgres"]
        selected[-1:-1] = pg_blocks  # before the last block (which stops the verifier)
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(selected)
    try:
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120, start_new_session=True)
    finally:
        for name in databases:
            _psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    log = f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 0, log
    out = done.stdout
    assert '"status":"ok"' in out.replace(" ", ""), log
    assert out.count("enrolled: agent") == 2, log  # the first key and the rotated one
    assert '"enrolled": true' in out, log
    assert (tmp_path / "agent" / "retired" / "agent.key").exists() and (tmp_path / "agent" / "agent.key").exists()
    assert (tmp_path / "backup" / "verifier.sqlite").stat().st_size > 0
    assert re.search(r"^ok$", out, re.M), log  # integrity_check of the backup
    if databases:
        assert (tmp_path / "backup" / "tianping.dump").stat().st_size > 0
