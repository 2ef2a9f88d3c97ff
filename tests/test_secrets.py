import logging

from backfill_worker.sql.secrets import REDACTOR, describe_dsn, redact, register_dsn, secrets_of


def test_uri_and_keyword_passwords_are_masked_even_when_unknown():
    text = "failed for postgresql://app:s3cr3t@db:5432/shop and host=db password='p w' user=x"
    cleaned = redact(text)
    assert "s3cr3t" not in cleaned and "p w" not in cleaned
    assert "postgresql://app:***@db:5432/shop" in cleaned


def test_registered_secrets_are_masked_anywhere():
    dsn = "host=db user=app password=hunter22 dbname=shop"
    assert "hunter22" in secrets_of(dsn)
    assert "hunter22" not in redact("oops hunter22 leaked", secrets_of(dsn))


def test_describe_dsn_keeps_only_public_parts():
    assert describe_dsn("postgresql://app:pw123@db.internal:6432/shop") == "app@db.internal:6432/shop"


def test_logging_filter_scrubs_registered_dsns(caplog):
    register_dsn("host=db user=app password=t0psecret dbname=shop")
    logger = logging.getLogger("test.redaction")
    logger.addFilter(REDACTOR)
    with caplog.at_level(logging.INFO, logger="test.redaction"):
        logger.info("connecting with %s", "password=t0psecret")
    assert "t0psecret" not in caplog.text
