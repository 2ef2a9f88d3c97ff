"""plugins/krew: the krew manifest matches the archive built from the repository, and the shim in
it runs the installed plugin (or says how to install it)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KREW = ROOT / "plugins" / "krew"


def _builder():
    spec = importlib.util.spec_from_file_location("build_archive", KREW / "build_archive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_is_a_krew_plugin_whose_sha256_is_the_archive_built_here():
    manifest = yaml.safe_load((KREW / "backfill.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]) == (
        "krew.googlecontainertools.github.com/v1alpha2", "Plugin", "backfill")
    spec = manifest["spec"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert spec["version"] == f"v{version}" and f"/v{version}/" in spec["platforms"][0]["uri"]
    assert "pip install" in spec["caveats"] and spec["shortDescription"]
    builder = _builder()
    assert builder.archive_bytes() == builder.archive_bytes(), "the archive must be reproducible"
    platform = spec["platforms"][0]
    assert platform["sha256"] == builder.sha256(), "run: python plugins/krew/build_archive.py (and update the sha256)"
    with tarfile.open(fileobj=io.BytesIO(builder.archive_bytes()), mode="r:gz") as archive:
        names = set(archive.getnames())
        assert archive.getmember(platform["bin"]).mode & 0o111
    assert {f["from"] for f in platform["files"]} <= names and platform["bin"] in names


def test_the_shim_runs_the_installed_plugin_or_says_what_to_install(tmp_path):
    shim = KREW / "kubectl-backfill"
    ran = subprocess.run([str(shim), "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KUBECTL_BACKFILL_PYTHON": sys.executable})
    assert ran.returncode == 0 and "kubectl plugin for Backfill resources" in ran.stdout
    bare = tmp_path / "python-without-the-package"
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    missing = subprocess.run([str(shim), "list"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "KUBECTL_BACKFILL_PYTHON": str(bare)})
    assert missing.returncode == 127 and "pip install ." in missing.stderr


def test_the_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-backfill"] == "backfill_kubectl.app:main"
