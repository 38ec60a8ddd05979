"""docker-compose.yml and the Dockerfile, checked without a Docker engine (there is none here):

* the compose file against the Compose Specification schema (check-jsonschema's vendored copy);
* the deployment rules: healthchecks on every service, gating `depends_on`; one worker per GPU
  pinned by device id; secrets required (`${VAR:?}`), never defaulted; CPU image for node and API,
  CUDA image for the workers, multi-stage, dependencies before source; a .dockerignore;
* every cxr-triage service's command, and its healthcheck, run through the image's entry point
  (`cxr-triage`) with the environment compose would give it, against real PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CLI = Path(sys.executable).with_name("cxr-triage")
#: What an operator puts in .env for `docker compose` (any non-default secrets).
COMPOSE_ENV = {"POSTGRES_PASSWORD": "pg-9f2c71d0", "REDIS_PASSWORD": "redis-4be81a77"}
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    pass


def interpolate(value, variables: dict[str, str]):
    """Compose's variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        present = name in variables and (variables[name] != "" or op not in (":-", ":?"))
        if present:
            return variables[name]
        if op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg or ""

    return _VARIABLE.sub(replace, value)


def compose(variables: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), COMPOSE_ENV if variables is None else variables)


def ours(services: dict) -> dict:
    return {name: s for name, s in services.items() if s.get("image", "").startswith("cxr-triage")}


def test_compose_file_is_valid_against_the_compose_specification(tmp_path):
    checker = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run([*checker, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\n$ check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml\n{result.stdout.strip()}")
    # The check can fail: a condition compose does not know is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: when_ready", 1))
    refused = subprocess.run([*checker, str(broken)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "when_ready" in refused.stdout, refused.stdout


def test_secrets_are_required_never_defaulted():
    text = COMPOSE.read_text()
    assert "POSTGRES_PASSWORD:-" not in text and "REDIS_PASSWORD:-" not in text
    for missing in ("POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        with pytest.raises(MissingVariable, match=missing):
            compose({k: v for k, v in COMPOSE_ENV.items() if k != missing})


def test_every_service_has_a_healthcheck_and_waits_on_healthy_dependencies():
    services = compose()["services"]
    for name, service in services.items():
        if name == "migrate":  # a one-shot job: its completion gates the others
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in ours(services).items():
        if name == "migrate":
            assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}
            continue
        assert service["healthcheck"]["test"][:4] == ["CMD", "cxr-triage", "health", "--service"], name
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                         "redis": {"condition": "service_healthy"},
                                         "migrate": {"condition": "service_completed_successfully"}}, name


def test_one_worker_per_gpu_on_the_cuda_image_node_and_api_on_the_cpu_image():
    services = ours(compose()["services"])
    gpu_workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert len(gpu_workers) >= 2
    device_ids = []
    for name, service in gpu_workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and len(device["device_ids"]) == 1, name
        device_ids += device["device_ids"]
        assert service["build"]["target"] == "cuda" and service["environment"]["CXR_TRIAGE_MODEL_DEVICE"] == "cuda"
    assert len(set(device_ids)) == len(device_ids)  # never two workers on one GPU
    for name in ("node", "api", "migrate", "worker-cpu"):
        assert services[name]["build"]["target"] == "cpu", name


def test_dockerfile_is_multi_stage_with_dependencies_before_source_and_a_dockerignore():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.MULTILINE)
    assert {"deps-cpu", "deps-cuda", "wheel", "cpu", "cuda"} <= set(stages)
    for stage in ("deps-cpu", "deps-cuda"):
        body = text.split(f" AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "COPY src" not in body and "requirements.txt" in body, stage
    assert text.index("AS deps-cpu") < text.index("COPY src") and text.index("AS deps-cuda") < text.index("COPY src")
    assert 'ENTRYPOINT ["cxr-triage"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*")] == "*" and "!src/" in ignored and "!.venv" not in ignored


def _service_env(service: dict, overrides: dict[str, str]) -> dict[str, str]:
    env = {k: str(v) for k, v in service.get("environment", {}).items()}
    env.update(overrides)
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}


def test_every_service_command_runs_through_the_cli_entry_point(tmp_path, postgres_url, redis_url):
    """Each cxr-triage service's `command` and `healthcheck`, with compose's environment for it.

    Only what cannot be the same here is replaced: the database and broker (this machine's, not the
    `postgres` and `redis` containers), the data directory, the ports (free ones: other test runs share
    the machine) and, for the GPU workers, the device (this machine has no GPU: the model runs on the CPU).
    """
    assert CLI.exists(), CLI
    services = ours(compose()["services"])
    here = {"CXR_TRIAGE_DATABASE_URL": postgres_url, "CXR_TRIAGE_BROKER_URL": redis_url,
            "CXR_TRIAGE_DATA_DIR": str(tmp_path / "data"), "CXR_TRIAGE_METRICS_HOST": "127.0.0.1",
            "CXR_TRIAGE_HEARTBEAT_SECONDS": "2"}
    migrate = services.pop("migrate")
    result = subprocess.run([str(CLI), *migrate["command"]], env=_service_env(migrate, here), cwd=tmp_path,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    ports = {"CXR_TRIAGE_DICOM_PORT": str(free_port()), "CXR_TRIAGE_API_PORT": str(free_port()),
             "CXR_TRIAGE_NODE_METRICS_PORT": str(free_port()), "CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
             "CXR_TRIAGE_API_HOST": "127.0.0.1"}
    running = {}
    # One GPU worker stands for all (they differ only in the device they are pinned to); the CPU worker's
    # profile is the same command.
    started = [name for name in services if name not in ("worker-gpu1", "worker-cpu")]
    assert started == ["node", "worker-gpu0", "api"]
    try:
        for name in started:
            service = services[name]
            extra = {"CXR_TRIAGE_WORKER_METRICS_PORT": str(free_port()), "CXR_TRIAGE_MODEL_THREADS": "1",
                     "CXR_TRIAGE_WORKER_CONCURRENCY": "1"}
            if service["environment"].get("CXR_TRIAGE_MODEL_DEVICE") == "cuda":
                extra |= {"CXR_TRIAGE_MODEL_DEVICE": "cpu", "CXR_TRIAGE_MODEL_RUNTIME": "torch"}
            env = _service_env(service, {**here, **ports, **extra})
            log = open(tmp_path / f"{name}.log", "wb")
            running[name] = (subprocess.Popen([str(CLI), *service["command"]], env=env, cwd=tmp_path, stdout=log,
                                              stderr=subprocess.STDOUT), env, log)
        for name in started:
            process, env, _ = running[name]
            test = services[name]["healthcheck"]["test"]
            assert test[:2] == ["CMD", "cxr-triage"]

            def healthy(process=process, env=env, test=test, name=name):
                assert process.poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
                return subprocess.run([str(CLI), *test[2:]], env=env, cwd=tmp_path, capture_output=True,
                                      timeout=60).returncode == 0

            wait_until(healthy, 240, interval=2, what=f"{name}'s healthcheck to pass")
        # The whole deployment is ready, as the API and `cxr-triage health` see it.
        check = subprocess.run([str(CLI), "health"], env=running["api"][1], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0 and check.stdout.startswith("ready"), check.stdout + check.stderr
    finally:
        for name, (process, _, log) in running.items():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()
    assert {name: running[name][0].returncode for name in running} == {name: 0 for name in running}
