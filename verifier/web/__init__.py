"""The officials' web console (issue 7): ``mount_console`` adds it to the verifier's FastAPI app."""

from verifier.web.console import ConsoleSettings, mount_console

__all__ = ["ConsoleSettings", "mount_console"]
