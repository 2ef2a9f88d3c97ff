-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.signups
WHERE (email_normalized IS NULL AND email_problem IS NULL)
   OR (email LIKE '%@%' AND email_normalized IS NULL)
   OR (email_normalized IS NOT NULL AND email_normalized !~ '^[^@]+@[a-z0-9.-]+$')
   OR (id % 5 = 1 AND email_normalized NOT LIKE '%@xn--bcher-kva.example')
   OR (id % 5 = 3 AND email_normalized <> 'first' || id || '@example.org');
