"""The container definitions (Dockerfile, .dockerignore, Singularity.def, docker/requirements.lock), read statically.

Building and running the image is tests/container/smoke.sh (needs docker, minutes); these tests need neither docker
nor apptainer. Singularity.def is parsed with spython, the Singularity Python API that converts recipes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
VERSION = (REPO / "version").read_text().strip()


# --------------------------------------------------------------------------------------------------- helpers
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
        logical = ""
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions after the last ``FROM``."""
    last = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last:]


def dockerignore_excludes(path: str, lines: list[str]) -> bool:
    """Whether docker leaves ``path`` (relative, ``/``-separated) out of the build context.

    Docker's rules (moby patternmatcher): patterns in order, the last matching one wins, ``!`` re-includes, a
    pattern matches a path when it matches the path or one of its parent folders, ``*`` stays within one path
    component and ``**`` spans any number of them.
    """
    result = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in lines:
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = os.path.normpath(pattern.lstrip("!").lstrip("/"))
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        if any(re.fullmatch(regex, c) for c in candidates):
            result = not negate
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def singularity():
    parsers = pytest.importorskip("spython.main.parse.parsers")
    recipe = parsers.SingularityParser(str(REPO / "Singularity.def")).recipe
    assert list(recipe) == ["spython-base"], "Singularity.def must have a single stage"
    return recipe["spython-base"]


def singularity_sections(text: str) -> dict[str, str]:
    """Raw ``%section`` bodies of a definition file, plus ``header`` (the lines before the first section)."""
    sections: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            sections[current] = []
        else:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


# ------------------------------------------------------------------------------------------------- Dockerfile
def test_dockerfile_base_is_an_argument_before_the_first_stage(dockerfile):
    keyword, args = dockerfile[0]
    assert keyword == "ARG" and args.startswith("BASE=") and len(args) > len("BASE=")
    froms = [a for k, a in dockerfile if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a slim runtime stage"
    assert all(a.split()[0] == "${BASE}" for a in froms), froms


def test_dockerfile_entrypoint_and_version_label(dockerfile):
    final = final_stage(dockerfile)
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["atlasgs-bids"]
    labels = " ".join(a for k, a in final if k == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert "VERSION" in [a.split("=")[0] for k, a in final if k == "ARG"], "the label needs ARG VERSION in its stage"
    # the build refuses a VERSION other than the version file's, so the label is the package's version
    runs = " ".join(a for k, a in dockerfile if k == "RUN")
    assert 'test "${VERSION}" = "$(cat /src/version)"' in runs
    assert 'test "$(cd / && atlasgs-bids --version)" = "atlasgs-bids ${VERSION}"' in runs


def test_dockerfile_installs_pinned_non_editable_and_runs_as_any_user(dockerfile):
    runs = [a for k, a in dockerfile if k == "RUN"]
    assert any("-r /tmp/requirements.lock" in r for r in runs)
    install = [r for r in runs if "pip install --no-deps /src" in r]
    assert install and not any(re.search(r"pip install[^&]*\s-e\s", r) for r in runs), "package must be non-editable"
    final = final_stage(dockerfile)
    assert not [a for k, a in final if k == "USER"], "no fixed USER: the image runs as whatever uid it is given"
    assert not [a for k, a in final if k == "RUN"], "the runtime stage only copies the built environment"
    env = " ".join(a for k, a in final if k == "ENV")
    for var in ("HOME=/tmp", "MPLCONFIGDIR=/tmp/", "DENO_DIR=/tmp/", "XDG_CACHE_HOME=/tmp/", "NIPYPE_NO_ET=1",
                "ATLASGS_CONTAINER_TYPE=docker"):
        assert var in env, var


def test_requirements_lock_pins_every_declared_dependency():
    lock = {}
    for line in (REPO / "docker/requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin: {line}"
            lock[name.strip().lower()] = version.strip()
    assert "torch" not in lock and "atlasgs-bids" not in lock, "torch comes from TORCH_SPEC; the package from /src"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in map(Requirement, declared):
        name = re.sub(r"[-_.]+", "-", spec.name).lower()
        if name == "torch":
            continue
        assert name in lock, f"{name} missing from docker/requirements.lock (rerun docker/lock.py)"
        assert spec.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} violates {spec}"


@pytest.mark.parametrize(("path", "excluded"), [
    (".venv/bin/python", True), (".git/HEAD", True), ("work/sub-01/x.pklz", True), ("out/logs/a.json", True),
    ("tests/conftest.py", True), ("docs/usage.md", True), ("docker/build-base.sh", True),
    ("atlasgs_bids/__pycache__/cli.cpython-311.pyc", True), ("atlasgs_bids/gaussians/__pycache__", True),
    ("atlasgs_bids.egg-info/PKG-INFO", True), ("atlasgs_bids/work/x", True),
    ("atlasgs_bids/cli/entry.py", False), ("atlasgs_bids/gaussians/field.py", False), ("pyproject.toml", False),
    ("version", False), ("README.md", False), ("docker/requirements.lock", False),
])
def test_dockerignore(path, excluded):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert dockerignore_excludes(path, lines) is excluded


def test_dockerignore_keeps_everything_the_dockerfile_copies(dockerfile):
    lines = (REPO / ".dockerignore").read_text().splitlines()
    copies = [a for k, a in dockerfile if k == "COPY" and "--from" not in a]
    sources = [s for a in copies for s in a.split()[:-1]]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not dockerignore_excludes(src, lines), f"{src} is copied but .dockerignore leaves it out"


# --------------------------------------------------------------------------------------------- Singularity.def
def test_singularity_builds_from_the_docker_image_of_this_version(singularity):
    header = singularity_sections((REPO / "Singularity.def").read_text())["header"]
    agent = re.search(r"^Bootstrap:\s*(\S+)", header, re.M)
    assert agent and agent.group(1) in {"docker-daemon", "docker", "docker-archive"}
    assert singularity.fromHeader.split("/")[-1] == f"atlasgs-bids:{VERSION}"


def test_singularity_runscript_passes_arguments(singularity):
    assert singularity.cmd.strip() == 'exec atlasgs-bids "$@"'


def test_singularity_label_is_the_version_file(singularity):
    labels = dict(line.split(None, 1) for line in singularity.labels)
    assert labels["org.opencontainers.image.version"] == VERSION


def test_singularity_test_section_checks_the_version(singularity):
    body = singularity_sections((REPO / "Singularity.def").read_text())["test"]
    assert "atlasgs-bids --version" in body and f'expected="atlasgs-bids {VERSION}"' in body
    assert "exit 1" in body
    assert singularity.test, "spython found no %test"


def test_singularity_environment_keeps_caches_out_of_home_and_image(singularity):
    env = dict(item.split("=", 1) for item in singularity.environ if re.match(r"^\w+=", item))
    for var in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "DENO_DIR"):
        assert var in env and "TMPDIR" in env[var] + env.get("XDG_CACHE_HOME", "") + env.get("ATLASGS_CACHE", "")
    body = singularity_sections((REPO / "Singularity.def").read_text())["environment"]
    assert "unset ATLASGS_CONTAINER_TYPE ATLASGS_CONTAINER_TAG" in body, "Apptainer must not report 'docker'"


# ------------------------------------------------------------------------------------------------- smoke.sh
def test_smoke_script_is_valid_bash_and_skips_without_docker(tmp_path):
    script = REPO / "tests/container/smoke.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    # a docker daemon that cannot be reached: a clear SKIP, exit 0, nothing built
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SKIP" in proc.stdout
    if shutil.which("docker") is None:
        assert "no docker client" in proc.stdout
    else:
        assert "daemon not reachable" in proc.stdout
