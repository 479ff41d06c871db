"""The agent's TLS server settings (Mozilla "intermediate") and certificate rotation without a broken pair.

A rotation writes the certificate and the key as two files, so for a moment the files on disk may not
match. Loading them into the live `SSLContext` would leave it half-changed (OpenSSL keeps the new
certificate and drops the key: every handshake fails). Instead each candidate pair is loaded into a
scratch context, and only a context that loaded completely replaces the live one; new connections take
whatever context is live when they arrive, open ones keep theirs.
"""

from __future__ import annotations

import ssl
from pathlib import Path

# Mozilla "intermediate" for TLS 1.2, without the DHE suites: ECDHE key exchange and AEAD ciphers only
# (no CBC, no SHA-1 MACs, no static RSA key exchange). TLS 1.3 suites are all AEAD with (EC)DHE.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A complete server context for this pair; raises (OSError, ssl.SSLError) when the pair is unusable,
    e.g. a certificate whose public key is not the key file's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    # No TLS compression (CRIME) and no renegotiation (a client-driven CPU cost).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(cert, key)
    return context


class ServingContext:
    """Holds the live context; `reload()` swaps in a new one only if the files on disk form a valid pair."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.context = server_context(cert, key)  # at start a bad pair is an error, not a fallback
        self.reloads = 0

    def reload(self) -> None:
        """Raises (OSError, ssl.SSLError, ValueError) and keeps the live context when the pair is bad."""
        self.context = server_context(self.cert, self.key)
        self.reloads += 1
