"""Re-exported from `ciris_billing_client.models` (the standalone client distribution)."""

from ciris_billing_client.models import *  # noqa: F403
from ciris_billing_client.models import __all__ as __all__
