"""The catalog (issue 24): packs a purchase buys (packs.py), plans with their own free uses and
packs (plans.py), promotion codes (codes.py), and what a purchase of a pack costs (offers.py).
Business rules only: no HTTP, no provider. The default pack and plans come from the guide's
environment variables, so the guide's flow is unchanged."""
