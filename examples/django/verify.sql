-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM accounts_user
WHERE email_normalized IS DISTINCT FROM lower(btrim(email)) OR updated_at < now() - interval '1 hour';
