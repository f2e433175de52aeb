"""Every word the console shows, in Simplified Chinese (the default) and English, and the local styles of dates and
numbers. A test checks that every key used by the templates exists in both languages."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from verifier.facts import SHANGHAI

ConsoleLang = Literal["zh", "en"]
CONSOLE_LANGS: tuple[ConsoleLang, ...] = ("zh", "en")

STRINGS: dict[str, tuple[str, str]] = {
    "app_title": ("天平 · 核验控制台", "Tianping · verification console"),
    "skip": ("跳到主要内容", "Skip to main content"),
    "nav_applicants": ("申报主体", "Applicants"),
    "nav_admin": ("管理", "Administration"),
    "nav_agents": ("代理", "Agents"),
    "lang_switch": ("English", "中文"),
    "lang_switch_label": ("切换到英文", "Switch to Chinese"),
    "signed_in_as": ("当前用户：{user}（{role}）", "Signed in as {user} ({role})"),
    "logout": ("退出登录", "Sign out"),
    "role_admin": ("管理员", "administrator"),
    "role_official": ("审核人员", "official"),
    "role_operator": ("运营方", "operator"),
    "login_title": ("登录", "Sign in"),
    "username": ("用户名", "User name"),
    "password": ("密码", "Password"),
    "login_button": ("登录", "Sign in"),
    "login_failed": ("用户名或密码不正确。", "The user name or password is wrong."),
    "csrf_failed": ("表单已过期，请重新提交。", "The form expired; please submit it again."),
    "forbidden_title": ("无权访问", "Access denied"),
    "forbidden_text": ("您的角色无权查看此页面。", "Your role may not see this page."),
    "not_found_title": ("未找到", "Not found"),
    "back_home": ("返回首页", "Back to the start page"),
    "applicants_title": ("申报主体一览（{year} 年度）", "Applicants ({year})"),
    "id": ("编号", "ID"),
    "name": ("名称", "Name"),
    "kind": ("类型", "Kind"),
    "kind_platform": ("工业互联网平台", "industrial-internet platform"),
    "kind_node": ("标识解析二级节点", "identifier-resolution node"),
    "measure_n": ("措施 {n}", "Measure {n}"),
    "criteria_passed": ("{passed}/{total} 项条件通过", "{passed} of {total} criteria met"),
    "award_eligible": ("符合：{award}", "Eligible: {award}"),
    "award_none": ("暂不符合", "Not eligible yet"),
    "not_applicable": ("不适用", "n/a"),
    "agents": ("代理", "Agents"),
    "view": ("查看", "Open"),
    "no_applicants": ("尚无申报主体。", "No applicants registered."),
    "applicant_title": ("{name}（{id}）", "{name} ({id})"),
    "year": ("年度", "Year"),
    "show": ("显示", "Show"),
    "verdict": ("资格核验", "Eligibility"),
    "policy": ("政策：{title}", "Policy: {title}"),
    "window_end": ("统计截至 {day}", "Figures up to {day}"),
    "criterion": ("条件", "Criterion"),
    "value": ("实测值", "Measured"),
    "threshold": ("门槛", "Threshold"),
    "result": ("结果", "Result"),
    "pass": ("通过", "met"),
    "fail": ("未通过", "not met"),
    "not_recorded": ("未记录", "not recorded"),
    "definition": ("口径", "Definition"),
    "award": ("奖励", "Award"),
    "amount": ("金额（元）", "Amount (yuan)"),
    "eligible": ("符合", "eligible"),
    "not_eligible": ("不符合", "not eligible"),
    "superseded": ("已由更高档替代", "superseded by the higher tier"),
    "charts": ("逐日数据", "Day by day"),
    "chart_active": ("每日活跃设备数", "Active devices per day"),
    "chart_served": ("每日服务企业数", "Enterprises served per day"),
    "chart_resolutions": ("每日成功解析量", "Successful resolutions per day"),
    "chart_new": ("年度累计新增设备与用户", "New devices and users in the year (cumulative)"),
    "chart_new_devices": ("累计新增设备", "New devices so far"),
    "chart_new_users": ("累计新增用户", "New users so far"),
    "line": ("{value} 线", "{value} line"),
    "gates": ("审核人员记录的条件", "Conditions recorded by officials"),
    "no_gates": ("尚无记录。", "Nothing recorded yet."),
    "gate_metric": ("事项", "Item"),
    "gate_by": ("记录人", "Recorded by"),
    "gate_document": ("依据文件", "Document"),
    "gate_at": ("记录时间", "Recorded at"),
    "anomalies": ("异常提示", "Anomaly flags"),
    "no_anomalies": ("本年度无异常提示。", "No anomaly flags for this year."),
    "evidence": ("数据依据", "Evidence behind the figures"),
    "evidence_entries": ("账本条目（本年度报告）", "Ledger entries (reports of the year)"),
    "evidence_late": ("其中迟到报告", "of which late"),
    "evidence_policy_sha": ("规则文件 SHA-256", "Rule file SHA-256"),
    "beside_registered_devices": ("登记设备数", "Registered devices"),
    "beside_reachable_devices": ("可达设备数", "Reachable devices"),
    "beside_active_devices": ("活跃过的设备数", "Devices active at least once"),
    "beside_active_device_days": ("活跃设备日合计", "Active device-days"),
    "beside_connected_devices": ("计入的连接设备数", "Connected devices counted"),
    "beside_served_enterprises": ("计入的服务企业数", "Served enterprises counted"),
    "beside_window_end": ("统计截止日", "Window ends"),
    "beside_days_in_year": ("年度天数", "Days in the year"),
    "beside_successful_resolutions": ("成功解析总量", "Successful resolutions"),
    "beside_failed_resolutions": ("失败解析总量", "Failed resolutions"),
    "beside_successful_deletes": ("成功删除量", "Successful deletes"),
    "beside_days_with_resolutions": ("有解析的天数", "Days with resolutions"),
    "beside_median_daily_resolutions": ("日解析量中位数", "Median daily resolutions"),
    "beside_peak_daily_resolutions": ("单日解析峰值", "Peak daily resolutions"),
    "beside_peak_day": ("峰值日", "Peak day"),
    "figure": ("指标", "Figure"),
    "spot_check": ("现场抽查清单", "On-site spot-check list"),
    "spot_check_intro": ("以下 {n} 台设备由账本头哈希选出（共 {population} 台活跃设备），请现场逐台核对。",
                         "These {n} devices were selected by the ledger head's hash (from {population} active "
                         "devices); check each one on site."),
    "spot_check_salt": ("抽样盐值", "Selection salt"),
    "fingerprint": ("设备指纹", "Device fingerprint"),
    "enterprise": ("企业", "Enterprise"),
    "last_active": ("最近活跃日", "Last active"),
    "active_days": ("活跃天数", "Active days"),
    "protocols": ("协议", "Protocols"),
    "checked": ("已核对", "Checked"),
    "no_devices": ("本年度尚无活跃设备。", "No active devices this year."),
    "downloads": ("下载", "Downloads"),
    "download_json": ("核验结果（JSON）", "Verdict (JSON)"),
    "download_report": ("年度报告（{fmt}）", "Annual report ({fmt})"),
    "download_bundle": ("审计包", "Audit bundle"),
    "download_missing_title": ("暂不可下载", "Not available"),
    "download_missing": ("此核验服务尚未提供“{what}”。核验结果（JSON）始终可以下载。",
                         "This verifier does not offer “{what}” yet. The verdict (JSON) can always be downloaded."),
    "agents_title": ("{name} 的代理", "Agents of {name}"),
    "agent": ("代理", "Agent"),
    "last_report": ("最近报告", "Last report"),
    "never": ("从未", "never"),
    "reports": ("报告数", "Reports"),
    "outbox_depth": ("待发队列", "Outbox depth"),
    "not_reported": ("未上报", "not reported"),
    "connector_errors": ("连接器错误", "Connector errors"),
    "no_errors": ("无", "none"),
    "key_status": ("密钥状态", "Key status"),
    "key_active": ("有效", "active"),
    "key_revoked": ("已吊销（{at}）", "revoked ({at})"),
    "stale": ("已失联", "stale"),
    "stale_note": ("超过 {hours} 小时未收到报告的代理标为“已失联”。",
                   "Agents with no report for more than {hours} hours are marked stale."),
    "no_agents": ("尚无已注册的代理。", "No agents enrolled."),
    "status": ("状态", "Status"),
    "ok": ("正常", "ok"),
    "admin_title": ("管理", "Administration"),
    "add_applicant": ("新增申报主体", "Add an applicant"),
    "add_enterprise": ("新增企业", "Add an enterprise"),
    "issue_token": ("签发注册令牌", "Issue an enrollment token"),
    "uscc": ("统一社会信用代码", "Unified social credit code"),
    "applicant": ("申报主体", "Applicant"),
    "enterprise_optional": ("企业（可选）", "Enterprise (optional)"),
    "ttl_hours": ("有效期（小时）", "Valid for (hours)"),
    "submit_add": ("新增", "Add"),
    "submit_issue": ("签发", "Issue"),
    "revoke": ("吊销", "Revoke"),
    "reason": ("原因", "Reason"),
    "token_issued": ("注册令牌（仅显示一次）：", "Enrollment token (shown once):"),
    "token_expires": ("有效期至 {at}", "Valid until {at}"),
    "done_applicant": ("已新增申报主体 {id}。", "Applicant {id} added."),
    "done_enterprise": ("已新增企业 {uscc}。", "Enterprise {uscc} added."),
    "done_revoke": ("已吊销代理 {id}。", "Agent {id} revoked."),
    "refused": ("操作被拒绝：{message}", "Refused: {message}"),
    "enterprises": ("企业", "Enterprises"),
}


def text(key: str, lang: ConsoleLang, **fmt: object) -> str:
    zh, en = STRINGS[key]
    return (zh if lang == "zh" else en).format(**fmt)


def format_number(value: float | int | None, lang: ConsoleLang) -> str:
    """Grouped digits; in Chinese, whole multiples of 10,000 as 万 (5,000,000 → 500 万)."""
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    n = int(value)
    if lang == "zh" and n != 0 and n % 10_000 == 0:
        return f"{n // 10_000:,} 万"
    return f"{n:,}"


_EN_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_date(day: date | None, lang: ConsoleLang) -> str:
    if day is None:
        return "—"
    if lang == "zh":
        return f"{day.year}年{day.month}月{day.day}日"
    return f"{day.day} {_EN_MONTHS[day.month - 1]} {day.year}"


def format_short_date(day: date, lang: ConsoleLang) -> str:
    return f"{day.month}月{day.day}日" if lang == "zh" else f"{day.day} {_EN_MONTHS[day.month - 1]}"


def format_datetime(moment: datetime | None, lang: ConsoleLang) -> str:
    """A moment in Asia/Shanghai, in the language's style."""
    if moment is None:
        return "—"
    local = moment.astimezone(SHANGHAI)
    return f"{format_date(local.date(), lang)} {local:%H:%M}"
