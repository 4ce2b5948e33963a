"""The guide's local stack, checked without Docker (it cannot run here).

docker-compose.local.yml, deploy/ (Prometheus, Grafana) and the Dockerfile are parsed and their
wiring asserted; every Grafana PromQL expression is checked against the metrics a real app exposes;
the Dockerfile's health check and the guide's `alembic upgrade head` run for real; and
scripts/test-local (the guide's `make test-local`) is run in dry-run mode on every path it can take
without Docker.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ciris_billing.config import Settings
from tests.support.api import Api, identity
from tests.support.postgres import pg_admin
from tests.support.servers import free_port, running_service, service_env

# PyYAML ships no type hints (its stubs are a separate package): use it as an untyped module.
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.local.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
SCRIPT = ROOT / "scripts" / "test-local"
VENV = Path(sys.executable).parent.parent  # the venv running the tests: .venv under make

# The guide's section 3 ("Configure Environment Variables") names these.
GUIDE_SECTION_3 = (
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PUBLISHABLE_KEY",
    "FREE_USES_PER_ACCOUNT",
    "PAID_USES_PER_PURCHASE",
    "PRICE_PER_PURCHASE_MINOR",
)
# The rest of the README's configuration table.
README_VARIABLES = (
    "DATABASE_URL",
    "CURRENCY",
    "PAYMENT_PROVIDER",
    "STRIPE_API_BASE",
    "SANDBOX_WEBHOOK_SECRET",
    "LOG_LEVEL",
    "API_KEY_CACHE_SECONDS",
    "DB_POOL_SIZE",
)
SECRET_LOOKING = re.compile(r"(sk|rk|pk)_(test|live)_|whsec_|cbk_")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services[name]


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} / ${NAME-default} with nothing set: the defaults."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def published_ports(svc: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from short ("[ip:]host:container") or long syntax."""
    ports: dict[int, int] = {}
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            ports[int(entry["target"])] = int(entry["published"])
        else:
            *_ip, host, container = str(entry).split(":")
            ports[int(container.split("/")[0])] = int(host)
    return ports


def bind_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the repository) of ./ bind mounts."""
    mounts: dict[str, str] = {}
    for entry in svc.get("volumes", []):
        source, target, *_mode = str(entry).split(":")
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def healthcheck_command(test: list[str] | str) -> str:
    return " ".join(test) if isinstance(test, list) else test


# --- docker-compose.local.yml -------------------------------------------------------------


def test_compose_has_the_guide_services_and_ports() -> None:
    services = compose()["services"]
    assert {"billing-api", "postgres", "prometheus", "grafana"} <= set(services)
    assert published_ports(services["billing-api"]) == {8000: 8000}
    assert published_ports(services["prometheus"]) == {9090: 9090}
    assert published_ports(services["grafana"]) == {3000: 3000}
    assert published_ports(services["postgres"]) == {}, "no clash with a local PostgreSQL"


def test_compose_billing_api_builds_here_and_waits_for_a_healthy_postgres() -> None:
    api = service("billing-api")
    build = api["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE

    env_files = api["env_file"]
    assert {"path": ".env", "required": False} in env_files, ".env is optional"

    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    check = healthcheck_command(api["healthcheck"]["test"])
    assert "/health" in check
    assert ":8000/" in check


def test_compose_database_url_points_at_the_postgres_service() -> None:
    postgres = service("postgres")
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].startswith("15")
    assert "pg_isready" in healthcheck_command(postgres["healthcheck"]["test"])
    data_volume = next(v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data"))
    assert data_volume.split(":")[0] in compose()["volumes"], "a named volume keeps the data"

    pg_env = environment(postgres)
    url = environment(service("billing-api"))["DATABASE_URL"]
    parts = urlsplit(url)
    assert parts.scheme == "postgresql"
    assert (parts.hostname, parts.port) == ("postgres", 5432)
    assert parts.username == pg_env["POSTGRES_USER"]
    assert parts.password == pg_env["POSTGRES_PASSWORD"]
    assert parts.path.lstrip("/") == pg_env["POSTGRES_DB"]
    settings = Settings(_env_file=None, database_url=url)
    assert settings.async_database_url.startswith("postgresql+asyncpg://")


def test_compose_bind_mounts_exist_and_match_their_configs() -> None:
    for name, svc in compose()["services"].items():
        for source in bind_mounts(svc).values():
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"

    prometheus = service("prometheus")
    config_flag = next(c for c in prometheus["command"] if c.startswith("--config.file="))
    assert bind_mounts(prometheus)[config_flag.split("=", 1)[1]] == "./deploy/prometheus.yml"

    grafana = service("grafana")
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "ciris-billing.yml")
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == "./deploy/grafana/dashboards"
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path + "/")
    assert (GRAFANA / "dashboards" / home.rsplit("/", 1)[1]).is_file()


def test_compose_holds_no_stripe_secret() -> None:
    assert not SECRET_LOOKING.search(COMPOSE_FILE.read_text())


def test_prometheus_scrapes_billing_api_metrics() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = [
        job
        for job in config["scrape_configs"]
        if any("billing-api:8000" in sc["targets"] for sc in job["static_configs"])
    ]
    assert len(jobs) == 1
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert jobs[0].get("scheme", "http") == "http"
    # /metrics is not public (issue 21 finding 12): the scrape sends billing-api's token.
    authorization = jobs[0]["authorization"]
    assert authorization["type"] == "Bearer"
    assert authorization["credentials"] == service("billing-api")["environment"]["METRICS_TOKEN"]
    assert published_ports(service("billing-api")).get(8000), "billing-api listens on 8000"


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus"
    assert url.port in published_ports(service("prometheus"))


# --- The Grafana dashboard against the metrics the app really exposes ------------------------


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)


@dataclass
class Query:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)


PROMQL_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*")
      | (?P<braces>\{[^}]*\})
      | (?P<range>\[[^\]]*\])
      | (?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
      | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<space>\s+)
      | (?P<other>.)""",
    re.VERBOSE,
)
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
GROUPING_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "topk"}  # `sum by (x) (...)` too
FUNCTIONS = AGGREGATIONS | {
    "rate",
    "irate",
    "increase",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
}


def parse_promql(expr: str) -> Query:
    """Enough of PromQL to find metric names, label matchers and grouping labels."""
    tokens = [
        (m.lastgroup or "", m.group())
        for m in PROMQL_TOKEN.finditer(expr)
        if m.lastgroup != "space"
    ]
    assert [t for _k, t in tokens].count("(") == [t for _k, t in tokens].count(")"), expr
    query = Query()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "braces":
            raise AssertionError(f"selector without a metric name in {expr!r}")
        if kind == "ident" and text in GROUPING_KEYWORDS and following == "(":
            i += 2
            while tokens[i][1] != ")":
                if tokens[i][0] == "ident":
                    query.grouping.add(tokens[i][1])
                i += 1
        elif kind == "ident" and text in OPERATOR_KEYWORDS:
            pass
        elif kind == "ident" and (following == "(" or text in AGGREGATIONS):
            assert text in FUNCTIONS, f"unknown PromQL function {text!r} in {expr!r}"
            query.functions.add(text)
        elif kind == "ident":
            matchers: list[tuple[str, str, str]] = []
            if i + 1 < len(tokens) and tokens[i + 1][0] == "braces":
                body = tokens[i + 1][1][1:-1]
                found = MATCHER.findall(body)
                assert "".join(m.group() for m in MATCHER.finditer(body)) == body, expr
                matchers = [(label, op, value) for label, op, value in found]
                i += 1
            query.selectors.append(Selector(text, matchers))
        i += 1
    return query


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads((GRAFANA / "dashboards" / "ciris-billing.json").read_text())

    def walk(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for panel in panels:
            found.extend(walk(panel.get("panels", [])) if panel["type"] == "row" else [panel])
        return found

    return walk(dashboard["panels"])


@dataclass
class Exposed:
    labels: dict[str, set[str]]  # sample name -> label names
    values: dict[tuple[str, str], set[str]]  # (sample name, label) -> values seen


def exposed_metrics(text: str) -> Exposed:
    exposed = Exposed(defaultdict(set), defaultdict(set))
    for family in text_string_to_metric_families(text):
        if not family.samples:
            exposed.labels.setdefault(family.name, set())
        for sample in family.samples:
            exposed.labels[sample.name] |= set(sample.labels)
            for label, value in sample.labels.items():
                exposed.values[(sample.name, label)].add(value)
    return exposed


# Series Prometheus makes itself for every target (not the app's).
SYNTHETIC = {"up": {"job", "instance", "service"}}
# Label values the code emits that the scenario below cannot produce (a failed webhook
# handling attempt: see ciris_billing.webhooks.inbox).
UNOBSERVED_VALUES = {("billing_webhook_events_total", "outcome", "retry")}


async def drive_every_metric(api: Api) -> None:
    """A check, charges until refused, a paid and a declined purchase (sandbox webhooks)."""
    user = identity("dashboard@example.com")
    assert (await api.post("/v1/billing/credits/check", user)).status_code == 200
    for _ in range(api.settings.free_uses_per_account):
        assert (await api.post("/v1/billing/charges", user)).status_code == 201
    assert (await api.post("/v1/billing/charges", user)).status_code == 402
    assert (await api.post("/v1/billing/credits/check", user)).json()["purchase_required"]
    for card, expected in (("4242 4242 4242 4242", 200), ("4000 0000 0000 9995", 402)):
        created = await api.post(
            "/v1/billing/purchases", {**user, "customer_email": user["external_id"]}
        )
        assert created.status_code == 201, created.text
        bought = created.json()
        paid = await api.http.post(
            f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
            json={"client_secret": bought["client_secret"], "card_number": card},
        )
        assert paid.status_code in (expected, 200), paid.text


async def test_dashboard_queries_use_metrics_the_app_exposes(api: Api) -> None:
    await drive_every_metric(api)
    response = await api.get("/metrics")
    assert response.status_code == 200
    exposed = exposed_metrics(response.text)
    job_names = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    datasource_uid = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")[
        "datasources"
    ][0]["uid"]

    panels = dashboard_panels()
    used: set[str] = set()
    quantiles: set[str] = set()
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == datasource_uid, title
            expr = target["expr"]
            query = parse_promql(expr)
            assert query.selectors, f"{title}: no metric in {expr!r}"
            labels_in_query: set[str] = set()
            for selector in query.selectors:
                name = selector.metric
                used.add(name)
                if name in SYNTHETIC:
                    known = SYNTHETIC[name]
                    for label, _op, value in selector.matchers:
                        assert label in known, f"{title}: {name} has no label {label}"
                        if label == "job":
                            assert value in job_names, f"{title}: no scrape job {value!r}"
                else:
                    assert name in exposed.labels, f"{title}: the app exposes no {name!r}"
                    known = exposed.labels[name]
                    for label, op, value in selector.matchers:
                        assert label in known, f"{title}: {name} has no label {label!r}"
                        if op == "=" and (name, label, value) not in UNOBSERVED_VALUES:
                            seen = exposed.values[(name, label)]
                            assert value in seen, f"{title}: {name}{{{label}}} is one of {seen}"
                labels_in_query |= known
            assert query.grouping <= labels_in_query, f"{title}: grouping by unknown labels"
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            assert legend_labels <= (query.grouping or labels_in_query), f"{title}: legend"
            for quantile in re.findall(r"histogram_quantile\(\s*([0-9.]+)", expr):
                assert {"le", "route"} <= query.grouping, f"{title}: quantile by route"
                quantiles.add(quantile)

    # What the dashboard must show: checks, charges, purchases, webhooks, latency p50/p99.
    assert {
        "billing_credit_checks_total",
        "billing_charges_total",
        "billing_purchases_total",
        "billing_webhook_events_total",
        "billing_http_request_duration_seconds_bucket",
    } <= used
    assert {"0.5", "0.99"} <= quantiles


def test_promql_parser_catches_mistakes() -> None:
    query = parse_promql(
        'histogram_quantile(0.99, sum by (le, route) (rate(x_bucket{route!="/m"}[5m])))'
    )
    assert [s.metric for s in query.selectors] == ["x_bucket"]
    assert query.selectors[0].matchers == [("route", "!=", "/m")]
    assert query.grouping == {"le", "route"}
    query = parse_promql('sum by (status) (increase(y_total{status="ok"}[$__range])) / 2')
    assert [(s.metric, s.matchers) for s in query.selectors] == [
        ("y_total", [("status", "=", "ok")])
    ]
    assert (query.grouping, query.functions) == ({"status"}, {"sum", "increase"})
    with pytest.raises(AssertionError):
        parse_promql("sum(rate(x[5m])")
    with pytest.raises(AssertionError):
        parse_promql("summ(rate(x[5m]))")


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            result.append([])
        assert result, "instructions before the first FROM"
        result[-1].append((keyword, arguments))
    return result


def exec_form(arguments: str) -> list[str]:
    parsed = json.loads(arguments)
    assert isinstance(parsed, list)
    return [str(item) for item in parsed]


def test_dockerfile_is_multi_stage_with_a_slim_runtime_copying_the_venv() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    builder, runtime = all_stages[0], all_stages[-1]
    assert builder[0][1].split()[-2:] == ["AS", "builder"]
    assert runtime[0][1].split()[0] == "python:3.11-slim"
    assert any(k == "RUN" and "pip install" in a and " ." in a for k, a in builder)
    assert any(k == "COPY" and "pyproject.toml" in a for k, a in builder)
    assert any(k == "COPY" and a.startswith("--from=builder /opt/venv") for k, a in runtime)
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime), "nothing built there"


def test_dockerfile_runs_as_non_root_and_serves_8000_with_a_health_check() -> None:
    runtime = stages()[-1]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    assert ("EXPOSE", "8000") in runtime

    (health,) = [a for k, a in runtime if k == "HEALTHCHECK"]
    command = exec_form(health.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"], "no curl in a slim image"
    assert "http://127.0.0.1:8000/health" in command[2]

    (cmd,) = [a for k, a in runtime if k == "CMD"]
    # Inside a container the service must listen on every interface to be reachable.
    everywhere = "0.0.0.0"  # noqa: S104
    assert exec_form(cmd) == ["ciris-billing", "serve", "--host", everywhere, "--port", "8000"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "ciris-billing" in scripts
    # The guide's `docker-compose ... exec billing-api alembic upgrade head` needs alembic.ini in
    # the working directory.
    assert ("WORKDIR", "/app") in runtime
    assert any(k == "COPY" and a.split()[0] == "alembic.ini" for k, a in runtime)


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")
        for pattern in patterns
    )


def test_dockerfile_holds_no_secret_and_copies_only_what_the_context_keeps() -> None:
    text = DOCKERFILE.read_text()
    assert not SECRET_LOOKING.search(text)
    patterns = dockerignore_patterns()
    for keyword, arguments in dockerfile_instructions():
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arguments) or [arguments.split()[0]]
            for name in names:
                assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", name, re.I), name
        if keyword in ("COPY", "ADD") and "--from=" not in arguments:
            assert keyword == "COPY", "ADD can fetch URLs; COPY only"
            *sources, _destination = [a for a in arguments.split() if not a.startswith("--")]
            for source in sources:
                assert source not in (".", "./"), "copy named files, not the whole context"
                assert ".env" not in source
                assert (ROOT / source).exists(), source
                assert not ignored(source, patterns), f"{source} is in .dockerignore"
    for needed in (".venv", ".git", ".data/", ".env", ".pytest_cache", ".mypy_cache"):
        assert needed in patterns, f".dockerignore lacks {needed}"


def builder_completeness_check() -> str:
    """The Python code the builder stage runs after `pip install .`."""
    (install,) = [a for k, a in stages()[0] if k == "RUN" and "pip install" in a]
    match = re.search(r'python -c "(.*)"$', install)
    assert match, install
    return match[1]


@pytest.mark.slow
def test_the_builder_refuses_an_install_that_lacks_package_files(tmp_path: Path) -> None:
    code = builder_completeness_check()
    # Here the package is installed editable (from src/): nothing can be missing.
    ok = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    # A source tree holding a file the install lacks: the build fails and names it.
    fake = tmp_path / "src" / "ciris_billing" / "checkout"
    fake.mkdir(parents=True)
    (fake / "forgotten.html").write_text("<p>")
    bad = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0
    assert "checkout/forgotten.html" in bad.stderr


def package_data_patterns() -> list[str]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns: list[str] = []
    for package, globs in setuptools.get("package-data", {}).items():
        prefix = "" if package in ("*", "ciris_billing") else package.split(".", 1)[1] + "/"
        patterns.extend(prefix.replace(".", "/") + glob for glob in globs)
    return patterns


def test_package_data_ships_every_non_python_file_to_the_image() -> None:
    """`pip install .` (the image) gets non-Python files only through package-data."""
    package = ROOT / "src" / "ciris_billing"
    patterns = package_data_patterns()
    missing = [
        relative
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".py", ".pyc")
        for relative in [path.relative_to(package).as_posix()]
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)
    ]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def run_healthcheck(command: list[str], port: int) -> int:
    code = command[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


@pytest.mark.slow
def test_the_health_checks_pass_on_a_serving_app_and_fail_without_one(
    fresh_database: str, tmp_path: Path
) -> None:
    (health,) = [a for k, a in stages()[-1] if k == "HEALTHCHECK"]
    command = exec_form(health.split("CMD", 1)[1])
    compose_test = service("billing-api")["healthcheck"]["test"]
    assert compose_test == ["CMD", *command], "compose and the image check the same way"

    port = free_port()
    env = service_env(fresh_database)
    with running_service(env, tmp_path / "serve.log", port=port):
        assert run_healthcheck(command, port) == 0
    assert run_healthcheck(command, port) != 0


@pytest.mark.slow
def test_alembic_upgrade_head_works_from_the_image_workdir(
    empty_database: str, tmp_path: Path
) -> None:
    """The guide's `exec billing-api alembic upgrade head`: alembic.ini alone in the workdir."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    shutil.copy(ROOT / "alembic.ini", workdir)
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=workdir,
        env=service_env(empty_database),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tables = asyncio.run(_pg_tables(empty_database))
    assert {"alembic_version", "charges", "credits", "accounts"} <= tables


# --- .env.example -------------------------------------------------------------------------


def env_example_assignments() -> dict[str, tuple[str, bool]]:
    """NAME -> (value, active); commented-out assignments count, as inactive."""
    found: dict[str, tuple[str, bool]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match[2]] = (match[3], match[1] is None)
    return found


def test_env_example_names_every_guide_and_readme_variable() -> None:
    names = env_example_assignments()
    missing = [name for name in (*GUIDE_SECTION_3, *README_VARIABLES) if name not in names]
    assert not missing
    assert names["STRIPE_API_KEY"][0] == "sk_test_your_secret_key_here"
    assert names["STRIPE_WEBHOOK_SECRET"][0] == "whsec_your_webhook_secret_here"
    assert names["STRIPE_PUBLISHABLE_KEY"][0] == "pk_test_your_publishable_key_here"
    for name in ("FREE_USES_PER_ACCOUNT", "PAID_USES_PER_PURCHASE", "PRICE_PER_PURCHASE_MINOR"):
        assert names[name][1], f"{name} is set (the guide's defaults)"


def test_env_example_holds_placeholders_only() -> None:
    for name, (value, _active) in env_example_assignments().items():
        if re.search(r"(KEY|SECRET|PASSWORD|TOKEN)$", name):
            assert "your_" in value or "change_me" in value, f"{name} is not a placeholder"
        assert not re.search(r"[A-Za-z0-9]{24,}", value), f"{name} looks like a real value"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def settings_from(path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return Settings(_env_file=path)


def test_env_example_copied_as_is_starts_in_sandbox_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(ENV_EXAMPLE, monkeypatch)
    assert settings.active_payment_provider == "sandbox"
    assert settings.payment_problems() == []
    assert (settings.free_uses_per_account, settings.paid_uses_per_purchase) == (3, 20)
    assert settings.price_per_purchase_minor == 500


def test_env_example_with_the_stripe_lines_uncommented_is_a_valid_stripe_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stripe_line = r"(?m)^#\s*(STRIPE_(API_KEY|WEBHOOK_SECRET|PUBLISHABLE_KEY)=)"
    text = re.sub(stripe_line, r"\1", ENV_EXAMPLE.read_text())
    edited = tmp_path / ".env"
    edited.write_text(text)
    settings = settings_from(edited, monkeypatch)
    assert settings.active_payment_provider == "stripe"
    assert settings.payment_problems() == []


# --- scripts/test-local (the guide's `make test-local`) ------------------------------------


def script_env(tmp_path: Path, fake_docker: str | None, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DATABASE_URL" and not key.startswith("TEST_LOCAL_")
    }
    env["VENV"] = str(VENV)
    if fake_docker is not None:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        docker = bin_dir / "docker"
        docker.write_text("#!/usr/bin/env bash\n" + fake_docker + "\n")
        docker.chmod(docker.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run_script(
    env: dict[str, str], *args: str, script: Path = SCRIPT
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return result, time.monotonic() - started


def is_migrated(url: str) -> bool:
    return {"alembic_version", "charges", "credits"} <= asyncio.run(_pg_tables(url))


@pytest.fixture
def empty_database(postgres_admin_url: str) -> Iterator[str]:
    """A database with no tables yet (the script migrates it), dropped afterwards."""
    name = f"ciris_billing_local_test_{uuid.uuid4().hex[:8]}"
    asyncio.run(pg_admin(postgres_admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield f"{postgres_admin_url.rpartition('/')[0]}/{name}"
    finally:
        sql = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        asyncio.run(pg_admin(postgres_admin_url, sql))


def isolated_root(tmp_path: Path) -> Path:
    """A copy of the script in an empty tree: no .env; the embedded server's data lands here."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPT, root / "scripts" / "test-local")
    return root


ENGINE_DOWN = (
    'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2\nexit 1'
)


def test_script_is_executable_bash_with_strict_mode() -> None:
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


@pytest.mark.slow
@pytest.mark.parametrize("dry_run", ["--check", "TEST_LOCAL_DRY_RUN=1"])
def test_check_mode_falls_back_to_local_processes_and_migrates(
    empty_database: str, tmp_path: Path, dry_run: str
) -> None:
    database = empty_database
    env = script_env(tmp_path, ENGINE_DOWN, DATABASE_URL=database)
    args: list[str] = []
    if dry_run == "--check":
        args.append("--check")
    else:
        env["TEST_LOCAL_DRY_RUN"] = "1"
    result, elapsed = run_script(env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "test-local: path: local processes, because the Docker engine is not reachable" in out
    assert "DATABASE_URL from the environment" in out
    assert "Database is at the latest migration." in out
    assert "not serving (--check)" in out
    assert "Serving CIRIS Billing" not in out
    assert is_migrated(database)
    assert elapsed < 30


@pytest.mark.slow
def test_check_mode_on_this_machine_as_it_is(empty_database: str, tmp_path: Path) -> None:
    """No fake docker: whatever this machine has, the script picks a path quickly and says so."""
    database = empty_database
    env = script_env(tmp_path, None, DATABASE_URL=database)
    result, elapsed = run_script(env, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test-local: path: " in result.stdout
    if "path: local processes" in result.stdout:
        assert is_migrated(database)
    assert elapsed < 30


@pytest.mark.slow
def test_a_hanging_docker_client_is_given_up_on_quickly(
    empty_database: str, tmp_path: Path
) -> None:
    database = empty_database
    env = script_env(
        tmp_path,
        "exec sleep 60",
        DATABASE_URL=database,
        TEST_LOCAL_DOCKER_TIMEOUT="1",
    )
    result, elapsed = run_script(env, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over 1s" in result.stdout
    assert is_migrated(database)
    assert elapsed < 20


def test_a_working_docker_takes_the_compose_path(tmp_path: Path) -> None:
    """With an engine, --check validates the compose file and starts nothing."""
    calls = tmp_path / "docker-calls"
    env = script_env(tmp_path, f'echo "$*" >> {calls}\nexit 0')
    result, _elapsed = run_script(env, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test-local: path: Docker (docker compose -f docker-compose.local.yml)" in result.stdout
    recorded = calls.read_text().splitlines()
    assert recorded[:2] == ["info", "compose version"]
    assert "compose -f docker-compose.local.yml config --quiet" in recorded
    assert not any(" up " in f" {call} " for call in recorded)


def test_forcing_docker_without_an_engine_fails_clearly(tmp_path: Path) -> None:
    env = script_env(tmp_path, ENGINE_DOWN)
    result, _elapsed = run_script(env, "--check", "--docker")
    assert result.returncode == 1
    assert "--docker: the Docker engine is not reachable" in result.stderr


@pytest.mark.slow
def test_dotenv_database_url_is_used(empty_database: str, tmp_path: Path) -> None:
    root = isolated_root(tmp_path)
    database = empty_database
    (root / ".env").write_text(f"DATABASE_URL={database}\n")
    env = script_env(tmp_path, ENGINE_DOWN)
    result, _elapsed = run_script(env, "--check", script=root / "scripts" / "test-local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DATABASE_URL from .env" in result.stdout
    assert is_migrated(database)


@pytest.mark.slow
def test_embedded_postgres_when_no_url_and_no_local_postgres(tmp_path: Path) -> None:
    root = isolated_root(tmp_path)
    env = script_env(
        tmp_path,
        ENGINE_DOWN,
        TEST_LOCAL_POSTGRES_URL="postgresql://postgres@127.0.0.1:1/ciris_billing_local",
    )
    result, _elapsed = run_script(env, "--check", script=root / "scripts" / "test-local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "database: embedded PostgreSQL in ./.data/postgres" in result.stdout
    assert "unreachable" in result.stdout
    assert "Embedded PostgreSQL (started): data in" in result.stdout + result.stderr
    assert "Database is at the latest migration." in result.stdout
    data_dir = root / ".data" / "postgres"
    assert (data_dir / "PG_VERSION").exists(), "the data stays in the project"
    assert not (data_dir / "postmaster.pid").exists(), "stopped when the command ended"


async def _pg_tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


@pytest.mark.slow
def test_local_postgres_database_is_created_when_missing(
    postgres_admin_url: str, tmp_path: Path
) -> None:
    name = f"ciris_billing_local_test_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_admin_url.rpartition('/')[0]}/{name}"
    root = isolated_root(tmp_path)
    env = script_env(tmp_path, ENGINE_DOWN, TEST_LOCAL_POSTGRES_URL=url)
    try:
        result, _elapsed = run_script(env, "--check", script=root / "scripts" / "test-local")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "database: local PostgreSQL" in result.stdout
        assert f"created database {name}" in result.stdout
        assert {"alembic_version", "charges", "credits"} <= asyncio.run(_pg_tables(url))
        again, _elapsed = run_script(env, "--check", script=root / "scripts" / "test-local")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"database {name} exists" in again.stdout
        assert not (root / ".data").exists(), "no embedded server when the local one answers"
    finally:
        sql = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        asyncio.run(pg_admin(postgres_admin_url, sql))
