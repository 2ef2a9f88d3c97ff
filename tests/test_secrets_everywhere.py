"""The password (and the DSN holding it) never appears in anything the project emits.

The suite-wide hook (tests/conftest.py) already fails any test whose captured output shows the
canary password. These tests capture *everything* of successful and failing runs explicitly —
CLI stdout/stderr, JSON logs, a metrics scrape, exception texts, and in-cluster the Backfill
status, Events, Jobs, worker pod output, worker and operator metrics and operator logs — and
assert that neither the password nor the DSN is in any of it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from kube_support.operator_thread import operator_running_async
from kube_support.waiting import call, eventually_async
from manifests import write_manifest
from psycopg.conninfo import conninfo_to_dict
from support_faults import cli, ledger
from support_faults.kubelet import FakeKubelet, free_port, write_kubeconfig
from support_faults.secrets import CANARY_PASSWORD, assert_absent

from backfill_api.kubeapi import KubeApi, backfill_path, core_path, jobs_path
from backfill_api.manifest import parse_backfill
from backfill_cli.localpg import LocalPostgres
from backfill_operator.main import OperatorConfig
from backfill_worker.run.engine import run_backfill


def secrets_of(dsn: str) -> list[str]:
    return [CANARY_PASSWORD, dsn]


def test_canary_is_the_suite_password(pg_server: LocalPostgres) -> None:
    # The server every other test uses carries the canary the suite-wide hook looks for.
    assert pg_server.password == CANARY_PASSWORD
    assert conninfo_to_dict(pg_server.dsn())["password"] == CANARY_PASSWORD


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


# -- CLI: a successful and several failing runs, everything captured ----------------------------


def test_cli_runs_never_print_the_password(database: str, tmp_path: Path) -> None:
    ledger.seed(database, 20_000)
    good = write_manifest(tmp_path, ledger.manifest(
        "secrets-cli", batch={"size": 500, "minSize": 100, "maxSize": 500, "targetDuration": "0s", "pause": "30ms"}), "good.yaml")
    bad = write_manifest(tmp_path, ledger.manifest("secrets-bad", where="no_such_column > 0"), "bad.yaml")
    port = free_port()
    captured: dict[str, str] = {}

    # Success, the DSN given on the command line as a user would, JSON logs at DEBUG, metrics.
    process, out, err = cli.start(
        ["--log-format", "json", "--log-level", "DEBUG", "--metrics-port", str(port), "run", str(good), "--dsn", database],
        None, tmp_path, "good",
    )
    scrapes = []
    while process.poll() is None:
        if (text := scrape(port)) is not None:
            scrapes.append(text)
        time.sleep(0.2)
    assert process.returncode == 0, err.read_text()
    captured |= {"run stdout": out.read_text(), "run stderr": err.read_text(), "metrics": "\n".join(scrapes)}
    assert scrapes and "backfill_rows_updated_total" in captured["metrics"]
    json_lines = [json.loads(line) for line in captured["run stderr"].splitlines() if line.startswith("{")]
    assert json_lines and all(line.get("namespace") == "faults" for line in json_lines)

    # The other commands, and failures: bad spec, wrong password, lost connection mid-run.
    for label, args, dsn in [
        ("status", ["status", str(good)], database),
        ("plan", ["plan", str(good)], database),
        ("bad spec", ["--log-format", "json", "-v", "run", str(bad)], database),
        ("wrong password", ["-v", "run", str(good)], database.replace(CANARY_PASSWORD, "Wrong-" + CANARY_PASSWORD[::-1])),
    ]:
        result = cli.run(args, dsn)
        captured |= {f"{label} stdout": result.stdout, f"{label} stderr": result.stderr}
        assert (result.returncode == 0) == (label in ("status", "plan")), (label, result.stderr)

    # Connection killed under a running worker (once, after two batches): the retry is logged
    # with the server's message.
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("DELETE FROM backfill.checkpoints")
        process, out, err = cli.start(["--log-format", "json", "-v", "run", str(good)], database, tmp_path, "killed")
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            row = conn.execute("SELECT batches FROM backfill.checkpoints WHERE identity = 'faults/secrets-cli'").fetchone()
            if row and row[0] >= 2:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE application_name LIKE 'backfill faults/secrets-cli%'")
                break
            time.sleep(0.01)
    assert process.wait(60) == 0, err.read_text()
    captured |= {"killed stdout": out.read_text(), "killed stderr": err.read_text()}
    assert "connection" in captured["killed stderr"]

    assert_absent(secrets_of(database), captured)


# Typos in a DSN make libpq quote the word it could not parse: with an unquoted password that
# contains a space, that word is a piece of the password.
MALFORMED = {
    "space-in-unquoted-password": "host=127.0.0.1 port={port} user=postgres password=x {pw}",
    "missing-equals": "host=127.0.0.1 port={port} user=postgres password {pw}",
    "unterminated-quote": "host=127.0.0.1 port={port} user=postgres password='{pw}",
    "bad-ipv6-uri": "postgresql://postgres:{pw}@[::1/db",
    "bad-port-uri": "postgresql://postgres:{pw}@127.0.0.1:notaport/db",
    "bad-sslmode": "host=127.0.0.1 port={port} user=postgres password={pw} sslmode=bogus",
}


@pytest.mark.parametrize("label", sorted(MALFORMED))
def test_malformed_dsns_never_echo_the_password(label: str, tmp_path: Path) -> None:
    dsn = MALFORMED[label].format(port=free_port(), pw=CANARY_PASSWORD)
    manifest = write_manifest(tmp_path, ledger.manifest("malformed"))
    result = cli.run(["run", str(manifest)], dsn)
    assert result.returncode == 4, result.stderr
    assert "cannot connect" in result.stderr
    assert_absent([CANARY_PASSWORD, dsn], {"stdout": result.stdout, "stderr": result.stderr})


# -- exception texts, as a caller of the engine or a log handler would render them -------------


def exception_texts(error: BaseException) -> dict[str, str]:
    chain = []
    current: BaseException | None = error
    while current is not None:  # the chain as renderers show it (`raise ... from None` hides the context)
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return {
        "str": str(error),
        "repr": repr(error),
        "args": repr(error.args),
        "traceback": "".join(traceback.format_exception(error)),
        "chain": " | ".join(f"{type(e).__name__}: {e}" for e in chain),
    }


def test_engine_exceptions_never_hold_the_password(database: str, pg_server: LocalPostgres) -> None:
    ledger.seed(database, 1_000)
    wrong = database.replace(CANARY_PASSWORD, "Wrong-" + CANARY_PASSWORD[::-1])
    cases = {
        "bad where": (ledger.manifest("exc", where="nope > 1"), database),
        "runtime error": (ledger.manifest("exc-rt", set={"counter": "counter / (id - id)"}), database),
        "wrong password": (ledger.manifest("exc"), wrong),
        "unreachable": (ledger.manifest("exc"), f"host=127.0.0.1 port={free_port()} user=postgres password={CANARY_PASSWORD}"),
        "malformed": (ledger.manifest("exc"), f"host=127.0.0.1 user=postgres password=x {CANARY_PASSWORD}"),
    }
    captured: dict[str, str] = {}
    for label, (document, dsn) in cases.items():
        with pytest.raises(Exception) as caught:
            run_backfill(parse_backfill(document), dsn)
        for kind, text in exception_texts(caught.value).items():
            captured[f"{label} {kind}"] = text
        assert_absent([CANARY_PASSWORD, dsn], {k: v for k, v in captured.items() if k.startswith(label)})
    assert_absent([CANARY_PASSWORD], captured)


# -- in-cluster: operator + real worker over kmock ----------------------------------------------


class Capture(logging.Handler):
    """Every log record of the process (operator, kopf, worker code), fully formatted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def all_logs() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


NS = "secrets"


def secret(name: str, dsn: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {"dsn": base64.b64encode(dsn.encode()).decode()}}


@pytest.mark.kmock(cls=ApiServerEmulator)
@pytest.mark.timeout(180)
async def test_cluster_status_events_logs_metrics_never_hold_the_password(
    kmock, database: str, tmp_path: Path, all_logs: Capture
) -> None:
    declare_resources(kmock)
    api = KubeApi.from_environment(server=str(kmock.url))
    await call(ledger.seed, database, 30_000)
    unreachable = f"postgresql://postgres:{CANARY_PASSWORD}@127.0.0.1:{free_port()}/nowhere"
    for name, dsn in (("db", database), ("db-unreachable", unreachable)):
        await call(api.create, core_path(NS, "secrets"), secret(name, dsn))
    slow = {"size": 500, "minSize": 100, "maxSize": 500, "targetDuration": "0s", "pause": "40ms"}
    backfills = {
        "good": ledger.manifest("good", database={"dsnSecretRef": {"name": "db"}}, batch=slow),
        "bad-where": ledger.manifest("bad-where", database={"dsnSecretRef": {"name": "db"}}, where="nope > 1"),
        "unreachable": ledger.manifest("unreachable", database={"dsnSecretRef": {"name": "db-unreachable"}}),
    }
    operator_port = free_port()
    config = OperatorConfig(namespaces=(NS,), server=str(kmock.url), metrics_port=operator_port, resync_seconds=0.3)
    kubelet = FakeKubelet(api, NS, write_kubeconfig(tmp_path, str(kmock.url)), tmp_path)
    stop = asyncio.Event()
    kubelet_task = asyncio.create_task(kubelet.run(stop))
    captured: dict[str, str] = {}
    try:
        async with operator_running_async(config):
            for document in backfills.values():
                document["metadata"]["namespace"] = NS
                await call(api.create, backfill_path(NS), document)
            # Scrape the good worker's metrics while it runs, and the operator's.
            pod = await eventually_async(lambda: kubelet.pods.get("good-s0-r1"), "the good worker pod")
            worker_scrapes = []
            while pod.process.poll() is None:
                if (text := await call(scrape, pod.metrics_port)) is not None:
                    worker_scrapes.append(text)
                await asyncio.sleep(0.3)
            finals = {}
            for name, phase in (("good", "Succeeded"), ("bad-where", "Failed"), ("unreachable", "Failed")):
                finals[name] = await eventually_async(
                    lambda n=name, p=phase: (b := api.get(backfill_path(NS, n)))["status"].get("phase") == p and b,
                    f"{name} {phase}",
                )
            captured["operator metrics"] = await call(scrape, operator_port) or ""
    finally:
        stop.set()
        await kubelet_task
        kubelet.kill_all()
    captured["worker metrics"] = "\n".join(worker_scrapes)
    captured |= {f"status {name}": json.dumps(obj) for name, obj in finals.items()}
    captured["events"] = json.dumps(await call(api.list, core_path(NS, "events")))
    captured["jobs"] = json.dumps(await call(api.list, jobs_path(NS)))
    captured |= kubelet.output()
    captured["process logs"] = "\n".join(all_logs.lines)
    api.close()

    # The captures are real: they hold what a user would look at.
    assert "backfill_rows_updated_total" in captured["worker metrics"]
    assert "backfill_operator_reconciles_total" in captured["operator metrics"]
    assert finals["good"]["status"]["progress"]["rowsUpdated"] > 0
    bad_shard = finals["bad-where"]["status"]["shards"]["0"]
    assert "spec.where" in bad_shard["lastError"]
    assert "cannot connect" in finals["unreachable"]["status"]["shards"]["0"]["lastError"]
    assert any(json.loads(line).get("event") for line in captured["good-s0-r1-0 stderr"].splitlines() if line.startswith("{"))
    assert "secretKeyRef" in captured["jobs"]
    assert len(captured["process logs"]) > 0
    assert_absent([CANARY_PASSWORD, database, unreachable], captured)
    # Nor the base64 of a DSN (a Secret's data copied somewhere would show it that way).
    assert_absent([base64.b64encode(d.encode()).decode() for d in (database, unreachable)],
                  {k: v for k, v in captured.items()})
