"""The verifier's error family and the one table that maps every error code to an HTTP status and to the
sentence an operator or official reads (Simplified Chinese and English).

Errors from ``protocol`` (envelope, signature, schema, USCC, key format) keep their own codes; they appear in the
same table so that an HTTP answer is built the same way for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.errors import ProtocolError


class VerifierError(Exception):
    """Base of the verifier's errors: a stable ``code`` and a message saying what was expected and what came."""

    code: ClassVar[str] = "verifier_error"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail


# --- enrollment --------------------------------------------------------------------------------------------------
class TokenUnknown(VerifierError):
    code = "token_unknown"


class TokenUsed(VerifierError):
    code = "token_used"


class TokenExpired(VerifierError):
    code = "token_expired"


class KeyAlreadyEnrolled(VerifierError):
    code = "key_already_enrolled"


# --- reports -----------------------------------------------------------------------------------------------------
class KeyAgentMismatch(VerifierError):
    code = "key_agent_mismatch"


class AgentRevoked(VerifierError):
    code = "agent_revoked"


class SeqConflict(VerifierError):
    """A second, different envelope for a sequence number already accepted: equivocation."""

    code = "seq_conflict"

    def __init__(self, message: str, *, agent_id: str, seq: int, envelope_hash: str, accepted_envelope_hash: str,
                 expected_seq: int) -> None:
        super().__init__(message, expected_seq=expected_seq)
        self.agent_id = agent_id
        self.seq = seq
        self.envelope_hash = envelope_hash
        self.accepted_envelope_hash = accepted_envelope_hash


class SeqGap(VerifierError):
    code = "seq_gap"


class ChainBroken(VerifierError):
    code = "chain_broken"


class PeriodInFuture(VerifierError):
    code = "period_in_future"


class PeriodOverlap(VerifierError):
    code = "period_overlap"


class ContentTypeUnsupported(VerifierError):
    code = "content_type_unsupported"


class BatchInvalid(VerifierError):
    code = "batch_invalid"


# --- administration and lookups ------------------------------------------------------------------------------------
class AdminDisabled(VerifierError):
    code = "admin_disabled"


class AdminUnauthorized(VerifierError):
    code = "admin_unauthorized"


class RequestInvalid(VerifierError):
    code = "request_invalid"


class NotFound(VerifierError):
    code = "not_found"


class ApplicantUnknown(VerifierError):
    code = "applicant_unknown"


class ApplicantExists(VerifierError):
    code = "applicant_exists"


class EnterpriseUnknown(VerifierError):
    code = "enterprise_unknown"


class EnterpriseExists(VerifierError):
    code = "enterprise_exists"


class AgentUnknown(VerifierError):
    code = "agent_unknown"


class NotInitialized(VerifierError):
    code = "not_initialized"


# --- read credentials (issue 5): who may read an applicant's data -------------------------------------------------
class CredentialRequired(VerifierError):
    code = "credential_required"


class CredentialInvalid(VerifierError):
    """Unknown, revoked or expired: the request is not authenticated (401)."""

    code = "credential_invalid"


class CredentialForbidden(VerifierError):
    """Authenticated, but not for this applicant (403) — also when the applicant does not exist, so that an
    applicant's credential cannot tell which other applicants there are."""

    code = "credential_forbidden"


class CredentialUnknown(VerifierError):
    """An admin action named a credential id that does not exist (404)."""

    code = "credential_unknown"


class RuleFileInvalid(VerifierError):
    code = "rule_file_invalid"


@dataclass(frozen=True, slots=True)
class ErrorText:
    status: int
    zh: str
    en: str


# The one table: code -> HTTP status and the sentence a person reads.
ERRORS: dict[str, ErrorText] = {
    # protocol errors
    "too_large": ErrorText(413, "报告超过允许的大小", "The report is larger than allowed"),
    "envelope_malformed": ErrorText(400, "签名信封格式不正确", "The signed envelope is malformed"),
    "envelope_not_canonical": ErrorText(400, "签名信封不是规范化 JSON 字节",
                                        "The signed envelope is not canonical JSON"),
    "payload_type_unsupported": ErrorText(415, "不支持的载荷类型", "The payload type is not supported"),
    "key_unknown": ErrorText(403, "签名密钥未在本验证服务登记", "The signing key is not enrolled with this verifier"),
    "signature_invalid": ErrorText(403, "签名验证失败，内容可能被篡改", "The signature does not verify; the content "
                                   "may have been altered"),
    "schema_invalid": ErrorText(422, "报告内容不符合 v1 格式", "The report does not match schema v1"),
    "uscc_invalid": ErrorText(422, "统一社会信用代码无效", "The unified social credit code is invalid"),
    "key_format_invalid": ErrorText(422, "公钥格式无效", "The public key is not in the expected format"),
    "protocol_error": ErrorText(400, "协议错误", "Protocol error"),
    # enrollment
    "token_unknown": ErrorText(403, "登记令牌无效", "The enrollment token is not known"),
    "token_used": ErrorText(403, "登记令牌已被使用，每个令牌只能使用一次", "The enrollment token was already used; "
                            "each token works once"),
    "token_expired": ErrorText(403, "登记令牌已过期", "The enrollment token has expired"),
    "key_already_enrolled": ErrorText(409, "该公钥已经登记", "This public key is already enrolled"),
    # reports
    "key_agent_mismatch": ErrorText(403, "报告中的代理或密钥与签名密钥的登记不符",
                                    "The report's agent or key does not match the enrolled signing key"),
    "agent_revoked": ErrorText(403, "该代理已被吊销", "This agent has been revoked"),
    "seq_conflict": ErrorText(409, "同一序号已收到不同的报告，已留存为证据",
                              "A different report was already accepted for this sequence number; kept as evidence"),
    "seq_gap": ErrorText(409, "报告序号不连续", "The report's sequence number skips ahead"),
    "chain_broken": ErrorText(409, "报告未链接到上一份已接受的报告", "The report does not chain to the last accepted "
                              "report"),
    "period_in_future": ErrorText(422, "报告周期结束时间在未来", "The report's period ends in the future"),
    "period_overlap": ErrorText(422, "报告周期与上一份报告重叠", "The report's period overlaps the previous report"),
    "rate_limited": ErrorText(429, "该代理提交报告过于频繁，请按 Retry-After 稍后重试",
                              "Too many reports from this agent; retry after the Retry-After delay"),
    "checkpoint_inconsistent": ErrorText(500, "拒绝签署与已签检查点不一致的检查点：账本可能被回滚或改写",
                                         "Refused to sign a checkpoint inconsistent with one signed before: the ledger "
                                         "may have been rolled back or rewritten"),
    "content_type_unsupported": ErrorText(415, "请求内容类型不受支持", "The request content type is not supported"),
    "batch_invalid": ErrorText(422, "批量报告请求无效", "The batch of reports is invalid"),
    # administration and lookups
    "admin_disabled": ErrorText(403, "管理接口未启用：请设置环境变量 TIANPING_ADMIN_TOKEN",
                                "The admin endpoints are disabled: set the environment variable TIANPING_ADMIN_TOKEN"),
    "admin_unauthorized": ErrorText(401, "管理令牌缺失或错误", "The admin bearer token is missing or wrong"),
    "request_invalid": ErrorText(422, "请求内容无效", "The request is invalid"),
    "not_found": ErrorText(404, "未找到", "Not found"),
    "applicant_unknown": ErrorText(404, "申报主体不存在", "The applicant is not known"),
    "applicant_exists": ErrorText(409, "申报主体已存在", "The applicant already exists"),
    "enterprise_unknown": ErrorText(404, "该申报主体下没有此企业",
                                    "The enterprise is not registered for this applicant"),
    "enterprise_exists": ErrorText(409, "该企业已登记", "The enterprise is already registered"),
    "agent_unknown": ErrorText(404, "代理不存在", "The agent is not known"),
    "not_initialized": ErrorText(503, "数据库尚未初始化：请先运行 tianping-verifier init",
                                 "The database is not initialized: run tianping-verifier init first"),
    "rule_file_invalid": ErrorText(500, "规则文件无效", "The rule file is invalid"),
    # read credentials (issue 5)
    "credential_required": ErrorText(401, "需要访问凭据：请发送 'Authorization: Bearer <凭据>'",
                                     "A credential is required: send 'Authorization: Bearer <credential>'"),
    "credential_invalid": ErrorText(401, "访问凭据无效、已吊销或已过期",
                                    "The credential is not known, was revoked or has expired"),
    "credential_forbidden": ErrorText(403, "该访问凭据无权读取此申报主体的数据",
                                      "This credential does not give access to this applicant's data"),
    "credential_unknown": ErrorText(404, "访问凭据不存在", "The credential is not known"),
    "request_signature_invalid": ErrorText(401, "代理请求签名无效、过旧或已被使用",
                                           "The agent's request signature is malformed, too old, already used or "
                                           "does not verify"),
    "verifier_error": ErrorText(500, "验证服务内部错误", "Internal verifier error"),
    "internal_error": ErrorText(500, "验证服务内部错误", "Internal verifier error"),
}


def error_text(code: str) -> ErrorText:
    return ERRORS.get(code, ERRORS["verifier_error"])


def error_body(exc: VerifierError | ProtocolError) -> tuple[int, dict[str, Any]]:
    """HTTP status and the JSON body ``{"error": {"code", "message", "message_zh", ...detail}}`` for an error."""
    text = error_text(exc.code)
    body: dict[str, Any] = {
        "code": exc.code,
        "message": f"{text.en}: {exc.message}",
        "message_zh": f"{text.zh}：{exc.message}",
    }
    if isinstance(exc, VerifierError):
        body.update(exc.detail)
    return text.status, {"error": body}
