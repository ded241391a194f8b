"""TLS for deployment: a federation's CA and certificates, and the gRPC credentials built from them.

``make_certs`` writes a directory: ``ca.pem``/``ca-key.pem`` (the federation's CA),
``coordinator.pem``/``coordinator-key.pem`` (server certificate for localhost, 127.0.0.1 and
the given host names) and ``<node>.pem``/``<node>-key.pem`` per node (client certificates).
The coordinator requires a client certificate from the same CA (mutual TLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shoal.errors import ConfigError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "COORDINATOR_CERT",
    "COORDINATOR_KEY",
    "CertFiles",
    "ClientTLS",
    "ServerTLS",
    "make_certs",
    "node_cert_paths",
]

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
COORDINATOR_CERT = "coordinator.pem"
COORDINATOR_KEY = "coordinator-key.pem"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class CertFiles:
    """What :func:`make_certs` wrote (or found and reused)."""

    directory: Path
    ca: Path
    coordinator: Path
    nodes: dict[str, Path] = field(default_factory=dict)
    created: tuple[Path, ...] = ()


def node_cert_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """(certificate, private key) paths of node ``name`` in a certificate directory."""
    d = Path(directory)
    return d / f"{name}.pem", d / f"{name}-key.pem"


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name in ("ca", "coordinator"):
        raise ConfigError(
            f"certificate name {name!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(and not 'ca' or 'coordinator')"
        )
    return name


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    *,
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    is_ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    usage: Sequence[x509.ObjectIdentifier] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer = ca_cert.subject if ca_cert is not None else name
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        assert ca_cert is not None
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        ).add_extension(x509.ExtendedKeyUsage(list(usage)), False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), False)
    return builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", host):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read the CA in {str(directory)!r}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{str(directory / CA_KEY)!r} is not an EC private key")
    return cert, key


def make_certs(
    directory: str | os.PathLike[str],
    *,
    nodes: Sequence[str] = (),
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> CertFiles:
    """Create (or extend) a federation's certificate directory.

    An existing CA in ``directory`` is reused, so running it again with ``nodes=["new"]``
    issues a certificate for a node that joins later. The coordinator certificate is
    (re)issued when missing or when ``hosts`` are given. Existing node certificates are kept
    unless ``force``.
    """
    if days < 1:
        raise ConfigError(f"certificates must be valid for at least 1 day, got {days}")
    names = [_check_name(n) for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError("node names must be unique")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if (d / CA_CERT).exists() and (d / CA_KEY).exists():
        ca_cert, ca_key = _load_ca(d)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(
            subject="shoal federation CA",
            key=ca_key,
            ca_cert=None,
            ca_key=ca_key,
            days=days,
            is_ca=True,
        )
        _write_private(d / CA_KEY, ca_key)
        _write_cert(d / CA_CERT, ca_cert)
        created += [d / CA_CERT, d / CA_KEY]
    if hosts or not (d / COORDINATOR_CERT).exists() or not (d / COORDINATOR_KEY).exists():
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        sans.append(x509.IPAddress(ipaddress.ip_address("::1")))
        for host in hosts:
            general = _general_name(host)
            if general not in sans:
                sans.append(general)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject="shoal coordinator",
            key=key,
            ca_cert=ca_cert,
            ca_key=ca_key,
            days=days,
            sans=sans,
            usage=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        _write_private(d / COORDINATOR_KEY, key)
        _write_cert(d / COORDINATOR_CERT, cert)
        created += [d / COORDINATOR_CERT, d / COORDINATOR_KEY]
    node_paths: dict[str, Path] = {}
    for name in names:
        cert_path, key_path = node_cert_paths(d, name)
        node_paths[name] = cert_path
        if cert_path.exists() and key_path.exists() and not force:
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(
            subject=name,
            key=key,
            ca_cert=ca_cert,
            ca_key=ca_key,
            days=days,
            usage=[ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        _write_private(key_path, key)
        _write_cert(cert_path, cert)
        created += [cert_path, key_path]
    return CertFiles(
        directory=d,
        ca=d / CA_CERT,
        coordinator=d / COORDINATOR_CERT,
        nodes=node_paths,
        created=tuple(created),
    )


def _load_chain(context: ssl.SSLContext, certificate: bytes, private_key: bytes) -> None:
    """Load a certificate and key held in memory (``ssl`` only reads them from files).

    On Linux they go through an anonymous memory file, so the key never touches a disk;
    elsewhere through a private temporary directory, removed at once.
    """
    pem = certificate.rstrip(b"\n") + b"\n" + private_key
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shoal-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="shoal-tls-") as tmp:
        path = Path(tmp) / "chain.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        context.load_cert_chain(path)


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ConfigError(
            f"{what} {str(path)!r} not found; create the certificates with `shoal certs --out "
            f"{path.parent}` (or run without TLS, for testing only, with --insecure)"
        )
    return path.read_bytes()


@dataclass(frozen=True, kw_only=True)
class ServerTLS:
    """The coordinator's certificate and key, and the CA its nodes' certificates must chain to."""

    certificate: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes = field(repr=False)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> ServerTLS:
        d = Path(directory)
        return cls(
            certificate=_read(d / COORDINATOR_CERT, "coordinator certificate"),
            private_key=_read(d / COORDINATOR_KEY, "coordinator key"),
            client_ca=_read(d / CA_CERT, "CA certificate"),
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Mutual TLS for the coordinator's sockets (the front door, which ends TLS before
        gRPC, and the bulk lane): client certificates of the federation's CA required."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            _load_chain(context, self.certificate, self.private_key)
            context.load_verify_locations(cadata=self.client_ca.decode("ascii"))
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"the coordinator's TLS files are unusable ({exc}); re-create them with "
                "`shoal certs`"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
        # TLS 1.2 lets a client ask to renegotiate, a full handshake's work for the server
        # each time, on a connection the door already admitted: refused.
        context.options |= ssl.OP_NO_RENEGOTIATION
        return context


@dataclass(frozen=True, kw_only=True)
class ClientTLS:
    """What a node needs: the federation CA, its own certificate and key.

    ``server_name`` overrides the name checked against the coordinator's certificate (when
    the node dials an address the certificate does not list).
    """

    ca: bytes = field(repr=False)
    certificate: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    @classmethod
    def from_dir(
        cls,
        directory: str | os.PathLike[str],
        *,
        name: str | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        """Load ``ca.pem`` and node ``name``'s certificate (``<name>.pem``, ``<name>-key.pem``)."""
        d = Path(directory)
        ca = _read(d / CA_CERT, "CA certificate")
        if name is None:
            return cls(ca=ca, server_name=server_name)
        cert_path, key_path = node_cert_paths(d, name)
        if not cert_path.is_file():
            found = sorted(
                p.name[: -len(".pem")]
                for p in d.glob("*.pem")
                if not p.name.endswith("-key.pem") and p.name not in (CA_CERT, COORDINATOR_CERT)
            )
            raise ConfigError(
                f"no certificate for node {name!r} in {str(d)!r} (node certificates there: "
                f"{found or 'none'}); issue one with `shoal certs --out {d} --node {name}` or "
                "pick one with --cert-name"
            )
        return cls(
            ca=ca,
            certificate=cert_path.read_bytes(),
            private_key=_read(key_path, "node TLS key"),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.certificate,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The same TLS for Python sockets (the bulk lane): verifies the coordinator, shows ours."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_verify_locations(cadata=self.ca.decode("ascii"))
            if self.certificate is not None and self.private_key is not None:
                _load_chain(context, self.certificate, self.private_key)
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"this node's TLS files are unusable ({exc}); re-issue them with `shoal certs`"
            ) from None
        return context
