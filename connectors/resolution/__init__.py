"""Identifier-resolution traffic from HANDLE.NET access logs: a tailing connector and offline counting."""

from connectors.resolution.connector import (
    DEFAULTS,
    CheckpointError,
    ResolutionLogConfig,
    ResolutionLogConnector,
    defaults,
)
from connectors.resolution.handle_log import (
    HandleLogCounter,
    LogLine,
    MalformedLineError,
    count_files,
    daily_totals,
    parse_line,
)

__all__ = [
    "DEFAULTS",
    "CheckpointError",
    "HandleLogCounter",
    "LogLine",
    "MalformedLineError",
    "ResolutionLogConfig",
    "ResolutionLogConnector",
    "count_files",
    "daily_totals",
    "defaults",
    "parse_line",
]
