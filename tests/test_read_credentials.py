"""One applicant's credentials cannot read another's data (issue 5), over real HTTP (uvicorn on 127.0.0.1).

Every read route of an applicant's data refuses a request without a credential, with another applicant's, with a
revoked, an expired or an unknown one, and serves the applicant's own, an official's and the admin token alike. An
agent reads its own record by a request signed with its key, and not another agent's; an old or replayed signature
is refused. Each test names the attack it plays; where a request could write, nothing stored changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from agent.enroll import read_own_record
from protocol.keys import generate_private_key, key_id
from protocol.request_auth import NONCE_HEADER, SIGNATURE_HEADER, TIME_HEADER, RequestSignatureInvalid, sign_request
from simulator.mosquitto import free_port
from tests.test_verifier_api import Harness, running_verifier
from tests.test_verifier_core import NOW, AgentSim, uscc
from verifier.cli import main
from verifier.credentials import NonceCache
from verifier.db import api_credentials, evaluations, official_records
from verifier.errors import ERRORS

ROOT = Path(__file__).resolve().parents[1]
YEAR = NOW.year
# every route that reads one applicant's data: (name, path with {a} for the applicant)
READS = [
    ("eligibility", f"/v1/applicants/{{a}}/eligibility?year={YEAR}"),
    ("resolution-days", f"/v1/applicants/{{a}}/resolution-days?year={YEAR}"),
    ("gates", "/v1/applicants/{a}/gates"),
    ("evaluate", f"/v1/applicants/{{a}}/evaluate?year={YEAR}"),
    ("stored evaluation", f"/v1/applicants/{{a}}/evaluations/{YEAR - 1}"),
    ("report", f"/v1/applicants/{{a}}/reports/{YEAR}.json"),
    ("report csv", f"/v1/applicants/{{a}}/reports/{YEAR}.csv?table=devices"),
]
READ_IDS = [name for name, _ in READS]


@dataclass
class World:
    h: Harness
    plat_agent: AgentSim
    node_agent: AgentSim
    tokens: dict[str, str]  # plat, node, official, revoked, expired
    ids: dict[str, str]

    def bearer(self, who: str) -> dict[str, str]:
        return self.h.admin if who == "admin" else {"Authorization": f"Bearer {self.tokens[who]}"}

    def get(self, path: str, who: str | None = None, **headers: str) -> httpx.Response:
        return self.h.client.get(path, headers={**(self.bearer(who) if who else {}), **headers})

    def stored(self) -> tuple[Any, ...]:
        """Everything a refused request must leave alone: ledger, facts, evidence, officials' records, stored
        evaluations, credentials (and their revocations)."""
        with self.h.engine.connect() as conn:
            counts = tuple(int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                           for t in (official_records, evaluations))
            creds = tuple(conn.execute(select(api_credentials.c.id, api_credentials.c.revoked_at)
                                       .order_by(api_credentials.c.id)).all())
        return (*self.h.stored(), counts, creds)


def _issue(h: Harness, body: dict[str, Any]) -> dict[str, Any]:
    r = h.client.post("/v1/admin/credentials", json=body, headers=h.admin)
    assert r.status_code == 201, r.text
    got: dict[str, Any] = r.json()
    return got


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_verifier(tmp_path_factory.mktemp("read-credentials")) as h:
        plat_agent, node_agent = h.enroll("plat-1", uscc(1)), h.enroll("node-1")
        h.deliver(plat_agent)
        h.deliver(node_agent)
        r = h.client.post("/v1/applicants/node-1/gates", headers=h.admin, json={
            "metric": "connected_to_top_level_node", "value": True, "recorded_by": "王科长",
            "document_ref": "嘉经信〔2025〕7号"})
        assert r.status_code == 201, r.text
        assert h.client.post("/v1/admin/annual/run", params={"year": YEAR - 1}, headers=h.admin).status_code == 200
        tokens, ids = {}, {}
        for who, body in (("plat", {"applicant_id": "plat-1", "role": "applicant", "name": "plat-1 tool"}),
                          ("node", {"applicant_id": "node-1", "role": "applicant", "name": "node-1 staff"}),
                          ("official", {"applicant_id": None, "role": "official", "name": "bureau"}),
                          ("revoked", {"applicant_id": "plat-1", "role": "applicant", "name": "leaked"})):
            got = _issue(h, body)
            tokens[who], ids[who] = got["token"], got["id"]
        real_now = h.clock.now
        h.clock.now = real_now - timedelta(hours=2)
        got = _issue(h, {"applicant_id": "plat-1", "role": "applicant", "name": "short-lived", "ttl_s": 3600})
        h.clock.now = real_now
        tokens["expired"], ids["expired"] = got["token"], got["id"]
        r = h.client.post(f"/v1/admin/credentials/{ids['revoked']}/revoke", headers=h.admin)
        assert r.status_code == 200 and datetime.fromisoformat(r.json()["revoked_at"]) == real_now
        yield World(h, plat_agent, node_agent, tokens, ids)


def _refused(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code} {r.text[:300]}"
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code
    assert err["message"].startswith(ERRORS[code].en) and err["message_zh"].startswith(ERRORS[code].zh)
    return err


# ---- applicants' data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "path"), READS, ids=READ_IDS)
def test_anonymous_reader_is_told_to_send_a_credential(world: World, name: str, path: str) -> None:
    """Attack: read an applicant's data with no credential at all (a scraper, a curious neighbour)."""
    for applicant in ("plat-1", "ghost"):
        err = _refused(world.get(path.format(a=applicant)), 401, "credential_required")
        assert "Authorization: Bearer <credential>" in err["message"]
        assert "Authorization: Bearer <凭据>" in err["message_zh"]


@pytest.mark.parametrize(("name", "path"), READS, ids=READ_IDS)
def test_one_applicants_credential_cannot_read_another_applicants_data(world: World, name: str, path: str) -> None:
    """Attack: a platform's own credential used to read the node's (a competitor's) data — and to probe which
    applicants exist: an id that does not exist gets the very same refusal."""
    before = world.stored()
    err = _refused(world.get(path.format(a="node-1"), "plat"), 403, "credential_forbidden")
    ghost = _refused(world.get(path.format(a="no-such-applicant"), "plat"), 403, "credential_forbidden")
    assert err["message"].replace("node-1", "X") == ghost["message"].replace("no-such-applicant", "X")
    _refused(world.get(path.format(a="plat-1"), "node"), 403, "credential_forbidden")
    assert world.stored() == before


@pytest.mark.parametrize(("name", "path"), READS, ids=READ_IDS)
def test_revoked_expired_unknown_and_malformed_credentials_are_refused(world: World, name: str, path: str) -> None:
    """Attack: a leaked credential after its revocation, one past its expiry, a made-up one of the right shape,
    the token's hash (as a database leak would give it), and a non-bearer scheme."""
    url = path.format(a="plat-1")
    assert "revoked at" in _refused(world.get(url, "revoked"), 401, "credential_invalid")["message"]
    assert "expired at" in _refused(world.get(url, "expired"), 401, "credential_invalid")["message"]
    forged = "tpr_" + "A" * 43
    digest = hashlib.sha256(world.tokens["plat"].encode()).hexdigest()
    for header in (f"Bearer {forged}", f"Bearer {digest}", f"Bearer tpr_{digest}",
                   f"Basic {world.tokens['plat']}", "Bearer"):
        _refused(world.get(url, Authorization=header), 401, "credential_invalid")


@pytest.mark.parametrize(("name", "path"), READS, ids=READ_IDS)
def test_own_official_and_admin_credentials_read_the_same_data(world: World, name: str, path: str) -> None:
    """The legitimate readers: the applicant's own tool, an official, the admin; the same answer for each."""
    for applicant, own in (("plat-1", "plat"), ("node-1", "node")):
        bodies = []
        for who in (own, "official", "admin"):
            r = world.get(path.format(a=applicant), who)
            assert r.status_code == 200, f"{who} reading {applicant}: {r.status_code} {r.text[:200]}"
            bodies.append(re.sub(rb'"generated_at": ?"[^"]*"', b"", r.content))
        assert bodies[0] == bodies[1] == bodies[2]
    ghost = world.get(path.format(a="ghost"), "official")
    assert ghost.status_code in (404, 200) and ghost.status_code != 403  # officials may learn what exists


def test_a_read_credential_cannot_write_or_administer(world: World) -> None:
    """Attack: escalate from a read credential to the writes beside the reads — record a gate for one's own
    applicant, run the annual check, issue oneself an official credential, revoke a rival's credential."""
    before = world.stored()
    gate = {"metric": "connected_to_top_level_node", "value": True, "recorded_by": "me", "document_ref": "forged"}
    for who in ("plat", "official"):
        _refused(world.h.client.post("/v1/applicants/plat-1/gates", json=gate, headers=world.bearer(who)), 401,
                 "admin_unauthorized")
        _refused(world.h.client.post("/v1/admin/annual/run", params={"year": YEAR}, headers=world.bearer(who)),
                 401, "admin_unauthorized")
        _refused(world.h.client.post("/v1/admin/credentials", headers=world.bearer(who), json={
            "applicant_id": None, "role": "official", "name": "me too"}), 401, "admin_unauthorized")
        _refused(world.h.client.post(f"/v1/admin/credentials/{world.ids['node']}/revoke",
                                     headers=world.bearer(who)), 401, "admin_unauthorized")
    assert world.stored() == before


def test_issuing_credentials_checks_its_input_and_stores_only_a_hash(world: World) -> None:
    h = world.h
    before = world.stored()
    for body, status, code in (
            ({"role": "applicant", "name": "x"}, 422, "request_invalid"),  # whose?
            ({"applicant_id": "plat-1", "role": "official", "name": "x"}, 422, "request_invalid"),
            ({"applicant_id": "ghost", "role": "applicant", "name": "x"}, 404, "applicant_unknown"),
            ({"applicant_id": "plat-1", "role": "admin", "name": "x"}, 422, "request_invalid"),
            ({"applicant_id": "plat-1", "role": "applicant", "name": "x", "ttl_s": 0}, 422, "request_invalid"),
            ({"applicant_id": "plat-1", "role": "applicant", "name": "   "}, 422, "request_invalid"),
            ({"applicant_id": "plat-1", "role": "applicant", "name": "x", "id": "chosen"}, 422, "request_invalid")):
        _refused(h.client.post("/v1/admin/credentials", json=body, headers=h.admin), status, code)
    assert world.stored() == before
    _refused(h.client.post("/v1/admin/credentials/no-such-id/revoke", headers=h.admin), 404, "credential_unknown")
    token = world.tokens["plat"]
    assert re.fullmatch(r"tpr_[A-Za-z0-9_-]{43}", token)
    with h.engine.connect() as conn:
        rows = conn.execute(select(api_credentials)).all()
    assert all(token not in str(tuple(r)) for r in rows)
    assert hashlib.sha256(token.encode()).hexdigest() in {r.token_sha256 for r in rows}
    again = h.client.post(f"/v1/admin/credentials/{world.ids['revoked']}/revoke", headers=h.admin).json()
    assert datetime.fromisoformat(again["revoked_at"]) == NOW  # idempotent: the first revocation time stays


# ---- agents' records -------------------------------------------------------------------------------------------
def _signed(sim: AgentSim, agent_id: str, unix_time: int, nonce: str | None = None) -> dict[str, str]:
    return sign_request(sim.key, "GET", f"/v1/agents/{agent_id}", unix_time=unix_time, nonce=nonce)


def test_agent_reads_its_own_record_by_signature_not_another_agents(world: World) -> None:
    """Attack: an agent (or whoever stole its key) reads another applicant's agent by signing for that path, or
    re-signs a request with its own key but claims the other agent's key id."""
    now = int(world.h.clock().timestamp())
    mine, theirs = world.plat_agent, world.node_agent
    r = world.get(f"/v1/agents/{mine.agent_id}", **_signed(mine, mine.agent_id, now))
    assert r.status_code == 200 and r.json()["key_id"] == mine.kid and r.json()["next_seq"] == 2
    _refused(world.get(f"/v1/agents/{theirs.agent_id}", **_signed(mine, theirs.agent_id, now)), 403,
             "credential_forbidden")
    claimed = _signed(mine, theirs.agent_id, now)
    claimed[SIGNATURE_HEADER] = theirs.kid + ":" + claimed[SIGNATURE_HEADER].split(":")[1]
    _refused(world.get(f"/v1/agents/{theirs.agent_id}", **claimed), 401, "request_signature_invalid")
    stranger = generate_private_key()  # a key the verifier never enrolled
    headers = sign_request(stranger, "GET", f"/v1/agents/{mine.agent_id}", unix_time=now)
    assert key_id(stranger.public_key()) in headers[SIGNATURE_HEADER]
    _refused(world.get(f"/v1/agents/{mine.agent_id}", **headers), 401, "request_signature_invalid")
    _refused(world.get(f"/v1/agents/{mine.agent_id}"), 401, "credential_required")
    # the agent's side: agent.enroll signs its reads the same way
    record = read_own_record(world.h.base_url, mine.agent_id, [mine.key], now=world.h.clock())
    assert record is not None and record["agent_id"] == mine.agent_id
    assert read_own_record(world.h.base_url, theirs.agent_id, [mine.key], now=world.h.clock()) is None


def test_old_future_replayed_and_malformed_agent_signatures_are_refused(world: World) -> None:
    """Attack: replay a captured signed request (same nonce), use one signed more than 300 s ago, or one made
    to look fresh for later; tamper with the time, nonce or signature headers."""
    sim, now = world.plat_agent, int(world.h.clock().timestamp())
    path = f"/v1/agents/{sim.agent_id}"
    captured = _signed(sim, sim.agent_id, now - 250)
    assert world.get(path, **captured).status_code == 200
    err = _refused(world.get(path, **captured), 401, "request_signature_invalid")
    assert "replayed" in err["message"]
    assert world.get(path, **_signed(sim, sim.agent_id, now - 300)).status_code == 200  # at the window's edge
    for when in (now - 301, now + 301):
        err = _refused(world.get(path, **_signed(sim, sim.agent_id, when)), 401, "request_signature_invalid")
        assert "within 300 s" in err["message"]
    fresh = _signed(sim, sim.agent_id, now)
    for tampered in ({**fresh, TIME_HEADER: str(now + 1)}, {**fresh, NONCE_HEADER: "x" * 24},
                     {**fresh, TIME_HEADER: "soon"}, {**fresh, NONCE_HEADER: "short"},
                     {**fresh, SIGNATURE_HEADER: fresh[SIGNATURE_HEADER][:-8] + "AAAAAAA="},
                     {**fresh, SIGNATURE_HEADER: "not-a-key-id:abc"}):
        _refused(world.get(path, **tampered), 401, "request_signature_invalid")
    assert world.get(path, **fresh).status_code == 200  # none of the tampered ones used its nonce up


def test_nonce_cache_is_bounded_and_never_forgets_a_nonce_early() -> None:
    """Attack: flood the verifier with signed reads to push a captured nonce out of its memory, then replay it."""
    cache = NonceCache(max_entries=2)
    assert cache.first_use("k", "n1", signed_at=1000, now_unix=1000)
    assert cache.first_use("k", "n2", signed_at=1000, now_unix=1000)
    with pytest.raises(RequestSignatureInvalid, match="too many signed requests"):
        cache.first_use("k", "n3", signed_at=1000, now_unix=1000)
    assert not cache.first_use("k", "n1", signed_at=1000, now_unix=1200)  # still remembered: still a replay
    assert cache.first_use("k", "n3", signed_at=1400, now_unix=1400)  # n1 and n2 are past the window: forgotten
    assert not cache.first_use("k", "n3", signed_at=1400, now_unix=1401)


def test_revoked_agent_can_no_longer_sign_reads(tmp_path: Path) -> None:
    """Attack: a revoked agent's key (revoked because it leaked) keeps reading the agent's record."""
    with running_verifier(tmp_path) as h:
        sim = h.enroll("plat-1")
        now = int(h.clock().timestamp())
        path = f"/v1/agents/{sim.agent_id}"
        assert h.client.get(path, headers=_signed(sim, sim.agent_id, now)).status_code == 200
        assert h.client.post(f"/v1/admin/agents/{sim.agent_id}/revoke", json={}, headers=h.admin).status_code == 200
        _refused(h.client.get(path, headers=_signed(sim, sim.agent_id, now)), 401, "request_signature_invalid")
        assert h.client.get(path, headers=h.admin).json()["revoked"] is True


def test_agent_records_by_bearer_credential(world: World) -> None:
    """Attack: an applicant's credential reads another applicant's agent, or probes which agent ids exist."""
    mine, theirs = world.plat_agent.agent_id, world.node_agent.agent_id
    assert world.get(f"/v1/agents/{mine}", "plat").json()["applicant_id"] == "plat-1"
    _refused(world.get(f"/v1/agents/{theirs}", "plat"), 403, "credential_forbidden")
    _refused(world.get("/v1/agents/no-such-agent", "plat"), 403, "credential_forbidden")
    _refused(world.get(f"/v1/agents/{mine}", "revoked"), 401, "credential_invalid")
    _refused(world.get(f"/v1/agents/{mine}", "expired"), 401, "credential_invalid")
    for who in ("official", "admin"):
        assert world.get(f"/v1/agents/{theirs}", who).json()["applicant_id"] == "node-1"
        _refused(world.get("/v1/agents/no-such-agent", who), 404, "agent_unknown")


def test_public_routes_stay_public(world: World) -> None:
    for path in ("/healthz", "/v1/ledger/checkpoint", "/v1/ledger/key", "/v1/ledger/proof/inclusion?index=0&size=2"):
        r = world.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}"


# ---- the CLI and the docs --------------------------------------------------------------------------------------
def test_cli_issues_lists_and_revokes_credentials(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", world.h.db_url]
    assert main([*db, "credential", "issue", "--applicant", "node-1", "--name", "node-1 exporter",
                 "--ttl-s", "600"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert re.fullmatch(r"tpr_[A-Za-z0-9_-]{43}", token) and "node-1" in out.err
    cred_id = re.search(r"credential ([0-9a-f]{16})", out.err).group(1)  # type: ignore[union-attr]
    bearer = {"Authorization": f"Bearer {token}"}
    assert world.h.client.get("/v1/applicants/node-1/gates", headers=bearer).status_code == 200
    assert world.h.client.get("/v1/applicants/plat-1/gates", headers=bearer).status_code == 403
    assert main([*db, "credential", "list"]) == 0
    listed = capsys.readouterr().out
    assert cred_id in listed and "node-1 exporter" in listed and "tpr_" not in listed
    assert main([*db, "credential", "revoke", "--id", cred_id]) == 0
    assert '"revoked_at"' in capsys.readouterr().out
    _refused(world.h.client.get("/v1/applicants/node-1/gates", headers=bearer), 401, "credential_invalid")
    assert main([*db, "credential", "issue", "--applicant", "ghost", "--name", "x"]) == 2
    assert "applicant_unknown" in capsys.readouterr().err


def test_the_docs_credentials_walkthrough_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "verifier.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"<!-- runnable -->\s*```sh\n(.*?)```", text, re.S)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TIANPING_DB", None)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace("8700", str(free_port()))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    statuses = [line for line in done.stdout.splitlines() if re.match(r"^[0-9]{3} ", line)]
    assert statuses == ["401 without a credential", "403 for another applicant", "401 once revoked"]
    assert '"applicant_id":"node-1","records":[]' in done.stdout.replace(" ", "")
    assert done.stdout.count('"revoked_at": null') == 3 and done.stdout.count('"revoked_at": "') == 1
    assert '"name": "Jiaxing bureau, Wang"' in done.stdout
    assert '"applicant"' in (tmp_path / "plat-1-2025.json").read_text(encoding="utf-8")
    assert (tmp_path / "node-1.json").read_text(encoding="utf-8").startswith('{"id"')
