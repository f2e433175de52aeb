"""The officials' web console over real HTTP (uvicorn on a free port, httpx with cookies): roles, CSRF, sessions,
languages, pages and downloads. The browser tests (tests/test_web_browser.py) reuse ``seeded_console``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from protocol.envelope import envelope_hash
from protocol.keys import generate_private_key, public_key_b64
from protocol.report import GENESIS_HASH, ReportV1
from simulator.mosquitto import free_port
from tests.test_verifier_api import write_test_rules
from tests.test_verifier_core import SH, Clock, device, sign_payload, uscc
from verifier.api import VerifierSettings, create_app, serve_in_thread
from verifier.auth import (
    add_user,
    authenticate,
    hash_password,
    issue_session,
    read_session,
    verify_password,
)
from verifier.cli import main as verifier_main
from verifier.db import agents, init_db, make_engine
from verifier.enroll import add_applicant, add_enterprise, enroll_agent, issue_token
from verifier.errors import RequestInvalid
from verifier.ingest import ingest_report
from verifier.web.strings import STRINGS, format_date, format_number

NOW = datetime(2025, 6, 20, 1, 0, tzinfo=SH)
PASSWORD = "correct-horse-battery"
ADMIN_TOKEN = "web-test-admin-token-0123456789"
TEMPLATES = Path(__file__).resolve().parents[1] / "verifier" / "web" / "templates"


@dataclass
class Console:
    base_url: str
    engine: Engine
    clock: Clock
    agents: dict[str, str]  # label -> agent id

    @contextmanager
    def client(self, username: str | None = None) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=self.base_url, timeout=10, follow_redirects=False) as c:
            if username:
                assert login(c, username, PASSWORD).status_code == 303
                assert "tp_session" in c.cookies
            yield c


def login(client: httpx.Client, username: str, password: str) -> httpx.Response:
    page = client.get("/console/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    return client.post("/console/login", data={"csrf": csrf.group(1), "username": username, "password": password,
                                               "next": "/console"})


def _report(agent_id: str, kid: str, seq: int, prev: str, start: datetime, end: datetime,
            devices: list[dict[str, Any]], connectors: list[dict[str, Any]] | None = None,
            buckets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"v": 1, "agent_id": agent_id, "key_id": kid, "seq": seq, "prev_hash": prev,
                            "period": {"start": start.isoformat(), "end": end.isoformat()},
                            "created_at": end.isoformat(), "devices": devices, "connectors": connectors or []}
    if buckets:
        body["resolution"] = {"lines_read": sum(b["count"] for b in buckets), "buckets": buckets}
    return ReportV1.model_validate(body).model_dump(mode="json")


def seed(engine: Engine, days: int = 19) -> dict[str, str]:
    """Two applicants, enterprises, three agents (one stale), daily reports with devices, errors, resolutions,
    and the four console users."""
    at = NOW - timedelta(days=30)
    add_applicant(engine, applicant_id="plat-1", name="嘉兴示范工业互联网平台", kind="platform", now=at)
    add_applicant(engine, applicant_id="node-1", name="嘉兴标识解析二级节点", kind="node", now=at)
    for n in (1, 2, 3):
        add_enterprise(engine, applicant_id="plat-1", uscc=uscc(n), name=f"示范企业{n}号", now=at)
    made: dict[str, str] = {}
    keys = {}
    for label, applicant in (("main", "plat-1"), ("quiet", "plat-1"), ("node", "node-1")):
        key = generate_private_key()
        token = issue_token(engine, applicant_id=applicant, now=at).token
        e = enroll_agent(engine, token=token, public_key_b64=public_key_b64(key.public_key()),
                         agent_name=f"edge-{label}", now=at)
        made[label] = e.agent_id
        keys[label] = (key, e.key_id)
    day0 = datetime(2025, 6, 1, tzinfo=SH)
    prev = {label: GENESIS_HASH for label in made}
    seqs = dict.fromkeys(made, 1)

    def send(label: str, body: dict[str, Any], now: datetime) -> None:
        env = sign_payload(body, keys[label][0])
        ingest_report(engine, env, now=now)
        prev[label] = envelope_hash(env)
        seqs[label] += 1

    for d in range(days):
        start, end = day0 + timedelta(days=d), day0 + timedelta(days=d + 1)
        devices = [device(f"dev-{i}", enterprise=uscc(1 + i % 3), start=start,
                          protocols=("opcua",) if i % 2 else ("modbus", "mqtt")) for i in range(20 + 2 * d)]
        devices.append(device("silent-1", enterprise=uscc(1), start=start, status="reachable"))  # an anomaly
        errors = {"timeout": d} if d else {}
        send("main", _report(made["main"], keys["main"][1], seqs["main"], prev["main"], start, end, devices,
                             [{"kind": "opcua", "source": "opc.tcp://10.0.0.5:4840", "errors": errors}]), end)
        buckets = [{"minute": (start + timedelta(hours=10)).isoformat(), "op": 1, "resp": 1, "transport": "TCP",
                    "count": 1000 + 100 * d},
                   {"minute": (start + timedelta(hours=11)).isoformat(), "op": 100, "resp": 1, "transport": "TCP",
                    "count": 10}]
        send("node", _report(made["node"], keys["node"][1], seqs["node"], prev["node"], start, end, [],
                             buckets=buckets), end)
    start = day0
    send("quiet", _report(made["quiet"], keys["quiet"][1], 1, GENESIS_HASH, start, start + timedelta(hours=1),
                          [device("quiet-dev", enterprise=uscc(1), start=start)]), start + timedelta(hours=1))
    users: list[tuple[str, str, str | None]] = [("admin1", "admin", None), ("official1", "official", None),
                                                ("operator1", "operator", "plat-1"),
                                                ("operator2", "operator", "node-1")]
    for username, role, own in users:
        add_user(engine, username=username, password=PASSWORD, role=role, applicant_id=own, now=at)
    return made


@contextmanager
def seeded_console(tmp: Path, admin_token: str | None = ADMIN_TOKEN) -> Iterator[Console]:
    db_url = f"sqlite:///{tmp / 'console.sqlite'}"
    engine = make_engine(db_url)
    init_db(engine)
    agents = seed(engine)
    clock = Clock(NOW)
    app = create_app(VerifierSettings(db_url=db_url, rules_path=write_test_rules(tmp), admin_token=admin_token,
                                      clock=clock))
    with serve_in_thread(app, port=free_port()) as base_url:
        yield Console(base_url, engine, clock, agents)
    engine.dispose()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    with seeded_console(tmp_path_factory.mktemp("console")) as c:
        yield c


# ---- unit: passwords, sessions, strings ---------------------------------------------------------------------------
def test_password_hash_is_salted_scrypt_and_verifies_only_the_right_password() -> None:
    a, b = hash_password("s3cret-password"), hash_password("s3cret-password")
    assert a != b and a.startswith("scrypt$16384$8$1$")
    assert verify_password("s3cret-password", a)
    assert not verify_password("s3cret-passworD", a)
    assert not verify_password("s3cret-password", "md5$abc")


def test_forged_tampered_or_expired_session_is_refused(console: Console) -> None:
    key = b"k" * 32
    user = authenticate(console.engine, "official1", PASSWORD)
    assert user is not None and user.role == "official"
    cookie, session = issue_session(user, key, now=NOW)
    assert read_session(cookie, key, now=NOW) == session
    assert read_session(cookie, b"x" * 32, now=NOW) is None  # another deployment's key
    body, mac = cookie.split(".")
    forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
    assert read_session(forged, key, now=NOW) is None
    assert read_session(cookie, key, now=NOW + timedelta(hours=9)) is None
    assert authenticate(console.engine, "official1", "wrong-password-1") is None
    assert authenticate(console.engine, "nobody", PASSWORD) is None


def test_user_rules_are_enforced(console: Console) -> None:
    with pytest.raises(RequestInvalid, match="expected one for an operator"):
        add_user(console.engine, username="op-x", password=PASSWORD, role="operator", applicant_id=None, now=NOW)
    with pytest.raises(RequestInvalid, match="at least 10 characters"):
        add_user(console.engine, username="short", password="short", role="admin", applicant_id=None, now=NOW)
    with pytest.raises(RequestInvalid, match="already registered"):
        add_user(console.engine, username="admin1", password=PASSWORD, role="admin", applicant_id=None, now=NOW)


def test_every_template_string_exists_in_both_languages() -> None:
    used: set[str] = set()
    for path in TEMPLATES.glob("*.html"):
        used.update(re.findall(r"_\('([a-z_]+)'\s*[,)]", path.read_text(encoding="utf-8")))
    used.update(f"role_{r}" for r in ("admin", "official", "operator"))  # built as 'role_' ~ role
    used.update(f"kind_{k}" for k in ("platform", "node"))
    assert used, "no strings found in the templates"
    assert used - set(STRINGS) == set()
    assert all(zh and en and zh != en for zh, en in STRINGS.values() if not zh.isascii())


def test_numbers_and_dates_in_local_style() -> None:
    assert format_number(5_000_000, "zh") == "500 万" and format_number(5_000_000, "en") == "5,000,000"
    assert format_number(12_345, "zh") == "12,345"
    assert format_date(NOW.date(), "zh") == "2025年6月20日" and format_date(NOW.date(), "en") == "20 Jun 2025"


# ---- HTTP: who sees what ------------------------------------------------------------------------------------------
PAGES = {
    "applicants": "/console/applicants",
    "applicant": "/console/applicants/plat-1",
    "verdict": "/console/applicants/plat-1/verdict/2025.json",
    "admin": "/console/admin",
    "agents-plat": "/console/applicants/plat-1/agents",
    "agents-node": "/console/applicants/node-1/agents",
}
ALLOWED = {
    "admin1": {"admin", "agents-plat", "agents-node"},
    "official1": {"applicants", "applicant", "verdict", "agents-plat", "agents-node"},
    "operator1": {"agents-plat"},
}


@pytest.mark.parametrize("username", sorted(ALLOWED))
def test_each_role_sees_its_pages_and_gets_403_elsewhere(console: Console, username: str) -> None:
    with console.client(username) as c:
        for name, path in PAGES.items():
            r = c.get(path)
            expected = 200 if name in ALLOWED[username] else 403
            assert r.status_code == expected, f"{username} {path}: {r.status_code}"
            if expected == 403:
                assert "无权访问" in r.text


def test_anonymous_is_sent_to_login_and_a_wrong_password_does_not_sign_in(console: Console) -> None:
    with console.client() as c:
        r = c.get("/console/applicants")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
        r = login(c, "official1", "not-the-password")
        assert r.status_code == 303 and "failed=1" in r.headers["location"]
        assert "tp_session" not in c.cookies
        assert c.get("/console/applicants").status_code == 303


def test_forms_without_the_csrf_token_are_refused(console: Console) -> None:
    with console.client() as c:
        r = c.post("/console/login", data={"username": "official1", "password": PASSWORD})
        assert r.status_code == 403 and "tp_session" not in c.cookies
    with console.client("admin1") as c:
        r = c.post("/console/admin/applicants", data={"id": "evil", "name": "x", "kind": "platform",
                                                      "csrf": "guessed"})
        assert r.status_code == 403
        assert "evil" not in c.get("/console/admin").text


def test_admin_adds_an_applicant_and_issues_a_token_through_forms(console: Console) -> None:
    with console.client("admin1") as c:
        csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/console/admin").text)
        assert csrf
        r = c.post("/console/admin/applicants", data={"id": "plat-web", "name": "网页新增平台", "kind": "platform",
                                                      "csrf": csrf.group(1)})
        assert r.status_code == 200 and "已新增申报主体 plat-web" in r.text
        r = c.post("/console/admin/tokens", data={"applicant": "plat-web", "ttl_hours": "2", "csrf": csrf.group(1)})
        token = re.search(r'<code id="issued-token">([^<]+)</code>', r.text)
        assert token and len(token.group(1)) > 30
        r = c.post("/console/admin/applicants", data={"id": "plat-web", "name": "重复", "kind": "platform",
                                                      "csrf": csrf.group(1)})
        assert r.status_code == 400 and "操作被拒绝" in r.text
        key = generate_private_key()
        spare = enroll_agent(console.engine, token=token.group(1), public_key_b64=public_key_b64(key.public_key()),
                             agent_name="spare", now=NOW)
        r = c.post(f"/console/admin/agents/{spare.agent_id}/revoke", data={"reason": "测试吊销", "csrf": csrf.group(1)})
        assert r.status_code == 200 and f"已吊销代理 {spare.agent_id}" in r.text
        with console.engine.connect() as conn:
            row = conn.execute(select(agents.c.revoked_at).where(agents.c.agent_id == spare.agent_id)).one()
        assert row.revoked_at is not None


def test_operator_sees_only_its_own_agents_and_stale_ones_stand_out(console: Console) -> None:
    with console.client("operator1") as c:
        r = c.get("/console")
        assert r.status_code == 303 and r.headers["location"] == "/console/applicants/plat-1/agents"
        page = c.get("/console/applicants/plat-1/agents").text
        assert console.agents["main"] in page and console.agents["quiet"] in page
        assert console.agents["node"] not in page
        stale_rows = re.findall(r'<tr class="stale" data-agent="([^"]+)"', page)
        assert stale_rows == [console.agents["quiet"]]
        assert "timeout × 18" in page  # the last report's connector errors
        assert c.get("/console/applicants/node-1/agents").status_code == 403


def test_language_switch_translates_the_applicant_page(console: Console) -> None:
    with console.client("official1") as c:
        zh = c.get("/console/applicants/plat-1?year=2025").text
        assert '<html lang="zh-CN">' in zh and "现场抽查清单" in zh and "连接设备数超 1 万台" in zh
        r = c.get("/console/lang/en", params={"next": "/console/applicants/plat-1"})
        assert r.status_code == 303 and r.headers["location"] == "/console/applicants/plat-1"
        en = c.get("/console/applicants/plat-1?year=2025").text
        assert '<html lang="en">' in en and "On-site spot-check list" in en and "现场抽查清单" not in en
        assert "Connects more than 10,000 devices" in en and "10,000 line" in en
        assert "1 万 线" in zh
        assert c.get("/console/lang/en", params={"next": "https://evil.example/"}).headers["location"] == "/console"


def test_applicant_page_has_charts_evidence_and_a_reproducible_spot_check(console: Console) -> None:
    with console.client("official1") as c:
        page = c.get("/console/applicants/plat-1?year=2025").text
        for chart in ("chart-active", "chart-served", "chart-new-devices", "chart-new-users"):
            assert f'<svg class="chart" id="{chart}"' in page
        assert "https://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing from outside
        flags = page[page.index('id="anomaly-list"'):]
        assert "devices_never_active" in flags and "从未活跃的设备" in flags
        salt = re.search(r"抽样盐值: ([^<]+)</p>", page)
        assert salt
        fps = re.findall(r'<td class="mono small">([0-9a-f]{64})</td>', page)
        assert len(fps) == 20
        ranks = [hashlib.sha256(f"{salt.group(1)}|{fp}".encode()).hexdigest() for fp in fps]
        assert ranks == sorted(ranks)
        node = c.get("/console/applicants/node-1?year=2025").text
        assert 'id="chart-resolutions"' in node and "500 万 线" in node


def test_downloads_give_the_verdict_and_degrade_clearly_when_a_format_is_missing(console: Console) -> None:
    with console.client("official1") as c:
        r = c.get("/console/applicants/plat-1/verdict/2025.json")
        assert r.status_code == 200 and r.json()["applicant"]["id"] == "plat-1"
        assert "attachment" in r.headers["content-disposition"]
        for fmt in ("pdf", "xlsx", "csv", "json"):
            r = c.get(f"/console/applicants/plat-1/download/{fmt}", params={"year": 2025})
            assert r.status_code in (200, 404)
            if r.status_code == 200:  # the reports of verifier.reports, passed through
                assert "attachment" in r.headers["content-disposition"] and len(r.content) > 100
                if fmt == "pdf":
                    assert r.content.startswith(b"%PDF")
            else:
                assert "暂不可下载" in r.text and "核验结果（JSON）始终可以下载" in r.text
        assert c.get("/console/applicants/plat-1/download/exe", params={"year": 2025}).status_code == 404
        bundle = c.get("/console/applicants/plat-1/download/bundle", params={"year": 2025}, timeout=60)
        assert bundle.status_code in (200, 404)
        if bundle.status_code == 200:  # verifier.bundle's audit bundle, zipped
            assert bundle.content.startswith(b"PK") and "audit-bundle.zip" in bundle.headers["content-disposition"]
        else:
            assert "暂不可下载" in bundle.text


def test_downloads_work_on_a_verifier_without_an_admin_token(tmp_path: Path) -> None:
    """The console reads the reports in process with a token only that process knows, not the admin token (a
    deployment may run without one); the token opens no admin route."""
    with seeded_console(tmp_path, admin_token=None) as console, console.client("official1") as c:
        r = c.get("/console/applicants/plat-1/download/json", params={"year": 2025})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["applicant"]["id"] == "plat-1"
        assert httpx.get(f"{console.base_url}/v1/applicants/plat-1/eligibility", params={"year": 2025}).status_code \
            == 401  # from outside, reads still need a credential


def test_cli_adds_a_user_reading_the_password_from_stdin(console: Console, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import io

    db_url = str(console.engine.url)
    monkeypatch.setattr("sys.stdin", io.StringIO("another-long-password\n"))
    assert verifier_main(["--db", db_url, "user", "add", "--username", "official2", "--role", "official"]) == 0
    assert '"role": "official"' in capsys.readouterr().out
    assert authenticate(console.engine, "official2", "another-long-password") is not None
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert verifier_main(["--db", db_url, "user", "add", "--username", "official3", "--role", "official"]) == 2
    assert "at least 10 characters" in capsys.readouterr().err


def test_console_settings_from_the_environment_are_checked() -> None:
    from verifier.web import ConsoleSettings

    s = ConsoleSettings.from_env({"TIANPING_CONSOLE_SECURE_COOKIES": "1", "TIANPING_CONSOLE_STALE_AFTER_S": "600"})
    assert s.secure_cookies and s.stale_after == timedelta(minutes=10)
    assert not ConsoleSettings.from_env({}).secure_cookies
    with pytest.raises(ValueError, match="expected 60 to 2592000 seconds, got '5'"):
        ConsoleSettings.from_env({"TIANPING_CONSOLE_STALE_AFTER_S": "5"})


def test_gates_recorded_by_officials_appear_on_the_applicant_page(console: Console) -> None:
    r = httpx.post(f"{console.base_url}/v1/applicants/node-1/gates", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   json={"metric": "connected_to_top_level_node", "value": True, "recorded_by": "王审核",
                         "document_ref": "嘉经信〔2025〕12号"}, timeout=10)
    if r.status_code == 404:
        pytest.skip("this verifier has no gates API")
    assert r.status_code == 201, r.text
    with console.client("official1") as c:
        page = c.get("/console/applicants/node-1?year=2025").text
        gates = page[page.index('id="gates"'):]
        assert "connected_to_top_level_node" in gates and "王审核" in gates and "嘉经信〔2025〕12号" in gates

