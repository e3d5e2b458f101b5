"""JWT plumbing for the sandbox: its own HS256 access tokens and clients' signed assertions.

Real Entra signs access tokens with RS256 and publishes the keys; nobody but the sandbox's
own Exchange checks these tokens, so a per-run HMAC key is enough and needs no key store.
Client assertions are checked the real way, against the registered certificate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Entra tolerates this much clock skew on nbf/exp of client assertions and access tokens.
CLOCK_SKEW = 300


class TokenError(Exception):
    """A token or assertion was refused; the message says why, for logs and recordings."""


class AssertionRejected(TokenError):
    """A client assertion was refused, with the AADSTS code Entra would use."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    # validate=True: a tampered token must fail, not be silently "repaired".
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)


def sign_hs256(claims: dict[str, Any], key: bytes, *, kid: str = "sandbox") -> str:
    header = {"typ": "JWT", "alg": "HS256", "kid": kid}
    signing_input = ".".join(
        b64url_encode(json.dumps(part, separators=(",", ":")).encode("utf-8"))
        for part in (header, claims)
    )
    mac = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url_encode(mac)}"


def split_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, claims, signing input, signature) of a compact JWS, signature unchecked."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a JWT: expected three dot-separated parts")
    try:
        header = json.loads(b64url_decode(parts[0]))
        claims = json.loads(b64url_decode(parts[1]))
        signature = b64url_decode(parts[2])
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    except ValueError as exc:  # binascii.Error, JSONDecodeError, UnicodeError
        raise TokenError(f"not a JWT: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("not a JWT: header and payload must be JSON objects")
    return header, claims, signing_input, signature


def verify_hs256(token: str, key: bytes) -> dict[str, Any]:
    """Claims of a token this sandbox signed; raises TokenError for anything else."""
    header, claims, signing_input, signature = split_jwt(token)
    if header.get("alg") != "HS256":
        raise TokenError(f"token algorithm {header.get('alg')!r} is not the sandbox's HS256")
    expected = hmac.new(key, signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise TokenError("token signature is invalid (not issued by this sandbox, or altered)")
    return claims


def _thumbprint_matches(header: dict[str, Any], cert: x509.Certificate) -> bool:
    for name, algorithm in (("x5t#S256", hashes.SHA256()), ("x5t", hashes.SHA1())):  # noqa: S303
        value = header.get(name)
        if isinstance(value, str):
            try:
                return hmac.compare_digest(b64url_decode(value), cert.fingerprint(algorithm))
            except ValueError:
                return False
    return False


def verify_client_assertion(
    assertion: str, certificate_pem: bytes, *, client_id: str, token_path: str, now: float
) -> None:
    """Check an RS256/PS256 client assertion the way Entra does; raise AssertionRejected."""
    try:
        header, claims, signing_input, signature = split_jwt(assertion)
    except TokenError as exc:
        raise AssertionRejected(50027, f"JWT token is invalid or malformed ({exc}).") from exc
    cert = x509.load_pem_x509_certificate(certificate_pem)
    if not _thumbprint_matches(header, cert):
        raise AssertionRejected(
            700027,
            "The certificate with identifier used to sign the client assertion is not "
            f"registered on application. [Reason - The key was not found., Thumbprint of key "
            f"used by client: '{header.get('x5t#S256') or header.get('x5t')}']",
        )
    key = cert.public_key()
    alg = header.get("alg")
    pad: padding.AsymmetricPadding
    if alg == "RS256":
        pad = padding.PKCS1v15()
    elif alg == "PS256":
        pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    else:
        raise AssertionRejected(5002738, f"Invalid JWT token. '{alg}' is not a supported "
                                         "signature algorithm. Use RS256 or PS256.")
    if not isinstance(key, rsa.RSAPublicKey):
        raise AssertionRejected(700027, "Client assertion failed signature validation: the "
                                        "registered certificate has no RSA key.")
    try:
        key.verify(signature, signing_input, pad, hashes.SHA256())
    except InvalidSignature:
        raise AssertionRejected(700027, "Client assertion failed signature validation.") from None
    if claims.get("iss") != client_id or claims.get("sub") != client_id:
        raise AssertionRejected(700021, "Client assertion application identifier doesn't "
                                        "match 'client_id' parameter.")
    aud = claims.get("aud")
    if not isinstance(aud, str) or not aud.rstrip("/").endswith(token_path):
        raise AssertionRejected(700212, f"Client assertion audience claim {aud!r} does not "
                                        f"match the token endpoint '{token_path}'.")
    exp, nbf = claims.get("exp"), claims.get("nbf", 0)
    if not isinstance(exp, int | float) or not isinstance(nbf, int | float) \
            or exp + CLOCK_SKEW < now or nbf - CLOCK_SKEW > now:
        raise AssertionRejected(700024, "Client assertion is not within its valid time range.")


def check_times(claims: Mapping[str, Any]) -> None:
    """Expired, or not yet valid beyond Entra's clock skew: TokenError (Exchange and Graph)."""
    now = time.time()
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, int) or exp <= now:
        raise TokenError(f"token expired at {_iso(exp)}")
    if not isinstance(nbf, int) or nbf > now + CLOCK_SKEW:
        raise TokenError(f"token not valid before {_iso(nbf)}")


def _iso(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return f"<missing: {epoch!r}>"
    return datetime.fromtimestamp(epoch, UTC).isoformat()
