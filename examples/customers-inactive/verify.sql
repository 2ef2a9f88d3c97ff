-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.customers
WHERE (last_login < now() - interval '365 days' AND status IS DISTINCT FROM 'inactive' AND status IS DISTINCT FROM 'vip')
   OR (last_login >= now() - interval '365 days' AND status = 'inactive');
