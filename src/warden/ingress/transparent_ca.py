"""The certificate authority transparent mode signs host certificates with.

Either generated on first use in ``transparent.ca_dir`` (mitmproxy's file
layout, so mitmproxy reads it as its own: ``mitmproxy-ca.pem`` holds the key
and certificate, mode 0600; ``mitmproxy-ca-cert.pem`` the certificate alone),
or read from ``ca_cert_file`` / ``ca_key_file`` (e.g. a mounted Kubernetes
Secret), which are never copied. Agents trust the certificate that
``warden ca export`` prints.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs

from warden.config import TransparentConfig
from warden.errors import ConfigError

__all__ = ["CA_BASENAME", "ca_certificate_pem", "ensure_ca", "load_store"]

log = logging.getLogger("warden.transparent")

CA_BASENAME = "mitmproxy"
"""mitmproxy's name for its CA files; the directory is its ``confdir``."""
_ORGANIZATION = "Warden"
_COMMON_NAME = "Warden transparent mode CA"
_KEY_SIZE = 2048
_PRIVATE = stat.S_IRUSR | stat.S_IWUSR  # 0600


def _key_file(directory: Path) -> Path:
    return directory / f"{CA_BASENAME}-ca.pem"


def _cert_file(directory: Path) -> Path:
    return directory / f"{CA_BASENAME}-ca-cert.pem"


def ensure_ca(cfg: TransparentConfig) -> Path:
    """The CA directory, with a CA generated there on first use; returns it.

    A configured certificate and key are checked (they must be a pair) and
    left where they are. Generated key files are (made) 0600 and the
    directory 0700; a generated key readable by others is tightened, with a
    warning.
    """
    directory = Path(cfg.ca_dir).expanduser()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if cfg.ca_cert_file is not None:
            _read_pair(cfg)
            return directory
        if not _key_file(directory).exists():
            certs.CertStore.create_store(
                directory, CA_BASENAME, _KEY_SIZE, organization=_ORGANIZATION, cn=_COMMON_NAME
            )
            log.info("generated the transparent mode CA in %s", directory)
        for secret in (_key_file(directory), directory / f"{CA_BASENAME}-ca.p12"):
            if secret.exists() and secret.stat().st_mode & 0o077:
                log.warning("%s was readable by others; set to 0600", secret)
                secret.chmod(_PRIVATE)
    except OSError as exc:
        raise ConfigError(f"transparent.ca_dir {directory}: {exc.strerror or exc}") from None
    return directory


def _read_pair(cfg: TransparentConfig) -> tuple[bytes, bytes]:
    assert cfg.ca_cert_file is not None
    assert cfg.ca_key_file is not None
    try:
        cert_pem = Path(cfg.ca_cert_file).read_bytes()
        key_pem = Path(cfg.ca_key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"transparent CA: cannot read {exc.filename}: {exc.strerror or exc}"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"transparent CA: not a PEM certificate and unencrypted PEM key: {exc}"
        ) from None
    if Path(cfg.ca_key_file).stat().st_mode & 0o077:
        # A Secret volume is 0644 unless defaultMode says otherwise: say so, once per read.
        log.warning("transparent.ca_key_file %s is readable by others", cfg.ca_key_file)
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ConfigError("transparent.ca_key_file is not the key of transparent.ca_cert_file")
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def load_store(cfg: TransparentConfig) -> certs.CertStore:
    """The mitmproxy certificate store signing host certificates with the CA."""
    directory = ensure_ca(cfg)
    try:
        if cfg.ca_cert_file is None:
            return certs.CertStore.from_store(directory, CA_BASENAME, _KEY_SIZE)
        cert_pem, key_pem = _read_pair(cfg)
        key = certs.load_pem_private_key(key_pem, None)
        ca = certs.Cert.from_pem(cert_pem)
        dhparams = certs.CertStore.load_dhparam(directory / f"{CA_BASENAME}-dhparam.pem")
        return certs.CertStore(key, ca, None, certs.dummy_crl(key, ca._cert), dhparams)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"transparent CA in {directory}: {exc}") from None


def ca_certificate_pem(cfg: TransparentConfig) -> bytes:
    """The CA certificate (PEM) that agents must trust; generates the CA if needed."""
    if cfg.ca_cert_file is not None:
        return _read_pair(cfg)[0]
    directory = ensure_ca(cfg)
    try:
        return _cert_file(directory).read_bytes()
    except OSError as exc:
        raise ConfigError(f"transparent CA in {directory}: {exc.strerror or exc}") from None
