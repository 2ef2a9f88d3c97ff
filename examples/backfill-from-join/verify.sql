-- Orders whose region is not their customer's: must be 0.
SELECT count(*) FROM public.orders o JOIN public.customers c ON c.id = o.customer_id
WHERE o.region IS DISTINCT FROM c.region OR o.region_synced_at IS NULL;
