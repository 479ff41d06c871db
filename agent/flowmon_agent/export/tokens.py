"""Bearer tokens as they arrive: in an `Authorization` header, or one per line in a token file.

Both are hostile input. A header that is not exactly `Bearer <token68>` (RFC 6750: ASCII letters, digits
and `-._~+/`, then `=` padding) carries no token: the request gets a 401, whatever bytes it held. A token
file that is not ASCII, holds a line that is not a token, or holds no token at all (a truncated write) is
refused as a whole, and the caller keeps the tokens it had. No message here ever quotes a token.
"""

from __future__ import annotations

import re
from pathlib import Path

TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_FILE_BYTES = 1024 * 1024


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why without quoting its content."""


def bearer_token(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None (no header, another scheme, bad bytes)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip(" \t")
    if scheme.lower() != "bearer" or not TOKEN68.fullmatch(token):
        return None
    return token


def parse_token_file(data: bytes) -> list[str]:
    """Pure: a token file's bytes → its tokens (one per line, blank lines ignored), or TokenFileError."""
    lines = data.split(b"\n")
    tokens = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip(b" \t\r")
        if not line:
            continue
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            raise TokenFileError(f"line {number} is not ASCII text") from None
        if not TOKEN68.fullmatch(text):
            raise TokenFileError(f"line {number} is not a bearer token (RFC 6750 characters only)")
        tokens.append(text)
    if not tokens:
        raise TokenFileError("it holds no token (empty or truncated)")
    return tokens


def read_token_file(path: Path) -> list[str]:
    """The tokens of a file (OSError when unreadable, TokenFileError when unusable)."""
    with open(path, "rb") as file:
        data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise TokenFileError(f"it is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    return parse_token_file(data)
