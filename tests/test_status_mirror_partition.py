"""A silent partition between the in-cluster worker and the API server (issue 10, item 6).

Between the worker and the API server (kmock over real HTTP) sits a TCP relay the test owns;
"partitioned", it stops moving bytes in both directions but keeps every connection open (no
reset, no error: requests just hang, as behind a dead switch). The batches must go on (the
status mirror and the spec poller never block the engine), and once the relay moves bytes
again the status catches up with the final state.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
from kube_support.emulator import ApiServerEmulator, declare_resources
from test_kube_worker import NS, backfill, make_table, table_state

from backfill_api.kubeapi import KubeApi, backfill_path
from backfill_worker.kube.worker import run_worker
from backfill_worker.observe.events import BatchCommitted, Event

pytestmark = [pytest.mark.kmock(cls=ApiServerEmulator), pytest.mark.timeout(180)]
PARTITION_SECONDS = 8.0


class PausableRelay:
    """127.0.0.1:<port> -> target; ``paused`` stops all forwarding without closing anything."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.paused = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(0.1)
        while not self._stop.is_set():
            if self.paused.is_set():  # neither read nor write: the bytes wait, as TCP would retransmit them
                time.sleep(0.05)
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            while self.paused.is_set():
                time.sleep(0.05)
            try:
                sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


async def test_batches_go_on_while_the_api_server_is_unreachable_and_status_catches_up(kmock, database):
    declare_resources(kmock)
    url = urlparse(str(kmock.url))
    relay = PausableRelay(url.hostname or "127.0.0.1", url.port or 80)
    api = KubeApi.from_environment(server=f"http://127.0.0.1:{relay.port}")
    try:
        make_table(database, rows=6000)
        spec = {"batch": {"size": 100, "minSize": 100, "maxSize": 100, "targetDuration": "0", "pause": "80ms"}}
        await asyncio.to_thread(api.create, backfill_path(NS), backfill("cut", **spec))
        batches: list[float] = []

        def on_event(event: Event) -> None:
            if isinstance(event, BatchCommitted):
                batches.append(time.monotonic())

        worker = asyncio.create_task(asyncio.to_thread(
            run_worker, api, NS, "cut", 0, database, run=1, listeners=(on_event,), poll_seconds=0.2, patch_interval=0.3,
        ))
        while len(batches) < 5:
            await asyncio.sleep(0.02)
        relay.paused.set()
        cut_at = time.monotonic()
        await asyncio.sleep(PARTITION_SECONDS)
        during = sum(1 for t in batches if t > cut_at)
        relay.paused.clear()
        code = await asyncio.wait_for(worker, timeout=120)
        obj = await asyncio.to_thread(api.get, backfill_path(NS, "cut"))
    finally:
        api.close()
        relay.close()
    print(f"FAULT-FIGURES {{\"fault\": \"worker-API server partition\", \"seconds\": {PARTITION_SECONDS}, "
          f"\"batches_during\": {during}, \"batches\": {len(batches)}}}")
    assert code == 0
    assert during >= 10, f"only {during} batches committed while the API server was unreachable"
    assert table_state(database) == {"once": 4000, "twice": 0, "wrong_rows": 0}
    shard = obj["status"]["shards"]["0"]
    assert shard["state"] == "done" and shard["rowsUpdated"] == 4000 and shard["percent"] == 100
