-- A small copy of the table this example expects (the tests run the example against it).
CREATE SCHEMA sales;
CREATE TABLE sales.order_items (
    order_id bigint NOT NULL,
    line_no int NOT NULL,
    quantity int NOT NULL,
    unit_price_cents int NOT NULL,
    total_cents bigint,
    PRIMARY KEY (order_id, line_no)
);
INSERT INTO sales.order_items (order_id, line_no, quantity, unit_price_cents, total_cents)
SELECT o, l, 1 + (o + l) % 4, 100 * l, CASE WHEN o % 7 = 0 THEN 100 * l * (1 + (o + l) % 4) END
FROM generate_series(1, 1000) AS o, generate_series(1, 4) AS l;
