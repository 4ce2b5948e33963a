"""Reports (issue 25): revenue from lots, usage, streaming exports of the ledger, charts.

- revenue.py: recognized, breakage, refunds and deferred revenue, per lot (the rounding rule);
- usage.py: uses by kind and feature, active, new and converting accounts;
- exports.py: the ledger's and the lots' movements as CSV, streamed from a server-side cursor;
- tables.py: the reports as CSV; charts.py: plain server-side SVG for the console;
- routes.py: the admin API.
"""
