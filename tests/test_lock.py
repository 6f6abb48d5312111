"""The lock: one set of versions, the one the tests ran with, used everywhere it matters.

``lock/test.txt`` pins every package the suite runs with (``pip freeze`` of the venv in which
``lock/refresh.sh`` saw the suite pass); ``lock/runtime.txt`` pins the part of it the server
needs, which the Bento and its container install (``service.py``). ``pyproject.toml`` keeps its
ranges for people who install the package into their own environment; the lock must sit inside
them. The offline Bento build in ``tests/test_e2e_clients.py`` checks that the Bento's packages
are exactly ``lock/runtime.txt``.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fixtures.lock import read_lock

REPO = Path(__file__).resolve().parents[1]
PIP_CAP = Path("/etc/xdg/pip/constraints.txt")  # these machines' pip cap (torch<=2.14.1): see README


def project_requirements(extra: str | None = None) -> list[Requirement]:
    """``pyproject.toml``'s dependencies (or one extra's) that apply on this machine."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate({"extra": extra or ""})]


@pytest.mark.parametrize(("lock", "extra"), [("runtime", None), ("test", None), ("test", "test")])
def test_the_lock_sits_inside_pyprojects_ranges(lock, extra):
    """A dependency added or narrowed in pyproject.toml without a refresh of the lock fails here."""
    pins = read_lock(lock)
    for requirement in project_requirements(extra):
        key = canonicalize_name(requirement.name)
        assert key in pins, f"{requirement.name} is in pyproject.toml but not in lock/{lock}.txt: run lock/refresh.sh"
        assert requirement.specifier.contains(pins[key], prereleases=True), \
            f"lock/{lock}.txt pins {requirement.name}=={pins[key]}, outside pyproject.toml's {requirement}"


def test_the_servers_lock_is_the_test_locks_own_versions():
    runtime, test = read_lock("runtime"), read_lock("test")
    assert runtime, "lock/runtime.txt pins nothing"
    differing = {name: (version, test.get(name)) for name, version in runtime.items() if test.get(name) != version}
    assert not differing, f"lock/runtime.txt and lock/test.txt disagree: {differing}"
    assert {"torch", "bentoml", "sentence-transformers", "transformers"} <= runtime.keys()
    assert not {"pytest", "ruff", "mypy"} & runtime.keys(), "the server's lock carries test tools"


def test_these_tests_run_with_exactly_the_locked_versions():
    """What the README's test command installs (``pip install -r lock/test.txt``) is what runs."""
    installed: dict[str, str | None] = {}
    pins = read_lock("test")
    for name in pins:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed[name] = None
    differing = {name: (pinned, installed[name]) for name, pinned in pins.items() if installed[name] != pinned}
    assert not differing, ("these packages differ from lock/test.txt (pinned, installed): "
                           f"{differing}; install with pip install -r lock/test.txt -e '.[test]'")


@pytest.mark.skipif(not PIP_CAP.is_file(), reason="this machine's pip has no cap")
def test_the_lock_is_installable_under_this_machines_pip_cap():
    pins = read_lock("test")
    for line in PIP_CAP.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            cap = Requirement(line)
            pinned = pins.get(canonicalize_name(cap.name))
            assert pinned is None or cap.specifier.contains(pinned), f"lock pins {cap.name}=={pinned}, cap is {cap}"
