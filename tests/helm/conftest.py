"""Render helm/loragate offline (helm-python-sdk: Helm's Go SDK, no helm binary, no cluster) and
hand the tests parsed manifests. The tests skip, saying why, only when the dev extra's
helm-python-sdk / kubernetes-validate cannot be imported."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "loragate"
RELEASE, NAMESPACE = "demo", "ml"


@dataclass
class Rendered:
    values: dict  # what was passed in (not merged with the defaults)
    manifests: list[dict]
    notes: str
    release: str = RELEASE
    namespace: str = NAMESPACE
    fullname: str = f"{RELEASE}-loragate"  # the prefix of every object's name

    def all(self, kind: str) -> list[dict]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {m["metadata"]["name"] for m in self.all(kind)}

    def workload(self, component: str) -> dict:
        return self.one("StatefulSet" if component == "engine" else "Deployment", f"{self.fullname}-{component}")

    def container(self, component: str) -> dict:
        (container,) = self.workload(component)["spec"]["template"]["spec"]["containers"]
        return container

    def env(self, component: str) -> dict[str, object]:
        """The container's environment: ConfigMap values as strings, `env` entries as written."""
        container, env = self.container(component), {}
        for source in container.get("envFrom", []):
            env.update(self.one("ConfigMap", source["configMapRef"]["name"])["data"])
        for entry in container.get("env", []):
            env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
        return env

    def secret_data(self, name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in self.one("Secret", name).get("data", {}).items()}


@pytest.fixture(scope="session")
def helm():
    return pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def kube_validate():
    return pytest.importorskip("kubernetes_validate",
                               reason="kubernetes-validate is not installed (pip install -e '.[dev]')")


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def chart(helm):
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart):
    def _render(values: dict) -> Rendered:
        out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        manifests = [doc for path, text in sorted(out.items()) if path.endswith(".yaml")
                     for doc in yaml.safe_load_all(text) if doc]
        notes = next((text for path, text in out.items() if path.endswith("NOTES.txt")), "")
        return Rendered(values, manifests, notes)

    return _render
