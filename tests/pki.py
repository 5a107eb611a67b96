"""Certificates for the test control plane: one CA, serving and client certificates, the service-account key.

Kubernetes identifies a client certificate's user by its CN and its groups by its O fields (what kubeadm
and kind write), so every component and test user here is a certificate signed by this one CA.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = datetime.timedelta(days=365)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name([*parts, x509.NameAttribute(NameOID.COMMON_NAME, common)])


class Pki:
    """Files under `folder`: ca.crt/ca.key, sa.key/sa.pub, and `<name>.crt`/`<name>.key` per issued pair."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder().subject_name(_name("kubetune-test-ca")).issuer_name(_name("kubetune-test-ca"))
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.ca_key, hashes.SHA256()))
        self.ca = folder / "ca.crt"
        self.ca.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        (folder / "ca.key").write_bytes(_pem_key(self.ca_key))
        # Service-account tokens: the API server verifies with the public half, the controller manager and the
        # API server's TokenRequest sign with the private one.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key, self.sa_pub = folder / "sa.key", folder / "sa.pub"
        self.sa_key.write_bytes(_pem_key(sa_key))
        self.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))

    def issue(self, name: str, common: str, organizations: tuple[str, ...] = (), hosts: tuple[str, ...] = ()
              ) -> tuple[Path, Path]:
        """A key pair signed by the CA: a client certificate, or with `hosts` a serving one (DNS names or IPs)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if hosts else \
            [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder().subject_name(_name(common, organizations)).issuer_name(self.ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if hosts:
            alternative: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    alternative.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    alternative.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return cert_path, key_path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
