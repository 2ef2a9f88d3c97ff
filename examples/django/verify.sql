-- Rows that are still wrong after the backfill (stale but not inactive, or recent but changed): must be 0.
SELECT count(*) FROM customers_customer
WHERE (last_login < now() - interval '365 days') IS DISTINCT FROM (status IS NOT DISTINCT FROM 'inactive');
