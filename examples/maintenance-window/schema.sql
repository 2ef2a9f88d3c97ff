-- A small copy of the table this example expects (the tests run the example against it).
CREATE TABLE public.invoices (
    id bigint PRIMARY KEY,
    net_minor bigint NOT NULL,
    vat_rate numeric(4, 3) NOT NULL,
    vat_minor bigint
);
INSERT INTO public.invoices (id, net_minor, vat_rate)
SELECT i, 1000 + i % 5000, CASE WHEN i % 3 = 0 THEN 0.07 ELSE 0.19 END
FROM generate_series(1, 20000) AS i;
