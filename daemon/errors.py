"""One error type whose `code` means the same thing on the CLI, over MQTT and over HTTP."""

from __future__ import annotations

ERROR_CODES = (
    "bad_request",
    "unknown_method",
    "too_large",
    "unsupported_media",
    "busy",
    "deadline_exceeded",
    "cancelled",
    "model_unavailable",
    "internal",
)


class EdgeError(Exception):
    """A failure the caller can act on; the message names the field and the fix."""

    def __init__(self, code: str, message: str, param: str | None = None):
        """`param` names the request field at fault, where there is one (OpenAI's `error.param`)."""
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.param:
            body["param"] = self.param
        return body


class CommandError(Exception):
    """Bad input to a command-line command: printed as one line naming the flag, exit status 2."""
