"""Client authentication at the fake token endpoint, as Entra ID checks it: a client secret,
a client assertion signed with the app's registered certificate, or a federated assertion
(workload identity), each refusal with Entra's AADSTS code."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

from relay.sandbox.apps import SandboxApp
from relay.sandbox.federated import verify_federated_assertion
from relay.sandbox.tokens import JWT_BEARER, AssertionRejected, verify_client_assertion


def check_credentials(app: SandboxApp, form: Mapping[str, str],
                      token_path: str) -> tuple[int, str] | None:
    """How an app proves itself at the token endpoint: its secret, a client assertion
    signed with its certificate, or a federated assertion; (AADSTS code, description)
    when it fails."""
    secret, assertion = form.get("client_secret"), form.get("client_assertion")
    if secret:
        if app.client_secret is None or not hmac.compare_digest(
                secret.encode("utf-8"), app.client_secret.encode("utf-8")):
            return 7000215, (
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID, for a secret added "
                f"to app '{app.client_id}'.")
        return None
    if assertion:
        if form.get("client_assertion_type") != JWT_BEARER:
            return 7000216, f"'client_assertion_type' must be '{JWT_BEARER}'."
        if app.federated is not None and app.certificate_pem is None:
            try:
                verify_federated_assertion(assertion, app.federated, now=time.time())
            except AssertionRejected as exc:
                return exc.code, str(exc)
            return None
        if app.certificate_pem is None:
            return 700027, ("The certificate with identifier used to sign the client "
                            "assertion is not registered on application.")
        try:
            verify_client_assertion(assertion, app.certificate_pem, client_id=app.client_id,
                                    token_path=token_path, now=time.time())
        except AssertionRejected as exc:
            return exc.code, str(exc)
        return None
    return 7000216, ("'client_assertion', 'client_secret' or 'request' is required for the "
                     "'client_credentials' grant type.")
