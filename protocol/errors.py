"""The protocol's error family. Every error carries a stable ``code``; the verifier maps codes to HTTP
statuses and to the sentence an operator or official reads. Messages say what was expected and what arrived."""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    code: ClassVar[str] = "protocol_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EnvelopeMalformed(ProtocolError):
    code = "envelope_malformed"


class EnvelopeNotCanonical(ProtocolError):
    code = "envelope_not_canonical"


class PayloadTypeUnsupported(ProtocolError):
    code = "payload_type_unsupported"


class KeyUnknown(ProtocolError):
    code = "key_unknown"


class SignatureInvalid(ProtocolError):
    code = "signature_invalid"


class SchemaInvalid(ProtocolError):
    code = "schema_invalid"


class TooLarge(ProtocolError):
    code = "too_large"
