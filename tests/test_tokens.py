"""Bearer tokens as hostile input: the Authorization header and token files (flowmon_agent.export.tokens)."""

from __future__ import annotations

import pytest

from flowmon_agent.export.tokens import (
    MAX_TOKEN_FILE_BYTES,
    TokenFileError,
    bearer_token,
    parse_token_file,
    read_token_file,
)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Bearer eyJhbGciOi.eyJpc3Mi-_.sig+/==", "eyJhbGciOi.eyJpc3Mi-_.sig+/=="),  # a JWT, padding
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
        ("Bearer t\udcffk", None),  # invalid UTF-8 as aiohttp decodes it (surrogateescape)
        ("Bearer tök", None),  # non-ASCII
        ("Bearer a b", None),  # two words
        ("Bearer a=b", None),  # '=' only as padding at the end
        ("Bearer a\x00", None),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_token_file_lines():
    assert parse_token_file(b"one\r\n\n  two  \nthree") == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"good\n\xff\xfesecret-part\n", "line 2 is not ASCII"),
        (b"caf\xc3\xa9-token\n", "line 1 is not ASCII"),  # valid UTF-8, still not a token
        (b"", "no token"),  # a truncated write
        (b"\n  \n", "no token"),
        (b"has space inside\n", "line 1 is not a bearer token"),
    ],
)
def test_unusable_token_files_are_refused_without_quoting_them(data, message):
    with pytest.raises(TokenFileError, match=message) as err:
        parse_token_file(data)
    assert "secret" not in str(err.value) and "inside" not in str(err.value)


def test_a_huge_token_file_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_bytes(b"a" * (MAX_TOKEN_FILE_BYTES + 1))
    with pytest.raises(TokenFileError, match="larger than"):
        read_token_file(path)
