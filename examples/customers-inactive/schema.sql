-- A small copy of the table this example expects (the tests run the example against it).
CREATE TABLE public.customers (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    last_login timestamptz NOT NULL,
    status text
);
INSERT INTO public.customers (id, email, last_login, status)
SELECT i, 'customer' || i || '@example.com', now() - (i % 730) * interval '1 day',
       CASE WHEN i % 10 = 0 THEN 'vip' END
FROM generate_series(1, 5000) AS i;
