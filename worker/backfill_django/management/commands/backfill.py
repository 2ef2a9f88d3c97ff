"""``manage.py backfill run|plan|status|reset FILE`` and ``manage.py backfill manifest MODULE:CALLABLE``.

``run``, ``plan``, ``status`` and ``reset`` ARE the ``backfill`` CLI's commands (the same typer
app, its options, output and exit codes; see ``backfill run --help``), with one difference: the
database defaults to ``settings.DATABASES[--database]`` when neither ``--dsn`` nor
``$BACKFILL_DSN`` is given. ``manifest`` prints the Backfill YAML a QuerySet and its update
compile to (``backfill_django.queryset``), to review, commit and ``kubectl apply``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backfill_api.errors import BackfillError

CLI_COMMANDS = ("run", "plan", "status", "reset")
MANIFEST_USAGE = "manage.py backfill manifest MODULE:CALLABLE --name NAME [--namespace NS] [--secret NAME[:KEY]]"


def cli_arguments(arguments: list[str], dsn: str | None) -> list[str]:
    """The ``backfill`` CLI's argv: the database from Django unless the user named one (PURE)."""
    named = any(a == "--dsn" or a.startswith("--dsn=") for a in arguments)
    return arguments if named or dsn is None else [*arguments, "--dsn", dsn]


class Command(BaseCommand):
    help = (
        "Run, plan, show or reset a Backfill manifest like the `backfill` CLI, on this project's database "
        f"(subcommands: {', '.join(CLI_COMMANDS)}, manifest; `manage.py backfill run --help`)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--database", default="default",
                            help="settings.DATABASES alias used when neither --dsn nor $BACKFILL_DSN is given.")
        parser.add_argument("arguments", nargs=argparse.REMAINDER, metavar="SUBCOMMAND ...")

    def handle(self, *args: Any, **options: Any) -> None:
        arguments: list[str] = list(options["arguments"])
        if not arguments or arguments[0] not in (*CLI_COMMANDS, "manifest"):
            raise CommandError(f"give a subcommand: {', '.join(CLI_COMMANDS)} or manifest (e.g. `manage.py backfill run backfill.yaml`)")
        if arguments[0] == "manifest":
            self.manifest(arguments[1:])
            return
        self.cli(arguments, options["database"])

    def cli(self, arguments: list[str], alias: str) -> None:
        """The CLI's own command; a non-zero exit status leaves as SystemExit, as from `backfill`."""
        from typer.main import get_command

        from backfill_cli.app import app

        from ...database import dsn_for

        dsn = None
        if not os.environ.get("BACKFILL_DSN") and "--help" not in arguments:
            try:
                dsn = dsn_for(alias)
            except BackfillError as error:  # the CLI's exit codes: 2 for a spec/settings problem
                raise CommandError(str(error), returncode=error.exit_code) from None
        try:
            get_command(app).main(args=cli_arguments(arguments, dsn), prog_name="manage.py backfill", standalone_mode=True)
        except SystemExit as done:
            if done.code:
                raise

    def manifest(self, arguments: list[str]) -> None:
        """Print the Backfill YAML that ``MODULE:CALLABLE``'s QuerySet and update compile to."""
        import yaml

        from ...queryset import manifest_document
        from ...sources import backfill_from_callable

        parser = argparse.ArgumentParser(prog="manage.py backfill manifest", description=(
            "CALLABLE takes no argument and returns (queryset, update) or a Backfill; "
            "the where/set are compiled by Django's SQL compiler (literals quoted by psycopg)."))
        parser.add_argument("callable", metavar="MODULE:CALLABLE")
        parser.add_argument("--name", required=True, help="metadata.name of the Backfill")
        parser.add_argument("--namespace", default="default", help="metadata.namespace (default: default)")
        parser.add_argument("--secret", help="spec.database.dsnSecretRef for the cluster, as NAME or NAME:KEY")
        options = parser.parse_args(arguments)
        spec: dict[str, Any] = {}
        if options.secret:
            secret, _, key = options.secret.partition(":")
            spec["database"] = {"dsnSecretRef": {"name": secret, "key": key or "dsn"}}
        try:
            backfill = backfill_from_callable(options.callable, name=options.name, namespace=options.namespace, spec=spec)
        except BackfillError as error:
            raise CommandError(str(error), returncode=error.exit_code) from None
        self.stdout.write(yaml.safe_dump(manifest_document(backfill), sort_keys=False, allow_unicode=True), ending="")
