"""Keys for the JWT tests: made fresh, written out as PEM the way an issuer would."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A new RSA private key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    """A new EC private key, on P-256 unless ``curve`` says otherwise."""
    return ec.generate_private_key(curve or ec.SECP256R1())


def pem_public(key: PrivateKey) -> str:
    """The public half of ``key`` as a PEM ``PUBLIC KEY`` block."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pem_private(key: PrivateKey) -> str:
    """``key`` itself as an unencrypted PEM ``PRIVATE KEY`` block."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
