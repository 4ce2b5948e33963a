"""The Python client is its own distribution (clients/python, `ciris-billing-client`): installed
alone into an empty virtualenv, beside httpx and nothing else, it imports without any server
code and runs a check, a charge, a 402 and a hold against a real running service.

Offline by construction: the client is built into a wheel here (no build isolation), and httpx
with its own dependencies is copied from this environment's installed distributions (their
RECORDed files), so no package index is asked.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.support.cli import create_key
from tests.support.servers import running_service, service_env

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]

# Run by the empty virtualenv's python: everything the independent check does, with the client.
SCRIPT = r"""
import importlib.util, json, sys, uuid
from ciris_billing_client import BillingClient, PurchaseRequiredError, __version__

# No server code, no server dependency: only the client and httpx's own.
absent = [m for m in ("ciris_billing", "fastapi", "sqlalchemy", "stripe", "pydantic")
          if importlib.util.find_spec(m) is not None]
base, key = sys.argv[1], sys.argv[2]
user = f"pkg-{uuid.uuid4().hex[:10]}@example.com"
out = {"version": __version__, "present": absent}
with BillingClient(base, key, backoff=0.01, max_backoff=0.1) as billing:
    check = billing.check("oauth:google", user)
    out["check"] = [check.has_credit, check.free_uses_remaining]
    out["charges"] = [billing.charge("oauth:google", user, description="turn").free_uses_remaining
                      for _ in range(3)]
    try:
        billing.charge("oauth:google", user)
    except PurchaseRequiredError as e:
        out["402"] = [e.status, e.offer.uses, e.offer.price_minor, bool(e.checkout_url)]
    other = f"pkg-{uuid.uuid4().hex[:10]}@example.com"
    with billing.reserve("oauth:google", other, uses=2, ttl=60) as hold:
        out["held"] = hold.reservation.held_uses
        captured = hold.capture(1, description="agent run")
    out["captured"] = [captured.uses, captured.released_uses, captured.free_uses_remaining]
print(json.dumps(out))
"""


def _distributions(name: str, seen: set[str]) -> None:
    """`name` and, recursively, what it requires here (no extras; markers for this Python)."""
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return
    seen.add(key)
    for line in importlib.metadata.requires(name) or ():
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            _distributions(requirement.name, seen)


def _copy_installed(names: set[str], site_packages: Path) -> None:
    """Install distributions by copying the files their RECORD lists (a wheel install, undone
    from this environment): the empty venv gets exactly these and nothing else."""
    for name in names:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            if file.parts[0] == ".." or not source.is_file() or "__pycache__" in file.parts:
                continue
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


@pytest.mark.slow
def test_the_client_alone_in_an_empty_venv_checks_charges_and_holds(
    fresh_database: str, tmp_path: Path
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    httpx_and_its_own: set[str] = set()
    _distributions("httpx", httpx_and_its_own)
    assert "fastapi" not in httpx_and_its_own
    _copy_installed(httpx_and_its_own, site_packages)

    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(wheels), str(CLIENT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("ciris_billing_client-*.whl")
    # --no-index: its one dependency, httpx, must already be satisfied (nothing else is asked).
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert "ciris-billing-client" in names
    assert "ciris-billing" not in names

    env = service_env(fresh_database)
    key = create_key(env, "write")
    with running_service(env, tmp_path / "service.log") as base:
        ran = subprocess.run(
            [python, "-c", SCRIPT, base, key],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,  # not the repository: nothing importable from it
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out = json.loads(ran.stdout)
    assert out["version"] == "0.1.0"
    assert out["present"] == []
    assert out["check"] == [True, 3]
    assert out["charges"] == [2, 1, 0]
    assert out["402"] == [402, 20, 500, True]
    assert out["held"] == 2
    assert out["captured"] == [1, 1, 2]


def test_the_server_re_exports_the_client_under_its_old_name() -> None:
    import ciris_billing_client
    from ciris_billing import client
    from ciris_billing.client import errors, models

    assert client.AsyncBillingClient is ciris_billing_client.AsyncBillingClient
    assert client.PurchaseRequiredError is ciris_billing_client.PurchaseRequiredError
    assert set(client.__all__) == set(ciris_billing_client.__all__)
    assert errors.BillingError is ciris_billing_client.BillingError
    assert models.Charge is ciris_billing_client.Charge
    # One copy of the code: the server's package holds no client module of its own.
    assert Path(ciris_billing_client.__file__).parent == CLIENT / "src" / "ciris_billing_client"
