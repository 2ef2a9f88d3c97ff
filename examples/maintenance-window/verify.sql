-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.invoices WHERE vat_minor IS DISTINCT FROM round(net_minor * vat_rate)::bigint;
