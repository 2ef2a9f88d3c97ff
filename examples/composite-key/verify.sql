-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM sales.order_items WHERE total_cents IS DISTINCT FROM quantity * unit_price_cents;
