"""A self-signed certificate for the launcher's HAProxy (``wss://127.0.0.1``/``localhost``).

HAProxy's ``crt`` takes one PEM file with the certificate and its key; clients trust the
certificate itself (it is its own CA).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path, days: int = 30) -> tuple[Path, Path]:
    """Write ``cert.pem`` (the certificate: trust it) and ``haproxy.pem`` (certificate and
    key, for ``bind ... ssl crt``) in ``directory``; returns their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat cluster (local)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, bundle = directory / "cert.pem", directory / "haproxy.pem"
    cert_path.write_bytes(cert_pem)
    bundle.touch(mode=0o600)
    bundle.write_bytes(cert_pem + key_pem)
    return cert_path, bundle


def main(argv: list[str] | None = None) -> int:
    """``python -m chat.cluster.tls DIR``: make a certificate for docker compose
    (``deploy/certs/haproxy.pem``; a real deployment mounts its own)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m chat.cluster.tls", description=main.__doc__)
    p.add_argument("directory", type=Path)
    p.add_argument("--days", type=int, default=30)
    args = p.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    cert, bundle = self_signed(args.directory, args.days)
    bundle.chmod(0o644)  # the haproxy image reads it as user haproxy; it is a dev cert
    print(f"wrote {cert} (trust this) and {bundle} (HAProxy's crt)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
