"""Measure 2 evidence on the verifier side: sketches merged across reports, anomaly flags raised by the simulated
node's adversarial modes (and not by its organic traffic), salted samples recomputed, Merkle roots checked."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent.rollup import PeriodRollup
from connectors.base import ResolutionBatch
from connectors.resolution.handle_log import HandleLogCounter, LineAssembler, count_files
from protocol.merkle import ProofInvalid, inclusion_proof, leaf_hash
from protocol.report import GENESIS_HASH, Period, ReportV1, ResolutionSummary, parse_report
from protocol.sampling import record_hash, sample_key, stage1, stage2
from simulator.resolution_node import SHANGHAI, ResolutionNode
from verifier.node_evidence import (
    DayEvidence,
    anomaly_flags,
    day_evidence,
    estimate,
    merge_sketches,
    new_identifiers_root,
    refused_samples,
    sample_selected,
    verify_new_identifier,
)

ZONE = ZoneInfo("Asia/Shanghai")
SALT = b"salt issued by the verifier, 32 bytes"
DAY = date(2026, 11, 25)  # a Wednesday
START = datetime(2026, 11, 25, 0, 0, tzinfo=SHANGHAI)


def counter_over(path: Path, *, salt: bytes | None = SALT, sample_log2: int = 8) -> HandleLogCounter:
    counter = HandleLogCounter(salt=salt, zone=ZONE, resolution_sample_log2=sample_log2,
                               registration_sample_log2=7)
    asm = LineAssembler()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            asm.push(chunk, counter)
    asm.finish(counter)
    return counter


def report_of(counter: HandleLogCounter, seq: int = 1, prev: str = GENESIS_HASH) -> ReportV1:
    """A report as the agent builds it (rollup → resolution summary), round-tripped through its bytes."""
    rollup = PeriodRollup(b"k" * 32)
    rollup.add_resolution(ResolutionBatch(
        source="access.log", buckets=tuple(counter.buckets()), lines_read=counter.lines,
        created_handles=tuple(counter.created_handles()), created=tuple(counter.created()),
        day_shapes=dict(counter.shapes),
    ))
    summary = rollup.resolution_summary(has_source=True)
    assert isinstance(summary, ResolutionSummary)
    report = ReportV1(agent_id="node-1", key_id="a" * 64, seq=seq, prev_hash=prev,
                      period=Period(start=START, end=START + timedelta(days=1)),
                      created_at=START + timedelta(days=1), resolution=summary)
    return parse_report(report.to_bytes())


def evidence_for(node: ResolutionNode, **kw: object) -> DayEvidence:
    report = report_of(counter_over(node.path, **kw))  # type: ignore[arg-type]
    return day_evidence([report], ZONE)[DAY]


@pytest.fixture(scope="module")
def organic(tmp_path_factory: pytest.TempPathFactory) -> ResolutionNode:
    node = ResolutionNode(tmp_path_factory.mktemp("organic"), seed=21, prefixes=200)
    node.write_day(DAY, 60_000)
    return node


def test_organic_day_raises_no_flag_and_reports_its_shape(organic: ResolutionNode) -> None:
    ev = evidence_for(organic)
    truth = organic.ground_truth().days[DAY.isoformat()]
    assert ev.resolutions_ok == truth.resolutions_ok
    assert anomaly_flags(ev) == []
    assert len(ev.top_clients) == 10 and ev.share_of_top(3) < 0.5  # heavy-tailed enterprise clients
    assert 0 < ev.share_of_top(1, networks=True) < 0.5
    assert ev.hourly_ok[3] * 5 < ev.hourly_ok[10]  # night is quiet, mid-morning is busy
    assert ev.replay_duplicates == 0 < ev.replay_tracked
    assert ev.new_tracked > 0


def test_distinct_identifiers_and_clients_are_estimated_within_hll_error(organic: ResolutionNode) -> None:
    ev = evidence_for(organic)
    lines = organic.path.read_text().splitlines()
    ok = [ln.split(" ")[8] for ln in lines if ln.split(" ")[4:6] == ["1", "1"] and len(ln.split(" ")) == 9]
    from urllib.parse import unquote

    exact_ids = len({unquote(h) for h in ok})
    exact_clients = len({ln.split(" ")[0] for ln in lines if len(ln.split(" ")) == 9})
    assert abs(ev.distinct_identifiers - exact_ids) <= 0.05 * exact_ids
    assert abs(ev.distinct_clients - exact_clients) <= 0.05 * exact_clients


def test_sketches_merge_across_reports_to_the_sketch_of_the_whole(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=22)
    node.write_lines(3000, start=START, spacing_s=10.0)
    first = counter_over(node.path)
    node.rotate()
    node.write_lines(3000, start=START + timedelta(hours=10), spacing_s=10.0)
    second = counter_over(node.path)
    whole = HandleLogCounter(zone=ZONE)
    whole.merge(first)
    whole.merge(second)
    a, b = report_of(first), report_of(second, seq=2, prev="b" * 64)
    merged = day_evidence([a, b], ZONE)[DAY]
    alone = whole.shapes[DAY.isoformat()]
    assert estimate(merged.identifiers_sketch) == pytest.approx(alone.ids.get_estimate())
    assert estimate(merged.clients_sketch) == pytest.approx(alone.clients.get_estimate())
    assert estimate(merge_sketches([])) == 0.0


def test_flat_scripted_loop_from_a_few_clients_is_flagged(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=23)
    node.write_day(DAY, 3000)
    node.write_loop(40_000, start=START, spacing_s=86_400 / 40_000, clients=3, handles=20)
    flags = {f.code: f for f in anomaly_flags(evidence_for(node))}
    assert "flat_loop" in flags
    assert flags["flat_loop"].value > 0.5


def test_replayed_lines_are_flagged_and_still_counted(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=24)
    node.write_day(DAY, 30_000)
    node.write_replay(6_000)
    counter = counter_over(node.path)
    days = count_files([node.path], workers=1)["days"]
    assert days == {d: t.as_dict() for d, t in node.ground_truth().days.items()}  # counts are not changed
    flags = {f.code for f in anomaly_flags(day_evidence([report_of(counter)], ZONE)[DAY])}
    assert "replayed_lines" in flags


def test_bulk_registrations_never_resolved_are_flagged(tmp_path: Path) -> None:
    node = ResolutionNode(tmp_path, seed=25, create_ratio=0.0)
    node.write_day(DAY, 20_000)
    node.write_bulk_unresolved(5_000, start=START + timedelta(hours=3), spacing_s=0.5)
    ev = evidence_for(node)
    assert ev.new_tracked > 1000 and ev.new_resolved == 0
    assert [f.code for f in anomaly_flags(ev)] == ["bulk_unresolved"]


def test_salted_samples_are_recomputed_by_the_verifier(organic: ResolutionNode) -> None:
    ev = evidence_for(organic)
    assert ev.resolution_samples and ev.registration_samples
    assert refused_samples(SALT, ev) == []
    every = ev.resolution_samples + ev.registration_samples
    assert len(refused_samples(b"another salt", ev)) >= len(every) - 3  # another salt picks other lines
    picked = ev.resolution_samples[0]
    forged = picked.replace(picked.split(" ")[0], "192.0.2.1", 1)
    assert not sample_selected(SALT, forged, ev.resolution_sample_log2) or forged == picked


def test_sample_selection_of_agent_and_verifier_agree_line_by_line(organic: ResolutionNode) -> None:
    k1 = sample_key(SALT)
    checked = 0
    for raw in organic.path.read_bytes().splitlines()[:20_000]:
        f = raw.split(b" ")
        if len(f) != 9 or f[5] != b"1":
            continue
        from urllib.parse import unquote_to_bytes

        stamp = datetime.strptime((f[2] + b" " + f[3]).decode(), '"%Y-%m-%d %H:%M:%S.%f%z"')
        utc_ms = (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        digits = f[6][:-2]
        rec = record_hash(f[0], unquote_to_bytes(f[8]), utc_ms, int(f[4]), int(f[5]), int.from_bytes(digits, "little"))
        agent = stage1(rec, k1) and stage2(SALT, raw, 8)
        assert agent == sample_selected(SALT, raw, 8)
        checked += agent
    assert checked > 5


def test_samples_out_of_proportion_are_flagged(organic: ResolutionNode) -> None:
    ev = evidence_for(organic)
    ev.resolution_samples = ev.resolution_samples[:1]
    assert "samples_inconsistent" in {f.code for f in anomaly_flags(ev)}


def test_new_identifiers_root_matches_the_agent_and_proves_a_drawn_identifier(organic: ResolutionNode) -> None:
    report = report_of(counter_over(organic.path))
    handles = sorted(set(organic.ground_truth().new_registrations))
    assert report.resolution is not None
    assert report.resolution.new_identifiers_root == new_identifiers_root(handles)
    assert report.resolution.new_identifiers_count == len(handles)
    leaves = [leaf_hash(h.encode()) for h in handles]
    i = len(handles) // 3
    verify_new_identifier(handles[i], i, len(handles), inclusion_proof(leaves, i),
                          report.resolution.new_identifiers_root)
    with pytest.raises(ProofInvalid, match=r"(?i)root"):
        verify_new_identifier("88.1.1/not-registered", i, len(handles), inclusion_proof(leaves, i),
                              report.resolution.new_identifiers_root)


def test_old_reports_without_the_new_fields_still_parse() -> None:
    report = ReportV1(agent_id="a", key_id="a" * 64, seq=1, prev_hash=GENESIS_HASH,
                      period=Period(start=START, end=START + timedelta(hours=1)), created_at=START,
                      resolution=ResolutionSummary(lines_read=3))
    payload = report.to_bytes().replace(b',"days":[]', b"").replace(b',"gaps":[]', b"")
    payload = payload.replace(b',"new_identifiers_count":0', b"").replace(b',"new_identifiers_root":null', b"")
    assert b"days" not in payload
    parsed = parse_report(payload)
    assert parsed.resolution is not None and parsed.resolution.days == ()
    assert day_evidence([parsed], ZONE) == {}
