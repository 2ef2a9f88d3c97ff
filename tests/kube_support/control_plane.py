"""A real Kubernetes control plane on loopback, from envtest-style binaries (``KUBEBUILDER_ASSETS``).

``KUBEBUILDER_ASSETS`` must hold ``etcd`` and ``kube-apiserver``; ``kube-controller-manager`` is
optional (with it, Jobs get Pods and owner references are garbage-collected). Everything the
processes need is generated here, from nothing: a CA and a serving certificate (``cryptography``),
a service-account signing key and a static bearer-token file (admin in ``system:masters`` and the
controller-manager's identity). RBAC authorization is on, as in a real cluster. No kubelet, no
scheduler: Pods stay Pending, and tests play the kubelet by writing Pod status.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

REQUIRED = ("etcd", "kube-apiserver")


def missing_assets(assets: str | None) -> str | None:
    """Why the real-server tests cannot run, or None when they can."""
    if not assets:
        return "KUBEBUILDER_ASSETS is not set (see docs/testing.md: Testing against a real API server)"
    absent = [b for b in REQUIRED if not os.access(Path(assets) / b, os.X_OK)]
    return f"KUBEBUILDER_ASSETS={assets} lacks {', '.join(absent)}" if absent else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())


def _certificates(directory: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key, sa_key = _key(), _key(), _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backfill-test-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")]
    server = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([*names, x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(_pem_key(ca_key))
    (directory / "server.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (directory / "server.key").write_bytes(_pem_key(server_key))
    (directory / "sa.key").write_bytes(_pem_key(sa_key))
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _minor_version(binary: Path) -> int:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v1\.(\d+)", out)
    return int(match.group(1)) if match else 99


AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
"""


@dataclass(frozen=True)
class AuditedRequest:
    user: str
    verb: str
    resource: str
    namespace: str
    name: str
    code: int
    at: float
    """When the server received it (epoch seconds)."""


def _epoch(stamp: str) -> float:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class ControlPlane:
    def __init__(self, assets: str | Path, *, audit: bool = False) -> None:
        """``audit``: the API server writes an audit log (every request: user, verb, resource)."""
        self.assets = Path(assets)
        self.audit = audit
        self.dir = Path(tempfile.mkdtemp(prefix="backfill-k8s-"))
        self.api_port = _free_port()
        self.admin_token = secrets.token_hex(24)
        self._cm_token = secrets.token_hex(24)
        self._procs: list[subprocess.Popen[bytes]] = []
        self.has_controller_manager = os.access(self.assets / "kube-controller-manager", os.X_OK)
        self.version = ""

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def _start(self, name: str, *args: str) -> None:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115  (kept open for the process's life)
        self._procs.append(subprocess.Popen([str(self.assets / name), *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL))

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join((self.dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _get(self, path: str, *, token: str | None = None) -> bytes:
        context = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        request = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {token or self.admin_token}"})
        with urllib.request.urlopen(request, context=context, timeout=5) as response:
            return response.read()

    def _wait(self, what: str, probe, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe():
                    return
            except Exception:  # not up yet
                pass
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited while waiting for {what}:\n{self.log_tail(Path(proc.args[0]).name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.log_tail('kube-apiserver')}")
            time.sleep(0.3)

    def start(self) -> ControlPlane:
        _certificates(self.dir)
        (self.dir / "tokens.csv").write_text(
            f'{self.admin_token},backfill-test-admin,admin,"system:masters"\n'
            f"{self._cm_token},system:kube-controller-manager,kcm\n"
        )
        etcd_port, peer_port = _free_port(), _free_port()
        self._start(
            "etcd", f"--data-dir={self.dir / 'etcd'}", "--name=test",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}", f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}", f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=test=http://127.0.0.1:{peer_port}", "--log-level=warn",
        )
        minor = _minor_version(self.assets / "kube-apiserver")
        legacy = ["--insecure-port=0"] if minor < 24 else []
        self._start(
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}", *legacy,
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={self.dir / 'server.crt'}", f"--tls-private-key-file={self.dir / 'server.key'}",
            f"--token-auth-file={self.dir / 'tokens.csv'}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.dir / 'sa.pub'}", f"--service-account-signing-key-file={self.dir / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none", "--allow-privileged=true",
            "--profiling=false", *self._audit_flags(),
        )
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz") == b"ok")
        self.version = self._get("/version").decode()
        if self.has_controller_manager:
            kubeconfig = self.write_kubeconfig(self.dir / "kcm.kubeconfig", self._cm_token)
            cm_legacy = ["--port=0"] if minor < 24 else []
            self._start(
                "kube-controller-manager", f"--kubeconfig={kubeconfig}", "--bind-address=127.0.0.1",
                f"--secure-port={_free_port()}", *cm_legacy, f"--cert-dir={self.dir / 'kcm-certs'}",
                "--leader-elect=false", "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.dir / 'sa.key'}", f"--root-ca-file={self.dir / 'ca.crt'}",
                f"--cluster-signing-cert-file={self.dir / 'ca.crt'}", f"--cluster-signing-key-file={self.dir / 'ca.key'}",
                "--profiling=false",
            )
            # Pods cannot be admitted before the namespace's default ServiceAccount (and its token) exist.
            self._wait("the default ServiceAccount", lambda: b'"secrets"' in self._get("/api/v1/namespaces/default/serviceaccounts/default"))
        return self

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        (self.dir / "audit-policy.yaml").write_text(AUDIT_POLICY)
        return [f"--audit-policy-file={self.dir / 'audit-policy.yaml'}", f"--audit-log-path={self.dir / 'audit.log'}",
                "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0"]

    def audited(self, since: float = 0.0, until: float = float("inf")) -> list[AuditedRequest]:
        """Completed requests received in [since, until) (epoch seconds); needs ``audit=True``.

        A watch appears once it has ended (its ResponseComplete): one still open is not listed.
        """
        requests = []
        for line in (self.dir / "audit.log").read_text().splitlines():
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete":
                continue
            at = _epoch(event["requestReceivedTimestamp"])
            if not since <= at < until:
                continue
            ref = event.get("objectRef") or {}
            requests.append(AuditedRequest(
                user=event.get("user", {}).get("username", ""), verb=event.get("verb", ""),
                resource=ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else ""),
                namespace=ref.get("namespace", ""), name=ref.get("name", ""),
                code=int((event.get("responseStatus") or {}).get("code") or 0), at=at,
            ))
        return requests

    def write_kubeconfig(self, path: Path, token: str | None = None, namespace: str = "default") -> Path:
        import base64

        import yaml

        ca = base64.b64encode((self.dir / "ca.crt").read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "user", "user": {"token": token or self.admin_token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
