"""The API's error answer: a `Status` object with an HTTP code."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error the API answers with a `Status` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: Mapping | None = None,
        metadata: Mapping | None = None,  # ListMeta, e.g. the continue token of a 410 on a list
    ):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, dict(details or {})
        self.metadata = dict(metadata or {})

    def status(self) -> dict:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": self.metadata,
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }
