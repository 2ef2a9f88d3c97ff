"""A network the test owns: PostgreSQL in its own network namespace, joined to the host by a
veth pair, and a switch that silently drops every packet inside that namespace (``iptables -j
DROP`` on INPUT and OUTPUT: no reset, no ICMP, what a dead switch or a firewall timeout looks like).

Addresses are 10.213.<n>.1 (host side) and 10.213.<n>.2 (the namespace): private addresses that
exist only on the veth pair this module creates, and tears down again. Needs root (``ip netns``,
iproute2, and iptables); :func:`available` says why not when it cannot.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from backfill_cli.localpg import LocalPostgres


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


def available() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"bfprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except FileNotFoundError:
        return "iproute2 (`ip`) is not installed: apt-get install iproute2"
    except subprocess.CalledProcessError as error:
        return f"cannot create a network namespace: {error.stderr.strip()}"
    _ip("netns", "delete", probe)
    try:
        subprocess.run(["iptables", "-V"], capture_output=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError):
        return "iptables is not installed: apt-get install iptables"
    return None


@dataclass
class Partitionable:
    """The namespace and veth pair; ``partition()`` / ``heal()`` drop or pass every packet."""

    subnet: int = field(default_factory=lambda: 1 + uuid.uuid4().int % 250)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def __post_init__(self) -> None:
        self.netns = f"bfpart{self.tag}"
        self.host_dev, self.ns_dev = f"bfh{self.tag}", f"bfn{self.tag}"
        self.host_address, self.ns_address = f"10.213.{self.subnet}.1", f"10.213.{self.subnet}.2"
        self.partitioned = False

    def create(self) -> Partitionable:
        _ip("netns", "add", self.netns)
        try:
            _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            _ip("link", "set", self.ns_dev, "netns", self.netns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_dev)
            _ip("link", "set", self.host_dev, "up")
            for args in (("addr", "add", f"{self.ns_address}/30", "dev", self.ns_dev), ("link", "set", self.ns_dev, "up"),
                         ("link", "set", "lo", "up")):
                _ip("-n", self.netns, *args)
        except BaseException:
            self.destroy()
            raise
        return self

    def _iptables(self, action: str) -> None:
        # Inside the namespace only: PostgreSQL's side neither receives nor sends anything, and
        # DROP (not REJECT) means no reset and no ICMP ever reaches the engine.
        for chain in ("INPUT", "OUTPUT"):
            subprocess.run(["ip", "netns", "exec", self.netns, "iptables", action, chain, "-j", "DROP"],
                           capture_output=True, text=True, check=True)

    def partition(self) -> None:
        self._iptables("-A")
        self.partitioned = True

    def heal(self) -> None:
        if self.partitioned:
            self._iptables("-D")
            self.partitioned = False

    def destroy(self) -> None:
        """Deleting the namespace deletes its veth end, and with it the host's."""
        subprocess.run(["ip", "link", "delete", self.host_dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, check=False)


@dataclass
class NetnsPostgres(LocalPostgres):
    """A LocalPostgres whose postmaster (and so every backend) runs inside ``network``'s namespace."""

    network: Partitionable | None = None

    def initdb(self) -> None:
        assert self.data_dir is not None
        fresh = not (self.data_dir / "PG_VERSION").exists()
        super().initdb()
        if fresh:  # clients arrive from the host end of the veth pair, not from loopback
            with open(self.data_dir / "pg_hba.conf", "a", encoding="utf-8") as hba:
                hba.write("host all all 10.213.0.0/16 scram-sha-256\n")

    def _server_options(self) -> str:
        assert self.network is not None
        # Unix socket for pg_ctl's own readiness check; TCP only on the namespace's address.
        return super()._server_options().replace("listen_addresses=127.0.0.1", f"listen_addresses={self.network.ns_address}")

    def _run(self, *args: str, check: bool = True, env_extra: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if args and args[0].endswith("pg_ctl") and "start" in args and self.network is not None:
            assert self._user is not None
            env = {**os.environ, "LC_ALL": "C", "LANG": "C", **(env_extra or {})}
            command = ["ip", "netns", "exec", self.network.netns, "runuser", "-u", self._user.pw_name, "--", *args]
            return subprocess.run(command, capture_output=True, text=True, check=check, env=env)
        return super()._run(*args, check=check, env_extra=env_extra)

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        assert self.network is not None
        return super().dsn(dbname, user, password).replace("host=127.0.0.1", f"host={self.network.ns_address}")
