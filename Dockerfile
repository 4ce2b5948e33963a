# CIRIS Billing API image (used by docker-compose.local.yml; fine for production too).
#   docker build -t ciris-billing .
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql://user:pass@db/billing ciris-billing
# The container migrates on start (`ciris-billing serve` runs `alembic upgrade head` first), and
# `alembic upgrade head` also works inside it (alembic.ini is in the working directory).
# No secret is baked in: Stripe keys and DATABASE_URL come from the environment at run time.

# ---- builder: install the package and its pinned dependencies into a virtualenv ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /build
# pyproject.toml is the lock (exact pins); every dependency ships wheels, no compiler needed.
COPY pyproject.toml ./
COPY src ./src
# The agent client is its own distribution (clients/python); the server depends on it.
COPY clients/python ./clients/python
# Then refuse to build an image whose install lacks a file of the package (an HTML page, a
# migration...): each non-Python file needs [tool.setuptools.package-data] in pyproject.toml.
RUN pip install --no-cache-dir ./clients/python . \
    && python -c "import pathlib, ciris_billing.cli as cli; \
src = pathlib.Path('src/ciris_billing'); dst = pathlib.Path(cli.__file__).parent; \
missing = sorted(str(f.relative_to(src)) for f in src.rglob('*') if f.is_file() \
    and '__pycache__' not in f.parts and not (dst / f.relative_to(src)).is_file()); \
assert not missing, 'not installed; add to package-data in pyproject.toml: ' + ', '.join(missing)"

# ---- runtime: the venv on a clean slim image, as an unprivileged user ----
FROM python:3.11-slim AS runtime

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 billing \
    && useradd --system --uid 10001 --gid billing --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin billing

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY alembic.ini ./
# Writable for the embedded PostgreSQL's data (.data/postgres, DATABASE_URL unset); compose sets
# its own PostgreSQL.
RUN chown billing:billing /app

USER 10001:10001

EXPOSE 8000

# No curl in the image: the standard library asks /health (200 only when the database answers).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3).status == 200 else 1)"]

# serve: migrate (alembic upgrade head), create the first admin key if none (printed once in
# the logs), then serve. In sandbox mode (no Stripe keys) 0.0.0.0 is refused unless
# SANDBOX_ALLOW_PUBLIC=true (anyone reaching it with a checkout link could pay with a test card). Add `--workers N` to scale (Prometheus multiprocess mode is automatic).
CMD ["ciris-billing", "serve", "--host", "0.0.0.0", "--port", "8000"]
