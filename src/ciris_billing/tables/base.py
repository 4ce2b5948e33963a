"""The schema's shared pieces: the metadata every table joins (one naming convention, so
Alembic migrations and `alembic check` agree) and the column types.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    DateTime,
    MetaData,
    SmallInteger,
    String,
)
from sqlalchemy.dialects.postgresql import ARRAY

# Stable constraint names, so Alembic migrations and `alembic check` agree.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = String(40)
Uses = BigInteger()
Minor = BigInteger()
Timestamp = DateTime(timezone=True)
LotIds = ARRAY(String(40))
LotUses = ARRAY(BigInteger)
LotKinds = ARRAY(SmallInteger)

ACCOUNTS_FILLFACTOR = 80
