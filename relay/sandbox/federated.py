"""Federated identity credentials (workload identity federation) for the sandbox's Entra.

Entra trusts a token from an external issuer (a Kubernetes cluster's OIDC issuer, GitHub
Actions) when its ``iss``, ``sub`` and ``aud`` match a federated credential on the app and its
signature verifies against the issuer's published keys. The sandbox has no JWKS fetch: the test
registers the issuer's public key directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relay.sandbox.tokens import CLOCK_SKEW, AssertionRejected, TokenError, split_jwt

# The audience Entra recommends for federated credentials.
EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"


@dataclass(frozen=True)
class FederatedCredential:
    issuer: str
    subject: str
    public_key_pem: bytes  # the issuer's signing key (what its JWKS would publish)
    audience: str = EXCHANGE_AUDIENCE


def verify_federated_assertion(assertion: str, cred: FederatedCredential, *, now: float) -> None:
    """Check an external OIDC token against a federated credential; raise AssertionRejected."""
    try:
        header, claims, signing_input, signature = split_jwt(assertion)
    except TokenError as exc:
        raise AssertionRejected(50027, f"JWT token is invalid or malformed ({exc}).") from exc
    if claims.get("iss") != cred.issuer:
        raise AssertionRejected(700211, "No matching federated identity record found for "
                                        f"presented assertion issuer '{claims.get('iss')}'.")
    if claims.get("sub") != cred.subject:
        raise AssertionRejected(70021, "No matching federated identity record found for "
                                       f"presented assertion. Assertion Issuer: '{cred.issuer}'. "
                                       f"Assertion Subject: '{claims.get('sub')}'.")
    aud = claims.get("aud")
    audiences = aud if isinstance(aud, list) else [aud]
    if cred.audience not in audiences:
        raise AssertionRejected(700212, "No matching federated identity record found for "
                                        f"presented assertion audience '{aud}'.")
    key = serialization.load_pem_public_key(cred.public_key_pem)
    if header.get("alg") != "RS256" or not isinstance(key, rsa.RSAPublicKey):
        raise AssertionRejected(5002738, f"Invalid JWT token. '{header.get('alg')}' is not a "
                                         "supported signature algorithm.")
    try:
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AssertionRejected(700027, "Client assertion failed signature validation.") from None
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp + CLOCK_SKEW < now:
        raise AssertionRejected(700024, "Client assertion is not within its valid time range.")
