-- Rows still wrong after the purge: old debug/page_view events left, plus rows that should have
-- stayed but are gone. Must be 0.
SELECT (SELECT count(*) FROM public.events
        WHERE created_at < timestamptz '2026-01-01 00:00:00+00' AND kind IN ('debug', 'page_view'))
     + (SELECT count(*) FROM public.events_kept k WHERE NOT EXISTS (SELECT 1 FROM public.events e WHERE e.id = k.id));
