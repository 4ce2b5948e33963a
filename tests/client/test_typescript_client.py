"""The TypeScript client (clients/typescript, `@ciris/billing`) against a real running service:
its own tests under Node's test runner (`node --test`), then the package as npm packs it,
installed alone into an empty folder, and the example agent (examples/agent.mjs).

The service runs as a process on 127.0.0.1 (delivering outgoing webhooks every second, to
private addresses: the node tests receive one and verify its signature)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.cli import create_key
from tests.support.servers import running_service, service_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
EXAMPLE = ROOT / "examples" / "agent.mjs"
NODE_SECONDS = 180


def node() -> str:
    found = shutil.which("node")
    assert found is not None, "Node.js (>= 18) is needed for the TypeScript client's tests"
    return found


@dataclass(frozen=True)
class Service:
    base: str
    key: str
    admin_key: str

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(Path.home()),
            "BILLING_URL": self.base,
            "BILLING_KEY": self.key,
            "BILLING_ADMIN_KEY": self.admin_key,
            **extra,
        }


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, new_database: Callable[[], str]
) -> Iterator[Service]:
    env = service_env(
        new_database(),
        ALLOW_PRIVATE_WEBHOOK_URLS="true",
        JOBS_POLL_SECONDS="1",
        DB_POOL_SIZE="3",
    )
    key, admin = create_key(env, "write"), create_key(env, "admin")
    logs = tmp_path_factory.mktemp("typescript")
    with running_service(env, logs / "service.log") as base:
        yield Service(base, key, admin)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=NODE_SECONDS, check=False
    )
    print(done.stdout[-4000:], done.stderr[-4000:])
    return done


@pytest.mark.slow
def test_the_typescript_clients_own_tests_pass_against_the_service(service: Service) -> None:
    done = run([node(), "--test", "test/"], PACKAGE, service.env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout
    assert "# pass 12" in done.stdout


@pytest.mark.slow
def test_the_packed_package_alone_checks_charges_402s_and_holds(
    service: Service, tmp_path: Path
) -> None:
    npm = shutil.which("npm")
    assert npm is not None
    env = service.env(npm_config_cache=str(tmp_path / "npm-cache"))
    packed = run([npm, "pack", "--json", "--pack-destination", str(tmp_path)], PACKAGE, env)
    assert packed.returncode == 0, packed.stderr
    tarball = tmp_path / json.loads(packed.stdout)[0]["filename"]
    files = {f["path"] for f in json.loads(packed.stdout)[0]["files"]}
    assert {"src/index.js", "src/index.d.ts", "package.json"} <= files
    assert not any(f.startswith("test/") for f in files)

    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "app", "private": true, "type": "module"}')
    # A local tarball with no dependencies: npm asks no registry (--offline proves it).
    installed = run(
        [npm, "install", "--offline", "--no-audit", "--no-fund", str(tarball)], app, env
    )
    assert installed.returncode == 0, installed.stderr
    lock = json.loads((app / "package-lock.json").read_text())
    assert set(lock["packages"]) == {"", "node_modules/@ciris/billing"}

    shutil.copy(Path(__file__).with_name("packed_smoke.mjs"), app / "smoke.mjs")
    done = run([node(), "smoke.mjs"], app, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "check": [True, 3],
        "charges": [2, 1, 0],
        "402": [402, 20, True],
        "hold": [2, 1, 1],
    }


@pytest.mark.slow
def test_the_example_agent_answers_checks_charges_and_402s(service: Service) -> None:
    """examples/agent.mjs: a Node HTTP handler that checks, calls a model stub, charges, and
    answers 402 with the checkout link when the user has no use left."""
    env = service.env(PORT="0")
    process = subprocess.Popen(
        [node(), str(EXAMPLE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # "listening on http://127.0.0.1:PORT"
        assert "listening on" in line, line + (process.stderr.read() if process.stderr else "")
        agent = line.split("listening on ", 1)[1].strip()
        user = f"example-{os.getpid()}-{id(process)}@example.com"
        with httpx.Client(base_url=agent, timeout=30) as http:
            for left in (2, 1, 0):
                answer = http.post("/chat", json={"user": user, "message": "hello"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["reply"] == "You said: hello"
                assert answer.json()["free_uses_remaining"] == left
            refused = http.post("/chat", json={"user": user, "message": "hello"})
        assert refused.status_code == 402, refused.text
        assert refused.json()["checkout_url"].startswith(service.base + "/v1/billing/")
        assert refused.json()["uses"] == 20
        transactions = httpx.get(
            f"{service.base}/v1/billing/transactions",
            params={"oauth_provider": "oauth:google", "external_id": user},
            headers={"X-API-Key": service.key},
        ).json()
        charges = [t for t in transactions["transactions"] if t["type"] == "charge"]
        assert len(charges) == 3
    finally:
        process.terminate()
        process.wait(timeout=10)


GENERATED = Path(__file__).with_name("generated_ts")
GENERATOR_OPTIONS = ["-o", "schema.d.ts", "--default-non-nullable", "false"]


@pytest.mark.slow
def test_a_client_generated_by_openapi_typescript_checks_and_charges(
    service: Service, tmp_path: Path
) -> None:
    """openapi-typescript turns /openapi.json into types (operations by their operationIds,
    the error shapes), openapi-fetch sends the requests, tsc type-checks the calls against the
    generated types; then a check, three charges, a typed 402 and a 422 with its errors[].
    npm ci from the committed lockfile (versions and integrity hashes, no download addresses)."""
    npm = shutil.which("npm")
    assert npm is not None
    work = tmp_path / "generated"
    work.mkdir()
    for name in ("package.json", "package-lock.json", ".npmrc", "tsconfig.json", "use.ts"):
        shutil.copy(GENERATED / name, work / name)
    (work / "openapi.json").write_text(httpx.get(f"{service.base}/openapi.json").text)
    env = service.env()
    installed = run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], work, env)
    assert installed.returncode == 0, installed.stderr
    bin_dir = work / "node_modules" / ".bin"
    generated = run(
        # A field with a default is optional in a request (the generator's default, true, makes
        # it required everywhere).
        [str(bin_dir / "openapi-typescript"), "openapi.json", *GENERATOR_OPTIONS],
        work,
        env,
    )
    assert generated.returncode == 0, generated.stderr
    compiled = run([str(bin_dir / "tsc"), "-p", "tsconfig.json"], work, env)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    done = run([node(), "dist/use.js"], work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "check": [True, 3],
        "charges": [2, 1, 0],
        "refused": [402, 20, True],
        "invalid": [422, ["uses"]],
    }
