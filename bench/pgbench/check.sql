-- The credit check's statement (accounts/service.py find_account), on a random seeded account.
-- pgbench -M prepared -D provider=oauth:google -D lo=1 -D hi=10000 -f check.sql
\set n random(:lo, :hi)
SELECT id, oauth_provider, external_id, customer_email, display_name, plan_name, currency,
       status, free_uses_remaining, paid_uses_remaining, total_uses, last_charge_free_uses,
       created_at, updated_at
  FROM accounts
 WHERE oauth_provider = :provider AND external_id = 'bench-' || :n::text || '@example.com';
