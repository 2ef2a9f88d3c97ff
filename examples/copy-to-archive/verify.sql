-- Closed orders missing from the archive, or archived wrongly, plus archived rows that are not
-- closed orders. Must be 0.
SELECT (SELECT count(*) FROM public.orders o
        WHERE o.status = 'closed' AND NOT EXISTS (
            SELECT 1 FROM archive.orders a
            WHERE a.id = o.id AND a.placed_on = o.placed_at::date AND a.total_cents = round(o.total * 100)::bigint))
     + (SELECT count(*) FROM archive.orders a
        WHERE NOT EXISTS (SELECT 1 FROM public.orders o WHERE o.id = a.id AND o.status = 'closed'));
