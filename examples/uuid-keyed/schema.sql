-- A small copy of the table this example expects (the tests run the example against it).
CREATE TABLE public.events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind text NOT NULL,
    payload jsonb NOT NULL,
    payload_version int NOT NULL,
    source text
);
INSERT INTO public.events (id, kind, payload, payload_version)
SELECT md5(i::text)::uuid, 'order_placed',
       CASE WHEN i % 3 = 0 THEN jsonb_build_object('order', i)
            ELSE jsonb_build_object('order', i, 'legacy_source', 'app-' || (i % 5)) END,
       CASE WHEN i % 3 = 0 THEN 2 ELSE 1 END
FROM generate_series(1, 3000) AS i;
