"""The agent's error family; each error carries a stable code."""

from __future__ import annotations

from typing import ClassVar


class AgentError(Exception):
    code: ClassVar[str] = "agent_error"


class AgentConfigError(AgentError, ValueError):
    code = "config_invalid"


class NotEnrolled(AgentError):
    code = "not_enrolled"


class EnrollmentRefused(AgentError):
    code = "enrollment_refused"


class DeliveryRefused(AgentError):
    """The verifier refused a report for a reason retrying cannot fix (a 4xx other than 408/429)."""

    code = "delivery_refused"


class OutboxFull(AgentError):
    code = "outbox_full"
