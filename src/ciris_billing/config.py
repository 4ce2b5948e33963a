"""One Settings class, read from the environment and `.env`, with the guide's variable names."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./ciris_billing.db"


def async_database_url(url: str) -> str:
    """Turn a URL as users write it (`postgresql://`, `sqlite:///`) into an async driver URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"DATABASE_URL is not a URL: {url!r}")
    base = scheme.split("+", 1)[0]
    if base in ("postgres", "postgresql"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"DATABASE_URL scheme {scheme!r} is not supported (use postgresql or sqlite)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL

    # Pricing (the guide's names and defaults).
    free_uses_per_account: int = Field(default=3, ge=0, le=1_000_000)
    paid_uses_per_purchase: int = Field(default=20, ge=1, le=1_000_000)
    price_per_purchase_minor: int = Field(default=500, ge=1)
    currency: str = "USD"

    # Payments (the guide's names). Used by the payment providers.
    payment_provider: Literal["sandbox", "stripe"] | None = None
    stripe_api_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_publishable_key: str | None = None

    # Operations.
    log_level: str = "INFO"
    api_key_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    db_pool_size: int = Field(default=10, ge=1, le=200)

    @field_validator("currency")
    @classmethod
    def _upper_currency(cls, value: str) -> str:
        if len(value) != 3 or not value.isalpha():
            raise ValueError("CURRENCY must be a 3-letter ISO code")
        return value.upper()

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        async_database_url(value)
        return value

    @property
    def async_database_url(self) -> str:
        return async_database_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.async_database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
