-- A small copy of the tables this example expects (the tests run the example against them).
CREATE TABLE public.orders (
    id bigint PRIMARY KEY,
    placed_at timestamptz NOT NULL,
    status text NOT NULL,
    total numeric(12, 2) NOT NULL
);
INSERT INTO public.orders (id, placed_at, status, total)
SELECT i, timestamptz '2024-01-01 12:00:00+00' + (i % 700) * interval '1 day',
       CASE WHEN i % 5 = 0 THEN 'open' ELSE 'closed' END, (i % 977) / 10.0
FROM generate_series(1, 6000) AS i;
CREATE SCHEMA archive;
CREATE TABLE archive.orders (
    id bigint NOT NULL,
    placed_on date NOT NULL,
    status text NOT NULL,
    total_cents bigint NOT NULL,
    PRIMARY KEY (id, placed_on)
) PARTITION BY RANGE (placed_on);
CREATE TABLE archive.orders_2024 PARTITION OF archive.orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE archive.orders_2025 PARTITION OF archive.orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
