"""Re-exported from `ciris_billing_client.errors` (the standalone client distribution)."""

from ciris_billing_client.errors import *  # noqa: F403
from ciris_billing_client.errors import __all__ as __all__
