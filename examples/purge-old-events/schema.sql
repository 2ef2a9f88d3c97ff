-- A small copy of the table this example expects (the tests run the example against it).
CREATE TABLE public.events (
    id bigint PRIMARY KEY,
    kind text NOT NULL,
    created_at timestamptz NOT NULL,
    payload jsonb
);
INSERT INTO public.events (id, kind, created_at, payload)
SELECT i, (ARRAY['debug', 'page_view', 'order', 'audit'])[1 + i % 4],
       timestamptz '2025-06-01 00:00:00+00' + (i % 400) * interval '1 day', jsonb_build_object('n', i)
FROM generate_series(1, 8000) AS i;
-- What must survive (for verify.sql): every row the purge must not touch.
CREATE TABLE public.events_kept AS
SELECT id FROM public.events
WHERE NOT (created_at < timestamptz '2026-01-01 00:00:00+00' AND kind IN ('debug', 'page_view'));
