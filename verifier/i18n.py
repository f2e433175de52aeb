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
