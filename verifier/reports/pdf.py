"""The report as a PDF (reportlab), in Simplified Chinese (or English), with a TrueType CJK font embedded (subset):
WenQuanYi Zen Hei from the Debian package ``fonts-wqy-zenhei`` by default, or the TrueType file named by the
environment variable ``TIANPING_CJK_FONT`` (reportlab embeds TrueType outlines only, not CFF/OpenType ones)."""

from __future__ import annotations

import io
import logging
import os
from html import escape
from pathlib import Path
from typing import Any

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import LongTable, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from verifier.i18n import Lang, pick, t
from verifier.reports import Report

log = logging.getLogger(__name__)

FONT_ENV = "TIANPING_CJK_FONT"
FONT_NAME = "TianpingCJK"
FONT_CANDIDATES: tuple[str, ...] = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
)
MAX_PDF_DEVICES = 500


class FontMissing(RuntimeError):
    pass


def register_font() -> str:
    """Register the CJK font once; return its name. Raises FontMissing naming what to install."""
    if FONT_NAME in pdfmetrics.getRegisteredFontNames():
        return FONT_NAME
    explicit = os.environ.get(FONT_ENV)
    candidates = [explicit] if explicit else list(FONT_CANDIDATES)
    for path in candidates:
        if path and Path(path).is_file():
            pdfmetrics.registerFont(TTFont(FONT_NAME, path, subfontIndex=0))
            log.info("PDF reports use the CJK font %s", path)
            return FONT_NAME
    raise FontMissing(f"CJK TrueType font: expected one of {candidates} (Debian: apt-get install fonts-wqy-zenhei, "
                      f"or set {FONT_ENV}), got none")


def _styles(font: str) -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("base", fontName=font, fontSize=8, leading=10.5, wordWrap="CJK")
    return {"base": base,
            "title": ParagraphStyle("title", parent=base, fontSize=15, leading=20, spaceAfter=6),
            "h2": ParagraphStyle("h2", parent=base, fontSize=11.5, leading=15, spaceBefore=8, spaceAfter=4),
            "head": ParagraphStyle("head", parent=base, textColor=colors.white)}


def _fmt(value: Any, lang: Lang) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return t("yes" if value else "no", lang)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def _yuan(text: str | None) -> str:
    if text is None:
        return "—"
    whole, _, frac = text.partition(".")
    return f"{int(whole):,}" + (f".{frac}" if frac else "")


def _table(header: list[str], body: list[list[str]], st: dict[str, ParagraphStyle], widths: list[float],
           long: bool = False) -> Table:
    data = [[Paragraph(escape(h), st["head"]) for h in header]]
    data += [[Paragraph(escape(c), st["base"]) for c in row] for row in body]
    cls = LongTable if long else Table
    table = cls(data, colWidths=widths, repeatRows=1)
    table.setStyle(TableStyle([
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#2f4f6f")),
        ("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
        ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ("ROWBACKGROUNDS", (0, 1), (-1, -1), [colors.white, colors.HexColor("#f2f5f8")]),
    ]))
    return table


def _result(passed: bool | None, lang: Lang) -> str:
    return t("not_recorded", lang) if passed is None else t("pass" if passed else "fail", lang)


def to_pdf(report: Report, *, lang: Lang = "zh") -> bytes:
    """The report as PDF bytes. ``lang``: "zh" (default) or "en" ("both" prints Chinese then English)."""
    font = register_font()
    st = _styles(font)
    d = report.data
    L: Lang = lang
    app = d["applicant"]
    story: list[Any] = [
        Paragraph(escape(t("report_title", L, name=app["name"], id=app["id"], year=d["year"])), st["title"]),
        Paragraph(escape(f"{t('policy', L)}: {pick(d['policy']['title'], L)} ({d['policy'].get('source', '')})"),
                  st["base"]),
        Spacer(1, 4 * mm),
        Paragraph(escape(t("summary", L)), st["h2"]),
    ]
    w = 277 * mm  # A4 landscape minus margins
    body = []
    for c in d["summary"]:
        wd = c["window_dates"] or {}
        body.append([str(c["measure"]), pick(c["label"], L), f"{c['window']} {wd.get('start', '')}–{wd.get('end', '')}",
                     f"{c['operator']} {_fmt(c['threshold'], L)} {c['unit']}", _fmt(c["value"], L),
                     _result(c["passed"], L), pick(c["definition"], L), c["evidence"]])
    story.append(_table([t(k, L) for k in ("measure", "criterion", "window", "threshold", "value", "result",
                                           "definition", "evidence")], body, st,
                        [w * f for f in (0.04, 0.14, 0.12, 0.11, 0.08, 0.06, 0.3, 0.15)]))
    story.append(Paragraph(escape(t("awards", L)), st["h2"]))
    body = []
    for a in d["awards"]:
        caps = ", ".join(f"{c['cap']} {_yuan(c['limit_yuan'])}" for c in a["caps_applied"]) or "—"
        status = t("superseded", L) if a["superseded_by"] else (
            t("not_recorded", L) if a["eligible"] is None else t("eligible" if a["eligible"] else "not_eligible", L))
        body.append([str(a["measure"]), pick(a["label"], L), _yuan(a["computed_yuan"]), caps, _yuan(a["amount_yuan"]),
                     status, _yuan(a["payable_yuan"])])
    story.append(_table([t(k, L) for k in ("measure", "award", "computed", "caps", "amount", "result", "payable")],
                        body, st, [w * f for f in (0.05, 0.33, 0.12, 0.15, 0.12, 0.11, 0.12)]))
    story.append(Paragraph(escape(f"{t('total_payable', L)}: {_yuan(d['total_payable_yuan'])}"), st["base"]))
    if d["monthly"]:
        story.append(Paragraph(escape(t("monthly", L)), st["h2"]))
        body = [[m["month"], _fmt(m["new_registrations"], L), _fmt(m["cumulative_registrations"], L),
                 _fmt(m["resolutions"], L), _fmt(m["daily_average_resolutions"], L)] for m in d["monthly"]]
        story.append(_table([t(k, L) for k in ("month", "new_registrations", "cumulative_registrations",
                                               "resolutions", "daily_average")], body, st, [w * 0.2] * 5))
    if d["enterprises"]:
        story.append(Paragraph(escape(t("enterprises", L)), st["h2"]))
        body = [[e["uscc"], e["name"] or "—", _fmt(e["devices"], L), _fmt(e["connected_devices"], L),
                 _fmt(e["active_device_days"], L)] for e in d["enterprises"]]
        story.append(_table([t(k, L) for k in ("uscc", "name", "device_count", "connected_count", "active_days")],
                            body, st, [w * f for f in (0.2, 0.35, 0.15, 0.15, 0.15)], long=True))
    story.append(Paragraph(escape(t("anomalies", L)), st["h2"]))
    if d["anomalies"]:
        body = [[x["flag"], _fmt(x["count"], L), pick(x["detail"], L)] for x in d["anomalies"]]
        story.append(_table([t(k, L) for k in ("flag", "count", "detail")], body, st,
                            [w * f for f in (0.25, 0.1, 0.65)]))
    else:
        story.append(Paragraph(escape(t("no_anomalies", L)), st["base"]))
    story.append(Paragraph(escape(t("integrity", L)), st["h2"]))
    integ = d["integrity"]
    cp = integ.get("checkpoint")
    cp_text = f"size {cp['size']}, root {cp['root']}, {cp['signed_at']}" if cp else t("not_available", L)
    basis = integ["basis"]
    body = [[t("basis", L), ", ".join(f"{k}={v}" for k, v in basis.items())],
            [t("ledger_size", L), _fmt(integ["ledger_size"], L)],
            [t("checkpoint", L), cp_text],
            [t("bundle_hash", L), integ.get("bundle_sha256") or t("not_available", L)],
            ["policy sha256", integ["policy_sha256"]],
            [t("generated_at", L), integ["generated_at"]]]
    story.append(_table(["", ""], body, st, [w * 0.2, w * 0.8]))
    if d["devices"]:
        story.append(PageBreak())
        story.append(Paragraph(escape(t("devices", L)), st["h2"]))
        shown = d["devices"][:MAX_PDF_DEVICES]
        if len(shown) < len(d["devices"]):
            story.append(Paragraph(escape(t("devices_truncated", L, shown=len(shown), total=len(d["devices"]))),
                                   st["base"]))
        body = [[x["fp"][:20] + "…", x["enterprise"] or "—", x["enterprise_name"] or "—", ", ".join(x["protocols"]),
                 x["first_seen"], x["last_seen"], _fmt(x["active_days"], L), t("yes" if x["counted"] else "no", L)]
                for x in shown]
        story.append(_table([t(k, L) for k in ("fingerprint", "uscc", "enterprise", "protocols", "first_seen",
                                               "last_seen", "active_days", "counted")], body, st,
                            [w * f for f in (0.17, 0.16, 0.2, 0.12, 0.1, 0.1, 0.08, 0.07)], long=True))
    buf = io.BytesIO()
    title = t("report_title", L, name=app["name"], id=app["id"], year=d["year"])
    doc = SimpleDocTemplate(buf, pagesize=landscape(A4), leftMargin=10 * mm, rightMargin=10 * mm,
                            topMargin=10 * mm, bottomMargin=10 * mm, title=title, author="Tianping verifier",
                            lang="zh-CN" if L != "en" else "en")
    doc.build(story)
    return buf.getvalue()
