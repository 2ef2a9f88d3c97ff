-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.orders
WHERE currency IS NULL OR amount_minor IS DISTINCT FROM round(amount * 100)::bigint
   OR (id % 4 = 0 AND currency <> 'USD') OR (id % 4 <> 0 AND currency <> 'EUR');
