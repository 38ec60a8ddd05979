"""DICOM TLS contexts (PS3.15 Annex B.9 BCP 195 and B.12 Non-downgrading BCP 195 profiles).

Both profiles ask for TLS 1.2 or later, no renegotiation, no compression, and
(for TLS 1.2) the ECDHE/DHE AES-GCM suites listed below; TLS 1.3 suites are
OpenSSL's defaults. dcmtk's ``+tls`` tools use B.12 unless told otherwise.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from triage_core.settings import Destination, Settings

#: PS3.15 B.12 (TLS 1.2 part), plus the ECDSA variants B.9 allows.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256",
    "DHE-RSA-AES256-GCM-SHA384",
])


class TLSConfigurationError(ValueError):
    """A certificate, key or CA file cannot be used; the message names it."""


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigurationError(f"TLS certificate {cert_file} / key {key_file} cannot be used: {exc}") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigurationError(f"TLS CA file {ca_file} cannot be used: {exc}") from exc


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS listener's context: our certificate, and client certificates verified when asked."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise TLSConfigurationError("the TLS listener needs CXR_TRIAGE_TLS_CERT_FILE and CXR_TRIAGE_TLS_KEY_FILE")
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(context, settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_verify_clients:
        assert settings.tls_ca_file is not None  # Settings refuses tls_verify_clients without it
        _load_ca(context, settings.tls_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings, destination: Destination) -> tuple[ssl.SSLContext, str]:
    """(context, server name) for an association to a TLS destination: the peer's certificate is
    verified against the destination's ``ca=``, else CXR_TRIAGE_TLS_CA_FILE, else the system's CAs,
    and its name against ``server_name=`` or the host; our certificate goes along when configured."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    ca_file = Path(destination.ca_file) if destination.ca_file else settings.tls_ca_file
    if ca_file:
        _load_ca(context, ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.tls_cert_file and settings.tls_key_file:
        _load_chain(context, settings.tls_cert_file, settings.tls_key_file)
    return context, destination.server_name or destination.host


def peer_summary(sock: ssl.SSLSocket) -> dict[str, str]:
    """Protocol, cipher and the client certificate's subject CN, for logs and audit (no patient data)."""
    cipher = sock.cipher()
    summary = {"tls_version": sock.version() or "", "tls_cipher": cipher[0] if cipher else ""}
    try:
        certificate = sock.getpeercert()
    except (ValueError, ssl.SSLError):
        certificate = None
    if certificate:
        for rdn in certificate.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    summary["tls_client_cn"] = value
    return summary
