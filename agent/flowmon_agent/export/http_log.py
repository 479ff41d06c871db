"""The logger aiohttp's server protocol writes to: a malformed request is the client's doing, not an error.

aiohttp logs every request it cannot parse at ERROR with a traceback whose message quotes the offending
bytes, e.g. an `Authorization` header with its token: any pod could fill the log, with secrets. Here such
a request is counted and logged at DEBUG as its status and error type only; everything else (a bug in a
handler: a 500) passes through unchanged, traceback included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError


class ClientErrorLog(logging.LoggerAdapter):
    def __init__(self, logger: logging.Logger, on_malformed: Callable[[], None]) -> None:
        super().__init__(logger, {})
        self._on_malformed = on_malformed

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self._on_malformed()
            self.logger.debug("malformed request refused: HTTP %s, %s", exc.code, type(exc).__name__)
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs
