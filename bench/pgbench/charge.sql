-- A charge of one use as the service runs it (accounts/service.py charge): in one transaction,
-- the conditional UPDATE ... RETURNING that deducts (free uses first), then the ledger row.
-- pgbench -M prepared -D provider=oauth:google -D lo=1 -D hi=10000 -f charge.sql   (lo=hi=0: the hot account)
\set n random(:lo, :hi)
BEGIN;
UPDATE accounts
   SET last_charge_free_uses = CASE WHEN free_uses_remaining >= 1 THEN 1
                                    ELSE free_uses_remaining END,
       free_uses_remaining = CASE WHEN free_uses_remaining >= 1 THEN free_uses_remaining - 1
                                  ELSE 0 END,
       paid_uses_remaining = CASE WHEN free_uses_remaining >= 1 THEN paid_uses_remaining
                                  ELSE paid_uses_remaining - (1 - free_uses_remaining) END,
       total_uses = total_uses + 1,
       updated_at = now()
 WHERE oauth_provider = :provider AND external_id = 'bench-' || :n::text || '@example.com'
   AND status = 'active' AND free_uses_remaining + paid_uses_remaining >= 1
RETURNING id AS account_id, free_uses_remaining, paid_uses_remaining, total_uses,
          last_charge_free_uses AS free_used, plan_name \gset
INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                     currency, description, metadata, idempotency_key, created_at)
VALUES ('ch_' || substr(md5(random()::text), 1, 24), :account_id, 1, :free_used,
        1 - :free_used::bigint, 100, 'USD', 'bench', '{}', NULL, now());
COMMIT;
