-- A small copy of the table this example expects (the tests run the example against it).
CREATE TABLE public.signups (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    email_normalized text,
    email_problem text
);
INSERT INTO public.signups (id, email)
SELECT i, CASE i % 5
              WHEN 0 THEN ' Ｕｓｅｒ' || i || '@Example.COM '       -- full-width letters, spaces
              WHEN 1 THEN 'user' || i || '@Bücher.Example'         -- an internationalised domain
              WHEN 2 THEN 'user' || i || '@example.com'            -- already fine
              WHEN 3 THEN 'ﬁrst' || i || '@ＥＸＡＭＰＬＥ.org'         -- a ligature, full-width domain
              ELSE 'no-at-sign-' || i                                -- cannot be normalised
          END
FROM generate_series(1, 3000) AS i;
