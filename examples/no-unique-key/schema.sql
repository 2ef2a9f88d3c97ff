-- A small copy of the table this example expects (the tests run the example against it).
-- No primary key, no unique index: the same view can be logged twice.
CREATE TABLE public.page_views (
    viewed_at timestamptz NOT NULL,
    path text NOT NULL,
    user_agent text,
    is_bot boolean
);
CREATE INDEX page_views_viewed_at ON public.page_views (viewed_at);
INSERT INTO public.page_views (viewed_at, path, user_agent)
SELECT timestamptz '2026-01-01' + (i / 2) * interval '1 minute', '/products/' || (i % 50),
       CASE i % 5 WHEN 0 THEN 'Googlebot/2.1' WHEN 1 THEN NULL WHEN 2 THEN 'AhrefsCrawler' ELSE 'Mozilla/5.0' END
FROM generate_series(1, 4000) AS i;
