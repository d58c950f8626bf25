"""``vtick topology certs DIR``: a self-signed certificate and key for tls+tcp:// links.

For a test network, not a PKI: one EC P-256 key and a certificate for the name "vtick"
(what a vCPU checks, proto/transport.py ``TLS_SERVER_NAME``) plus any extra names given,
signed by itself, so the same file is the host's certificate and the vCPUs' CA.  Made
with the ``cryptography`` package when it is installed, else with the system
``openssl``; neither is a vtick dependency (nng does the TLS itself, with Mbed TLS).
The key is written 0600 in a directory created 0700; an existing pair is kept unless
``--force``.  The token is still required on every link: TLS authenticates the host and
hides the traffic, the token authenticates the vCPU.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys

__all__ = ["certs_main", "make_pair", "CERT_NAME", "KEY_NAME"]

CERT_NAME = "vtick-cert.pem"
KEY_NAME = "vtick-key.pem"
SERVER_NAME = "vtick"


class CertError(Exception):
    """The pair could not be made; one line."""


def make_pair(directory: str, names: list[str], days: int, force: bool = False) -> str:
    """Write ``vtick-cert.pem`` and ``vtick-key.pem`` into ``directory``; returns which
    tool made them ("cryptography" or "openssl").

    Raises:
        CertError: an existing pair without ``force``, a bad name, no tool, a failure.
    """
    cert = os.path.join(directory, CERT_NAME)
    key = os.path.join(directory, KEY_NAME)
    if not force and (os.path.exists(cert) or os.path.exists(key)):
        raise CertError(f"{directory} already holds {CERT_NAME}/{KEY_NAME} (--force replaces them)")
    sans: list[tuple[str, str]] = [("DNS", SERVER_NAME)]
    for name in names:
        try:
            sans.append(("IP", str(ipaddress.ip_address(name))))
        except ValueError:
            if not name or any(c.isspace() or c in ",/" for c in name):
                raise CertError(f"--name {name!r}: not a host name or an IP address") from None
            sans.append(("DNS", name))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        _with_openssl(cert, key, sans, days)
        return "openssl"
    _with_cryptography(cert, key, sans, days)
    return "cryptography"


def _with_cryptography(cert: str, key: str, sans: list[tuple[str, str]], days: int) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    alt = [
        x509.IPAddress(ipaddress.ip_address(v)) if kind == "IP" else x509.DNSName(v)
        for kind, v in sans
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    _write(key, private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ), 0o600)  # fmt: skip
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def _with_openssl(cert: str, key: str, sans: list[tuple[str, str]], days: int) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertError(
            "neither the cryptography package nor the openssl command is installed "
            "(pip install cryptography, or apt-get install openssl)"
        )
    tmp_key = key + ".tmp"
    cmd = [
        openssl, "req", "-x509", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", tmp_key, "-out", cert, "-days", str(days),
        "-subj", f"/CN={SERVER_NAME}",
        "-addext", "subjectAltName=" + ",".join(f"{k}:{v}" for k, v in sans),
        "-addext", "basicConstraints=critical,CA:TRUE",
    ]  # fmt: skip
    old = os.umask(0o077)  # the key is never readable by others, not even for a moment
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        os.umask(old)
    if proc.returncode != 0:
        for path in (tmp_key, cert):
            if os.path.exists(path):
                os.remove(path)
        why = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise CertError(f"openssl: {why}")
    os.chmod(tmp_key, 0o600)
    os.replace(tmp_key, key)
    os.chmod(cert, 0o644)


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def certs_main(directory: str, names: list[str], days: int, force: bool) -> int:
    try:
        tool = make_pair(directory, names, days, force)
    except (CertError, OSError) as exc:
        print(f"vtick topology certs: {exc}", file=sys.stderr)
        return 2
    cert = os.path.join(directory, CERT_NAME)
    key = os.path.join(directory, KEY_NAME)
    print(f"certificate: {cert}\nkey:         {key} (mode 0600)\nmade with {tool}; in a topology:")
    print(f'[tls]\ncert = "{cert}"\nkey = "{key}"')
    return 0
