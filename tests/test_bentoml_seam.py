"""BentoML's private API is used in ``ingrain_bento/bentoml_seam.py`` only, and each value it
reads still comes back from the installed BentoML (an upgrade that moves one fails here)."""

from __future__ import annotations

import re
from pathlib import Path

from ingrain_bento import bentoml_seam

REPO = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(r"^\s*(from|import)\s+(bentoml\._internal|_bentoml_impl|_bentoml_sdk)\b", re.MULTILINE)


def test_only_the_seam_imports_bentomls_private_modules():
    sources = [REPO / "service.py", *sorted((REPO / "ingrain_bento").rglob("*.py"))]
    importing = [str(path.relative_to(REPO)) for path in sources if PRIVATE.search(path.read_text())]
    assert importing == ["ingrain_bento/bentoml_seam.py"]


def test_the_machines_resources_are_read_without_importing_torch():
    """The probe runs when the service module is imported, in every process: in a fresh one it
    must not import torch (~15 s) or touch a GPU."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import sys; from ingrain_bento.bentoml_seam import "
                            "machine_resources; print(*machine_resources()); print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120, cwd=REPO, check=True)
    resources, torch_imported = probe.stdout.splitlines()[-2:]
    cpus, gpus = resources.split()
    assert float(cpus) >= 1 and int(gpus) >= 0
    assert torch_imported == "False", probe.stdout


def test_the_home_is_the_one_bentoml_resolved_from_bentoml_home():
    import os

    assert bentoml_seam.bentoml_home() == Path(os.environ["BENTOML_HOME"])  # set by tests/conftest.py


def test_outside_bentoml_serve_there_is_no_dependency_and_the_worker_is_the_first():
    assert bentoml_seam.dependency_address("ingrain-runner") is None
    assert bentoml_seam.worker_index() == 0


def test_bentomls_worker_still_serves_the_services_to_asgi():
    """``serve_outside_bentoml`` wraps ``Service.to_asgi``: the worker must still serve what it returns."""
    import inspect

    from _bentoml_impl.worker import service as worker

    assert "service.to_asgi(" in inspect.getsource(worker)
