"""docker-compose.yml, the Dockerfile and the configs they mount, checked by parsing them.

No Docker engine is needed: the compose file is parsed and checked against the parts of the
Compose Specification it uses; the mounted dispatcher config goes through `load_config`; the
Prometheus config must target the dispatcher's [http].listen port.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dispatcher.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

# The Compose Specification's keys (top level, service, healthcheck, depends_on conditions).
TOP_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "stop_grace_period",
    "stop_signal",
    "hostname",
    "networks",
    "labels",
    "user",
    "working_dir",
    "deploy",
    "logging",
    "init",
    "expose",
    "profiles",
    "secrets",
    "configs",
    "ulimits",
    "tmpfs",
    "read_only",
    "cap_drop",
    "security_opt",
    "container_name",
    "extra_hosts",
    "pull_policy",
    "scale",
}
HEALTHCHECK_KEYS = {
    "test",
    "interval",
    "timeout",
    "retries",
    "start_period",
    "start_interval",
    "disable",
}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION = re.compile(r"^(\d+(us|ms|s|m|h))+$")
RESTART = {"no", "always", "on-failure", "unless-stopped"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} interpolation, with an empty environment by default."""
    env = env or {}
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_file_is_valid_compose(compose: dict[str, Any]) -> None:
    assert set(compose) <= TOP_KEYS, set(compose) - TOP_KEYS
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name)
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        assert "image" in svc or "build" in svc, name
        if "restart" in svc:
            assert svc["restart"] in RESTART
        for port in svc.get("ports", []):
            assert re.fullmatch(r"(\d+:)?\d+(/(tcp|udp))?", str(port)), (name, port)
        for volume in svc.get("volumes", []):
            source, target, *mode = str(volume).split(":")
            assert target.startswith("/") and mode in ([], ["ro"], ["rw"]), volume
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            assert spec["condition"] in CONDITIONS
        check = svc["healthcheck"]  # every service has one
        assert set(check) <= HEALTHCHECK_KEYS
        assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL")
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert DURATION.match(str(check[key])), (name, key, check[key])
        if "stop_grace_period" in svc:
            assert DURATION.match(svc["stop_grace_period"])
        for key, value in (svc.get("environment") or {}).items():
            assert isinstance(key, str) and isinstance(value, str | int | float | bool)
    for volume in declared_volumes:
        assert compose["volumes"][volume] is None or isinstance(compose["volumes"][volume], dict)


def test_services_and_their_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "dispatcher", "receiver", "prometheus"}

    rabbit = services["rabbitmq"]
    assert rabbit["image"].startswith("rabbitmq:") and rabbit["image"].endswith("-management")
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert "15672:15672" in rabbit["ports"]

    disp = services["dispatcher"]
    assert disp["build"]["context"] == "."
    assert (ROOT / disp["build"]["dockerfile"]).is_file()
    assert disp["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert any("/readyz" in part or "/healthz" in part for part in disp["healthcheck"]["test"])
    assert int(disp["stop_grace_period"].rstrip("s")) > 30  # longer than drain_timeout

    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    assert any(v.startswith("./deploy/prometheus.yml:") for v in prom["volumes"])

    receiver = services["receiver"]
    assert receiver["entrypoint"] == ["python", "-m", "example_receiver"]


def _mounted_config(compose: dict[str, Any]) -> tuple[Path, str]:
    disp = compose["services"]["dispatcher"]
    target = disp["environment"]["DISPATCHER_CONFIG"]
    for volume in disp["volumes"]:
        source, mount, *_ = volume.split(":")
        if mount == target:
            return ROOT / source, mount
    raise AssertionError(f"nothing is mounted at DISPATCHER_CONFIG={target}")


def test_the_mounted_config_loads_and_matches_the_receiver(compose: dict[str, Any]) -> None:
    path, _ = _mounted_config(compose)
    assert path.parent == ROOT / "config"
    disp = compose["services"]["dispatcher"]
    env = {k: interpolate(str(v)) for k, v in disp["environment"].items()}
    cfg = load_config(path, env=env)  # raises on anything invalid
    assert urlsplit(cfg.broker.url).hostname == "rabbitmq"
    assert urlsplit(cfg.broker.url).username == "dispatcher"
    assert cfg.http.host == "0.0.0.0"
    assert f"{cfg.http.port}:{cfg.http.port}" in disp["ports"]
    assert f":{cfg.http.port}/" in " ".join(disp["healthcheck"]["test"])
    assert Path(cfg.signing.keys_dir).is_absolute()
    assert any(v.endswith(":" + cfg.signing.keys_dir) for v in disp["volumes"])
    assert cfg.allow_private_networks  # compose's network is private; documented in the file

    # The receiver verifies exactly what the dispatcher sends it.
    args = compose["services"]["receiver"]["command"]
    opts = dict(zip(args[::2], args[1::2], strict=True))
    [sub] = cfg.subscribers
    assert sub.url == opts["--audience"] == "http://receiver:9000/webhooks/email"
    assert opts["--issuer"] == cfg.signing.issuer
    assert opts["--jwks-url"] == f"http://dispatcher:{cfg.http.port}/.well-known/jwks.json"
    assert opts["--listen"].endswith(":" + str(urlsplit(sub.url).port))
    assert sub.uses_jwt


def test_prometheus_scrapes_the_dispatcher(compose: dict[str, Any]) -> None:
    path, _ = _mounted_config(compose)
    cfg = load_config(path, env={"DISPATCHER_BROKER_URL": "amqp://u:p@rabbitmq:5672/"})
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    job = jobs["dispatcher"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"dispatcher:{cfg.http.port}" in targets
    assert DURATION.match(prom["global"]["scrape_interval"])


def test_dockerfile(compose: dict[str, Any]) -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [
        ln
        for ln in text.replace("\\\n", " ").splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    instructions = [ln.split(None, 1)[0].upper() for ln in lines]
    assert lines[0].split() == ["FROM", "python:3.11-slim"]
    assert "HEALTHCHECK" in instructions and "USER" in instructions
    user = next(ln for ln in lines if ln.startswith("USER")).split()[1]
    assert user not in ("root", "0")
    assert instructions.index("USER") > max(i for i, ins in enumerate(instructions) if ins == "RUN")
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK"))
    assert "/healthz" in health and "curl" not in health
    assert any(ln.startswith("VOLUME") and "keys" in ln for ln in lines)
    for ln in lines:
        if ln.startswith("COPY"):
            for source in shlex.split(ln)[1:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"COPY {source}: no such file"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for must in (".venv", "keys", "var", ".git", "*.pem"):
        assert must in ignored
    for copied in ("dispatcher", "signing", "example_receiver", "pyproject.toml"):
        assert copied not in ignored
    assert "pyproject.toml" in text and "README.md" in text  # pyproject's readme
