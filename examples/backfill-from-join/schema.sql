-- A small copy of the tables this example expects (the tests run the example against them).
CREATE TABLE public.customers (
    id bigint PRIMARY KEY,
    region text NOT NULL
);
INSERT INTO public.customers (id, region)
SELECT i, (ARRAY['eu-west', 'us-east', 'ap-south'])[1 + i % 3] FROM generate_series(1, 500) AS i;
CREATE TABLE public.orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES public.customers (id),
    region text,
    region_synced_at timestamptz
);
INSERT INTO public.orders (id, customer_id) SELECT i, 1 + i % 500 FROM generate_series(1, 6000) AS i;
