"""One Settings class, read from the environment and `.env`, with the guide's variable names."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ciris_billing.embedded import DEFAULT_DATA_DIR


def async_database_url(url: str) -> str:
    """Turn a URL as users write it (`postgresql://...`) into an async driver URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"DATABASE_URL is not a URL: {url!r}")
    base = scheme.split("+", 1)[0]
    if base in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"DATABASE_URL scheme {scheme!r} is not supported (use postgresql)")


def host_name(host: str) -> str:
    """A host name as compared: lower case, IPv6 without brackets."""
    return host.strip().lower().removeprefix("[").removesuffix("]")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # PostgreSQL. Unset: the CLI starts an embedded server in EMBEDDED_POSTGRES_DIR (embedded.py)
    # and sets this for the command (and `serve`'s workers).
    database_url: str | None = None
    embedded_postgres_dir: Path = DEFAULT_DATA_DIR

    # Pricing (the guide's names and defaults).
    free_uses_per_account: int = Field(default=3, ge=0, le=1_000_000)
    # never: the free uses are granted once (the guide); monthly: a new free lot of
    # FREE_USES_PER_ACCOUNT each calendar month (UTC), the previous one expiring at its end.
    free_uses_reset: Literal["never", "monthly"] = "never"
    paid_uses_per_purchase: int = Field(default=20, ge=1, le=1_000_000)
    price_per_purchase_minor: int = Field(default=500, ge=1)
    currency: str = "USD"
    # Who sells, as the portal's PDF receipts show it (portal/receipt_pdf.py): a name and a
    # postal address (lines separated by newlines or " | ").
    seller_name: str = Field(default="", max_length=200)
    seller_address: str = Field(default="", max_length=500)

    # Payments (the guide's names). Without PAYMENT_PROVIDER: stripe if STRIPE_API_KEY is set,
    # else the built-in sandbox.
    payment_provider: Literal["sandbox", "stripe"] | None = None
    stripe_api_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_publishable_key: str | None = None
    # Point the Stripe SDK at another Stripe-compatible server (e.g. localstripe).
    stripe_api_base: str | None = None
    # How long each Stripe API request may take (the SDK then retries it, twice at most).
    stripe_timeout_seconds: float = Field(default=30.0, gt=0, le=300)
    # The sandbox signs its webhooks like Stripe. Unset (the default): the installation's own
    # secret, generated once and stored in the database (installation.py), which every worker,
    # instance and restart shares. There is no public default.
    sandbox_webhook_secret: SecretStr | None = None
    # Anyone who can reach a sandbox service with a checkout link can "pay" with a test card:
    # `serve` refuses a non-loopback --host in sandbox mode unless this is true.
    sandbox_allow_public: bool = False

    # Where buyers reach this service (checkout links in 402 answers, purchase responses and
    # the buy link's redirect). Unset: the request's own base URL, but only when its Host is
    # in ALLOWED_HOSTS; any other Host gets links on http://localhost:<the server's port>.
    public_base_url: str | None = None
    # Host names (comma-separated, no port) whose requests may build links from their Host.
    allowed_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "[::1]"]
    # Signs the buy links in 402 answers. Unset: the installation's own (stored, shared).
    checkout_link_secret: SecretStr | None = None
    # How long a portal link works (portal/links.py); revoking an account's links ends them.
    portal_link_seconds: int = Field(default=7 * 24 * 3600, ge=60, le=366 * 24 * 3600)

    # Rate limits (0 turns one off). Per API key: requests per second (bursts up to twice that).
    # Per account (free-tier abuse): checks and charges per minute (bursts up to a sixth).
    # With REDIS_URL (e.g. redis://127.0.0.1:6379/0) they hold across every worker and
    # instance (ratelimit.py; Redis down or slow: requests go through, counted); without it,
    # each worker process keeps its own buckets (N workers: N times the rate).
    rate_limit_key_per_second: float = Field(default=2000, ge=0)
    rate_limit_account_per_minute: float = Field(default=600, ge=0)
    redis_url: SecretStr | None = None
    # Request bodies larger than this are refused with 413 before they are read.
    max_request_bytes: int = Field(default=262_144, ge=1024, le=16 * 1024 * 1024)

    # Background jobs (jobs.py): retry unhandled webhook events, reconcile purchases with the
    # provider. `serve` runs them in every worker (each job runs once across all of them);
    # JOBS_ENABLED=false leaves them to `ciris-billing worker` processes.
    jobs_enabled: bool = True
    # How often the jobs run (seconds; a divisor of 60). Also the first retry delay of a failed
    # webhook event, doubling per attempt up to 15 minutes.
    jobs_poll_seconds: int = Field(default=10, ge=1, le=60)
    # A purchase not final this long after it started is checked with the provider.
    reconcile_after_seconds: int = Field(default=180, ge=0, le=7 * 86_400)

    # The operator console (/console): a session ends after this long without a request, and
    # this long after login whatever the activity. Failed logins per client address and minute
    # (shared through Redis with REDIS_URL, else per worker process) before the console answers 429.
    console_session_idle_seconds: int = Field(default=1800, ge=1, le=7 * 86_400)
    console_session_max_seconds: int = Field(default=12 * 3600, ge=1, le=30 * 86_400)
    console_login_failures_per_minute: float = Field(default=10, ge=0)
    # Addresses of the proxies in front (comma-separated IPs or networks, `*` for any) whose
    # X-Forwarded-For / X-Forwarded-Proto `serve` believes: uvicorn's own setting. Unset: none
    # (a client's own headers never choose the address the console's limits and logs see).
    forwarded_allow_ips: str | None = None
    # A bearer token Prometheus may scrape /metrics with (its `authorization` setting), besides
    # any read key. Unset: a read key only.
    metrics_token: SecretStr | None = Field(default=None, min_length=16)
    # Events out (events/): balance.low fires when an account's available uses cross below
    # this (an account may have its own threshold).
    low_balance_threshold_uses: int = Field(default=3, ge=0, le=1_000_000)
    # Lots (issue 23): credits.expiring goes out this many days before a lot expires (0: never).
    credits_expiring_notice_days: int = Field(default=7, ge=0, le=366)
    # Auto top-up (autotopup/): at most this many off-session payments per account and
    # calendar month (UTC), whatever their outcome.
    auto_topup_max_per_month: int = Field(default=10, ge=0, le=1000)
    # Webhook endpoints must be https URLs resolving to public addresses (SSRF guard,
    # events/ssrf.py); true allows http and loopback/private addresses (development, tests).
    allow_private_webhook_urls: bool = False
    # A failed delivery is retried after this many seconds, then 4 times longer each time (at
    # most 8 hours apart), for 3 days (events/delivery.py).
    webhook_retry_base_seconds: float = Field(default=5.0, gt=0, le=3600)
    # A delivery not answered within this is a failure (retried).
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    # Endpoints served at once per worker process, on the delivery queue (jobs.py): their own
    # job slots, never the money jobs' (hold expiry, reconciliation, auto top-up).
    webhook_delivery_concurrency: int = Field(default=8, ge=1, le=64)
    # Deliveries in flight at once to one endpoint (receivers order by `data.sequence`): 10 to a
    # receiver answering in 250 ms is ~40 a second (one at a time, 2.4).
    webhook_endpoint_concurrency: int = Field(default=10, ge=1, le=100)

    # Operations.
    log_level: str = "INFO"
    # A request's headers, then its body, must arrive within these (else 408, connection
    # closed: serving.py); idle keep-alive connections close after 15 s (cli.py serve).
    header_read_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_read_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # One `http_request` event per request (route template, status, duration, redacted query).
    access_log: bool = True
    api_key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    # How old a process's copy of the rates may be (rates/book.py): a rate change reaches
    # rated charges in every process within this time.
    rates_refresh_seconds: float = Field(default=5.0, ge=0, le=300)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    # Hot statements of each kind (check, charge, hold, capture) in flight at once per worker;
    # requests beyond wait and go out together in one statement (accounts/hot/lanes.py).
    # Measured (both settings serving at once, 2026-12-08; docs/deploy.md): against 4 lanes,
    # 2 made 5-8% more charges at 8 and 32 connections per server and 17% more mixes at 32,
    # checks 5% fewer at 8; 1 lane lost 5-11% at 8.
    hot_path_lanes: int = Field(default=2, ge=1, le=64)
    # Connecting to PostgreSQL gives up after this (then 503): a database that stops answering
    # must not hang requests; a busy server that forks slowly may need more (tests use 30 s).
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120)

    @field_validator("currency")
    @classmethod
    def _upper_currency(cls, value: str) -> str:
        if len(value) != 3 or not value.isalpha():
            raise ValueError("CURRENCY must be a 3-letter ISO code")
        return value.upper()

    @field_validator(
        "sandbox_webhook_secret",
        "checkout_link_secret",
        "redis_url",
        "metrics_token",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [host_name(str(item)) for item in value if str(item).strip()]
        return value

    @field_validator("jobs_poll_seconds")
    @classmethod
    def _poll_divides_a_minute(cls, value: int) -> int:
        if 60 % value:
            raise ValueError("JOBS_POLL_SECONDS must divide 60 (1, 2, 3, 5, 10, 15, 20, 30, 60)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None:
            async_database_url(value)
        return value

    @property
    def async_database_url(self) -> str:
        if self.database_url is None:
            raise RuntimeError("DATABASE_URL is not set (the CLI starts an embedded PostgreSQL)")
        return async_database_url(self.database_url)

    @property
    def active_payment_provider(self) -> Literal["sandbox", "stripe"]:
        if self.payment_provider is not None:
            return self.payment_provider
        return "stripe" if self.stripe_api_key is not None else "sandbox"

    def payment_problems(self) -> list[str]:
        """Why this payment configuration must not start (empty when it may)."""
        api_key = self.stripe_api_key.get_secret_value() if self.stripe_api_key else ""
        problems = []
        if self.active_payment_provider == "sandbox":
            if api_key.startswith(("sk_live_", "rk_live_")) or (
                self.stripe_publishable_key or ""
            ).startswith("pk_live_"):
                problems.append(
                    "Live Stripe keys are set but the sandbox provider is selected: "
                    "set PAYMENT_PROVIDER=stripe, or remove the live keys"
                )
        else:
            if not api_key:
                problems.append(
                    "PAYMENT_PROVIDER=stripe needs STRIPE_API_KEY (sk_test_... or sk_live_...)"
                )
            elif not api_key.startswith(("sk_", "rk_")):
                problems.append("STRIPE_API_KEY must start with sk_test_, sk_live_ or rk_")
            secret = (
                self.stripe_webhook_secret.get_secret_value() if self.stripe_webhook_secret else ""
            )
            if not secret:
                problems.append(
                    "PAYMENT_PROVIDER=stripe needs STRIPE_WEBHOOK_SECRET (whsec_...): "
                    "without it no payment can ever be credited"
                )
        return problems


@lru_cache
def get_settings() -> Settings:
    return Settings()
