"""`backfill --log-format json --metrics-port P run ...` as a user runs it: a real process, a real database."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict

BACKFILL = Path(sys.executable).parent / "backfill"
ROWS = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def test_json_logs_and_live_metrics_of_a_cli_run(database: str, tmp_path: Path) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, status text)")
        conn.execute(f"INSERT INTO customers SELECT i, NULL FROM generate_series(1, {ROWS}) i")
    manifest = tmp_path / "bf.yaml"
    manifest.write_text(yaml.safe_dump({
        "apiVersion": "backfill.dev/v1alpha1", "kind": "Backfill",
        "metadata": {"name": "customers-inactive", "namespace": "shop"},
        # 12 batches, 150 ms apart: long enough to scrape the endpoint while it runs.
        "spec": {"table": "customers", "set": {"status": "'inactive'"}, "where": "status IS NULL",
                 "batch": {"size": 50, "minSize": 50, "maxSize": 50, "targetDuration": "0", "pause": "150ms"}},
    }))
    port = free_port()
    env = {**os.environ, "BACKFILL_DSN": database, "BACKFILL_LOG_FORMAT": "json"}
    process = subprocess.Popen(
        [str(BACKFILL), "--log-level", "DEBUG", "--metrics-port", str(port), "run", str(manifest), "--json-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    live = None
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        body = scrape(port)
        if body and 'backfill_rows_updated_total{name="customers-inactive",namespace="shop",shard="0"}' in body:
            live = body
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr

    assert live is not None, "the /metrics endpoint never showed the run's rows while it ran"
    assert "backfill_batch_duration_seconds_bucket" in live
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines, stderr
    assert [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")] == []
    for line in lines:
        assert line["namespace"] == "shop" and line["name"] == "customers-inactive", line
    events = [line["event"] for line in lines]
    assert "run started" in events and "run finished" in events and "batch committed" in events
    password = conninfo_to_dict(database)["password"]
    assert password not in stdout + stderr and database not in stdout + stderr
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM customers WHERE status = 'inactive'").fetchone() == (ROWS,)
