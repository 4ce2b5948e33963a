"""The agent client, kept importable here: it is its own distribution now, `ciris-billing-client`
(clients/python, import name `ciris_billing_client`, only httpx needed), which this package
depends on and re-exports, so `from ciris_billing.client import AsyncBillingClient` still works."""

from ciris_billing_client import *  # noqa: F403
from ciris_billing_client import __all__ as __all__
