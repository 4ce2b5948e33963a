"""The reports as CSV text (the API's `Accept: text/csv`, the console's links)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from ciris_billing.reports import revenue, usage


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def revenue_csv(rows: Sequence[revenue.RevenueRow]) -> str:
    return csv_text(
        revenue.FIELDS, ([row.as_dict()[name] for name in revenue.FIELDS] for row in rows)
    )


def usage_csv(rows: Sequence[usage.UsageRow]) -> str:
    """The usage rows, one column per feature seen (`feature:<name>`) after the fixed ones."""
    features = sorted({name for row in rows for name in row.uses_by_feature})
    header = [*usage.FIELDS, *(f"feature:{name}" for name in features)]
    return csv_text(
        header,
        (
            [
                *(getattr(row, name) for name in usage.FIELDS),
                *(row.uses_by_feature.get(name, 0) for name in features),
            ]
            for row in rows
        ),
    )


def wants_csv(accept: str | None) -> bool:
    """`Accept` names text/csv (JSON otherwise)."""
    if not accept:
        return False
    return any(part.split(";")[0].strip().lower() == "text/csv" for part in accept.split(","))
