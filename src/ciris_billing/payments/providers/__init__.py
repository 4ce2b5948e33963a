"""Payment providers: the protocol (base), Stripe, and the built-in sandbox.

`get_payment_provider` is the guide's dependency-injection point: PAYMENT_PROVIDER picks one.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.config import Settings
from ciris_billing.installation import InstallationSecrets
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.payments.providers.sandbox import Deliver, SandboxProvider


class PaymentConfigurationError(RuntimeError):
    """The payment settings must not start a service (live keys in the sandbox, ...)."""


def get_payment_provider(
    settings: Settings,
    engine: AsyncEngine,
    secrets: InstallationSecrets,
    deliver: Deliver | None = None,
) -> PaymentProvider:
    problems = settings.payment_problems()
    if problems:
        raise PaymentConfigurationError("; ".join(problems))
    if settings.active_payment_provider == "stripe":
        from ciris_billing.payments.providers.stripe import StripeProvider

        assert settings.stripe_api_key is not None
        assert settings.stripe_webhook_secret is not None
        return StripeProvider(
            api_key=settings.stripe_api_key.get_secret_value(),
            webhook_secret=settings.stripe_webhook_secret.get_secret_value(),
            publishable_key=settings.stripe_publishable_key,
            api_base=settings.stripe_api_base,
            timeout_seconds=settings.stripe_timeout_seconds,
        )
    return SandboxProvider(engine, secrets.sandbox_webhook_secret, deliver)
