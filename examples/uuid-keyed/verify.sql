-- Rows that are still wrong after the backfill: must be 0.
SELECT count(*) FROM public.events
WHERE payload_version <> 2 OR payload ? 'legacy_source'
   OR (source IS NULL AND (payload->>'order')::int % 3 <> 0);
