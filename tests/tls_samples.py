"""A throwaway CA and serving certificate for 127.0.0.1, written to files as the agent reads them."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from flowmon_operator.pki import generate_ca, issue_serving_cert


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path
    ca: tuple[str, str]

    def reissue(self, name: str) -> None:
        """A new serving certificate (new CN) in place: what a rotation does."""
        pair = issue_serving_cert(self.ca, [name, "localhost"], ["127.0.0.1", "::1"])
        self.key_file.write_text(pair.key_pem)
        self.cert_file.write_text(pair.cert_pem)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_pki(directory: Path, name: str = "agent-one") -> Pki:
    ca = generate_ca("flowmon-test-ca")
    pki = Pki(directory / "ca.crt", directory / "tls.crt", directory / "tls.key", (ca.cert_pem, ca.key_pem))
    pki.ca_file.write_text(ca.cert_pem)
    pki.reissue(name)
    return pki
