-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.page_views
WHERE is_bot IS DISTINCT FROM coalesce(user_agent ~* '(bot|crawler|spider)', false);
