"""The Dockerfile's recipe replayed without Docker, started as the Kubernetes manifests start it.

No Docker engine runs here, so the test does what the image build does, step by step as the
Dockerfile says: a venv at the image's venv path (mapped to a temporary folder), exactly the
files its ``COPY`` lines copy (minus .dockerignore), its ``RUN`` lines (a regular, non-editable
install). Then, as the runtime stage has it, the sources are gone: only the venv is left, the
working directory is an empty ``/app`` and the environment is the image's ``ENV`` plus the
manifests' ConfigMap. ``tokenwire gateway`` and ``tokenwire worker`` are started with the
manifests' own ``args`` (ports mapped to free ones) and must answer a question with a JWT.
"""

from __future__ import annotations

import http.client
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import yaml

from tests import dockerfile as docker
from tests.install.installs import SOURCE, ask, clean_env, run, tracked_files
from tokenwire.natsserver import NatsServer, free_port
from tokenwire.simulator import expected_final_answer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

VENV = "/opt/tokenwire"  # where the image keeps its venv; replayed under tmp
QUESTION = "Is the image ready?"
JWT_SECRET = "replay-secret-" + "x" * 32
DIFY_KEY = "app-replayed"


def container(component: str) -> dict[str, object]:
    manifest = yaml.safe_load((SOURCE / f"deploy/k8s/base/{component}-deployment.yaml").read_text())
    (spec,) = manifest["spec"]["template"]["spec"]["containers"]
    assert isinstance(spec, dict)
    return spec


def config_env() -> dict[str, str]:
    env = {}
    for line in (SOURCE / "deploy/k8s/base/config.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def expand(value: str, env: dict[str, str], venv: Path) -> str:
    """An ENV value or RUN line as the image sees it: its venv path mapped, $VARs filled."""
    value = value.replace(VENV, str(venv))
    for key, val in env.items():
        value = value.replace(f"${{{key}}}", val).replace(f"${key}", val)
    return value


def build(tmp: Path) -> Path:
    """Replay the build stage; returns the venv (the only thing the runtime stage keeps)."""
    build_stage = next(s for s in docker.stages(SOURCE / "Dockerfile") if "AS build" in s[0].rest)
    patterns = docker.ignore_patterns(SOURCE / ".dockerignore")
    files = [f for f in tracked_files() if not docker.ignored(f, patterns)]
    venv = tmp / "opt-tokenwire"
    workdir = tmp  # "/" until a WORKDIR says otherwise
    env = clean_env()
    for step in build_stage:
        if step.word == "ENV":
            for key, value in docker.env_of([step]).items():
                # The image turns pip's cache off to keep its layers small; here it saves time.
                if key != "PIP_NO_CACHE_DIR":
                    env[key] = expand(value, env, venv)
        elif step.word == "ARG":
            # A build argument with its default (no --build-arg: the image users build).
            key, _, value = step.rest.partition("=")
            env[key] = value.strip('"')
        elif step.word == "WORKDIR":
            workdir = tmp / step.rest.strip("/").replace("/", "-")
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.word == "COPY":
            *sources, dest = shlex.split(step.rest)
            assert not any(s.startswith("--") for s in sources), step
            for source in sources:
                chosen = [f for f in files if f == source or f.startswith(source.rstrip("/") + "/")]
                assert chosen, f"COPY {source}: nothing to copy"
                for name in chosen:
                    # "COPY shared/ shared/" puts the folder's files under dest.
                    rel = name[len(source.rstrip("/")) + 1 :] if name != source else Path(name).name
                    target = workdir / dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(SOURCE / name, target)
        elif step.word == "RUN":
            run(["bash", "-c", expand(step.rest, env, venv)], cwd=workdir, env=env, timeout=600)
    # The runtime stage copies only the venv: no sources next to it.
    shutil.rmtree(workdir)
    return venv


def runtime_env(venv: Path, tmp: Path) -> dict[str, str]:
    runtime = docker.stages(SOURCE / "Dockerfile")[-1]
    env = clean_env()
    for key, value in docker.env_of(runtime).items():
        env[key] = expand(value, env, venv)
    # HOME and TMPDIR are /tmp in the image (an emptyDir): a private one here.
    home = tmp / "home"
    home.mkdir()
    env["HOME"] = env["TMPDIR"] = str(home)
    env.update(config_env())
    return env


def wait_ready(port: int, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    deadline = time.monotonic() + 60
    while True:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, f"{proc.args} exited:\n{log.read_text()[-4000:]}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        assert time.monotonic() < deadline, "\n".join(log.read_text()[-3000:] for log in logs)
        time.sleep(0.2)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return build(tmp_path)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """NATS and a Dify (the simulator, from the test venv: it is not part of the image)."""
    nats = NatsServer(tmp_path / "nats", stop_grace=5.0).start()
    sim_port = free_port()
    sim_log = (tmp_path / "sim.log").open("wb")
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokenwire",
            "simulate-dify",
            "--port",
            str(sim_port),
            "--api-key",
            DIFY_KEY,
        ],
        stdout=sim_log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield nats.url, f"http://127.0.0.1:{sim_port}/v1"
    finally:
        sim.terminate()
        sim.wait(timeout=15)
        sim_log.close()
        nats.stop()


def test_the_image_recipe_answers_through_a_gateway_and_a_worker(
    image: Path, services: tuple[str, str], tmp_path: Path
) -> None:
    nats_url, dify_url = services
    env = runtime_env(image, tmp_path)
    env.update(
        TOKENWIRE_NATS_URL=nats_url,
        DIFY_API_URL=dify_url,
        # One NATS server here; the ConfigMap asks three replicas of a cluster.
        TOKENWIRE_STREAM_REPLICAS="1",
    )
    app_dir = tmp_path / "app"  # WORKDIR /app: empty
    app_dir.mkdir()
    gateway_port, worker_port = free_port(), free_port()
    ports = {"8000": str(gateway_port), "9100": str(worker_port)}

    runtime = docker.stages(SOURCE / "Dockerfile")[-1]
    (entrypoint,) = [json.loads(s.rest) for s in runtime if s.word == "ENTRYPOINT"]
    assert entrypoint == ["tokenwire"], entrypoint

    def argv(component: str) -> list[str]:
        """The container's ENTRYPOINT (found on the image's PATH) and the manifest's args."""
        args = container(component)["args"]
        assert isinstance(args, list)
        found = shutil.which(entrypoint[0], path=env["PATH"])
        assert found == str(image / "bin" / "tokenwire"), found
        return [found, *(ports.get(str(a), str(a)) for a in args)]

    # Each process gets only the secret its manifest gives it.
    secrets = {
        "gateway": {"TOKENWIRE_JWT_SECRET": JWT_SECRET},
        "worker": {"DIFY_API_KEY": DIFY_KEY},
    }
    procs, logs = [], []
    try:
        for component in ("worker", "gateway"):
            names = {e["name"] for e in container(component).get("env", [])}  # type: ignore[union-attr]
            assert set(secrets[component]) <= names, (component, names)
            log = tmp_path / f"{component}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        argv(component),
                        cwd=app_dir,
                        env=env | secrets[component],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        wait_ready(worker_port, procs, logs)
        wait_ready(gateway_port, procs, logs)

        token = jwt.encode(
            {"sub": "replayed-user", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256"
        )
        answer = ask(
            f"http://127.0.0.1:{gateway_port}",
            QUESTION,
            headers={
                "Authorization": f"Bearer {token}",
                "Origin": env["TOKENWIRE_ALLOWED_ORIGINS"].split(",")[0],
            },
        )
        assert answer == expected_final_answer(QUESTION)
        # The page ships inside the venv: the gateway serves it with no TOKENWIRE_WEB_DIR.
        conn = http.client.HTTPConnection("127.0.0.1", gateway_port, timeout=5)
        conn.request("GET", "/sdk/tokenwire.js")
        assert conn.getresponse().status == 200
        conn.close()
        assert not list(app_dir.iterdir()), "the processes wrote into the working directory"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
