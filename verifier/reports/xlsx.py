"""The report as an XLSX workbook (openpyxl): one sheet per table, the same columns and values as the CSV, numbers
as numbers (yuan amounts as exact decimals), plus an integrity sheet."""

from __future__ import annotations

import io
import json
import logging
from decimal import Decimal
from typing import Any

from openpyxl import Workbook
from openpyxl.styles import Font

from verifier.i18n import Lang, t
from verifier.reports import CSV_TABLES, Report, rows

log = logging.getLogger(__name__)

_AMOUNTS = {"computed_yuan", "amount_yuan", "payable_yuan"}


def _value(column: str, value: Any) -> Any:
    if value is None:
        return None
    if column in _AMOUNTS:
        return Decimal(value)
    if isinstance(value, bool):
        return "✓" if value else "✗"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True) if value else ""
    return value


def to_xlsx(report: Report, *, lang: Lang = "zh") -> bytes:
    wb = Workbook()
    first = True
    for table in CSV_TABLES:
        ws = wb.active if first else wb.create_sheet()
        assert ws is not None
        first = False
        ws.title = t(table, "zh" if lang == "zh" else "en")
        columns, body = rows(report, table)
        ws.append(list(columns))
        for cell in ws[1]:
            cell.font = Font(bold=True)
        for row in body:
            ws.append([_value(c, v) for c, v in zip(columns, row, strict=True)])
        ws.freeze_panes = "A2"
    ws = wb.create_sheet(t("integrity", "zh" if lang == "zh" else "en"))
    integrity = report.data["integrity"]
    ws.append(["key", "value"])
    for key, value in integrity.items():
        ws.append([key, json.dumps(value, ensure_ascii=False, sort_keys=True) if isinstance(value, dict)
                   else value])
    ws.append(["total_payable_yuan", Decimal(report.data["total_payable_yuan"])])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
