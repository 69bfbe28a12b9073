"""TLS for REST and channels alike: verification on by default against the operating system's trust
store (truststore: the Windows certificate store on a PI host), plus an optional CA bundle; turning
verification off takes an explicit option and is logged loudly at every start.
"""

from __future__ import annotations

import os
import ssl
import tempfile

import structlog

from ..errors import ConfigError

log = structlog.get_logger(__name__)


def client_context(ca_bundle: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    if insecure:
        log.warning("tls_verification_disabled",
                    warning="server certificates are NOT checked: anyone on the network path can read "
                            "and alter the data and the credentials; use --ca-bundle instead")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        import truststore

        context = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    except ImportError:  # pragma: no cover - truststore is a dependency
        context = ssl.create_default_context()
    if ca_bundle:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except FileNotFoundError:
            raise ConfigError(f"CA bundle {ca_bundle!r} not found: check --ca-bundle") from None
        except ssl.SSLError as exc:
            raise ConfigError(f"CA bundle {ca_bundle!r} holds no usable PEM certificate ({exc.reason}): "
                              "check --ca-bundle") from exc
    return context


def certificate_issuer(host: str, port: int, timeout: float = 5.0) -> str | None:
    """Who issued the certificate a server presents (fetched without verifying it), for error messages."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(pem)
            decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
        finally:
            os.unlink(path)
    except (OSError, ssl.SSLError, ValueError):
        return None
    parts = [f"{k}={v}" for rdn in decoded.get("issuer", ()) for k, v in rdn]
    return ", ".join(parts) or None
