"""Words the verifier shows people, in Simplified Chinese and English. (Error sentences live in the one error
table, ``verifier.errors.ERRORS``.)"""

from __future__ import annotations

from typing import Literal

Lang = Literal["zh", "en", "both"]
LANGS: tuple[str, ...] = ("zh", "en", "both")

STRINGS: dict[str, tuple[str, str]] = {
    "measure": ("措施", "Measure"),
    "criterion": ("条件", "Criterion"),
    "value": ("实测值", "Measured"),
    "threshold": ("门槛", "Threshold"),
    "result": ("结果", "Result"),
    "pass": ("通过", "pass"),
    "fail": ("未通过", "fail"),
    "not_recorded": ("未记录", "not recorded"),
    "award": ("奖励", "Award"),
    "amount": ("金额（元）", "Amount (yuan)"),
    "eligible": ("符合", "eligible"),
    "not_eligible": ("不符合", "not eligible"),
    "superseded": ("已由更高档替代", "superseded by the higher tier"),
    "verdict_title": ("{name}（{id}）{year} 年度资格核验", "{name} ({id}): eligibility for {year}"),
    "policy": ("政策", "Policy"),
    "beside": ("参考数据", "Figures beside the verdict"),
    "flags_beside": ("异常提示（按天计，仅供参考，不改变计数）",
                     "Anomaly flags (agent-days; they inform, never change a count)"),
    "no_applicants": ("尚无申报主体", "No applicants registered"),
}


def t(key: str, lang: Lang, **fmt: object) -> str:
    """The string for ``key``; for "both", Chinese first then English on the next line."""
    zh, en = STRINGS[key]
    zh, en = zh.format(**fmt), en.format(**fmt)
    if lang == "zh":
        return zh
    if lang == "en":
        return en
    return f"{zh}\n{en}"


def pick(text: dict[str, str], lang: Lang) -> str:
    """A {"zh", "en"} text in the chosen language(s)."""
    if lang == "both":
        return f"{text['zh']}\n{text['en']}"
    return text[lang]


# ---- issue 6: reports -------------------------------------------------------------------------------------------
STRINGS.update({
    "report_title": ("{name}（{id}）{year} 年度核验报告", "{name} ({id}): verification report for {year}"),
    "summary": ("汇总表", "Summary"),
    "awards": ("奖励计算", "Awards"),
    "devices": ("设备清单", "Devices"),
    "enterprises": ("企业清单", "Enterprises"),
    "monthly": ("节点月度数据", "Node monthly table"),
    "anomalies": ("异常标记", "Anomaly flags"),
    "integrity": ("完整性", "Integrity"),
    "no_anomalies": ("无异常标记", "No anomaly flags"),
    "window": ("统计窗口", "Window"),
    "operator": ("比较", "Operator"),
    "definition": ("定义", "Definition"),
    "evidence": ("证据", "Evidence"),
    "aggregation": ("汇总方式", "Aggregation"),
    "computed": ("计算金额（元）", "Computed (yuan)"),
    "caps": ("封顶", "Caps applied"),
    "payable": ("应付金额（元）", "Payable (yuan)"),
    "total_payable": ("应付合计（元）", "Total payable (yuan)"),
    "fingerprint": ("设备指纹", "Fingerprint"),
    "enterprise": ("企业", "Enterprise"),
    "uscc": ("统一社会信用代码", "Unified social credit code"),
    "protocols": ("协议", "Protocols"),
    "first_seen": ("首次出现", "First seen"),
    "last_seen": ("最后出现", "Last seen"),
    "active_days": ("活跃天数", "Active days"),
    "counted": ("计入", "Counted"),
    "name": ("名称", "Name"),
    "device_count": ("设备数", "Devices"),
    "connected_count": ("计入连接设备数", "Connected devices"),
    "month": ("月份", "Month"),
    "new_registrations": ("新增注册量", "New registrations"),
    "cumulative_registrations": ("累计注册量", "Cumulative registrations"),
    "resolutions": ("成功解析量", "Resolutions"),
    "daily_average": ("日均解析量", "Daily average"),
    "flag": ("标记", "Flag"),
    "count": ("数量", "Count"),
    "detail": ("说明", "Detail"),
    "checkpoint": ("检查点", "Checkpoint"),
    "ledger_size": ("账本条目数", "Ledger size"),
    "bundle_hash": ("审计包哈希", "Bundle hash"),
    "generated_at": ("生成时间", "Generated at"),
    "basis": ("依据", "Basis"),
    "not_available": ("暂无", "not available"),
    "devices_truncated": ("仅列出前 {shown} 台（共 {total} 台）；完整清单见 XLSX/CSV。",
                          "First {shown} of {total} devices listed; the full list is in the XLSX/CSV."),
    "yes": ("是", "yes"),
    "no": ("否", "no"),
})
