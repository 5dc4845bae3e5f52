"""Adapters registered at start-up from directories on the server (vLLM's `--lora-modules`),
so a deployment can ship its adapters with it instead of uploading them after every start.

Each entry is `[tenant/]name=path`, or vLLM's JSON form `{"name": "[tenant/]name", "path": ...,
"base_model_name": ...}`: a PEFT output directory holding adapter_config.json and
adapter_model.safetensors (its other files, such as training_args.bin or a README, are left
out). It goes through the same validation as an upload. An adapter already stored under that
tenant and name with the same two files is left as it is, so restarts add no versions, nor do
engines starting together on one store; other bytes there become its next version, as a
re-upload would."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterError, AdapterNotFound
from .loader import CONFIG_FILE, WEIGHTS_FILE
from .store import check_name, files_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraModule:
    tenant: str | None  # None: the open server's single tenant
    name: str
    path: Path
    base_model: str | None = None  # vLLM's base_model_name: checked against the served model


def parse_lora_modules(spec: str | None) -> list[LoraModule]:
    """'sql=/adapters/sql,team-a/chat=/adapters/chat' -> LoraModules: ValueError names what is
    wrong (check_directories looks at the paths, on the machine that serves). Lines (the
    flag's several values) hold such lists or one JSON object each."""
    modules, seen = [], set()
    for line in filter(None, (line.strip() for line in (spec or "").splitlines())):
        for item, key, path, base_model in _json_entry(line) if line.startswith("{") else _entries(line):
            try:
                tenant, name = split_adapter_key(key)
            except AdapterError as e:
                raise ValueError(f"{item!r}: {e.message}") from None
            if (tenant, name) in seen:
                raise ValueError(f"{key!r} is named twice")
            seen.add((tenant, name))
            modules.append(LoraModule(tenant, name, Path(path), base_model))
    return modules


def _entries(line: str):
    for item in filter(None, (part.strip() for part in line.split(","))):
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"{item!r} is not '[tenant/]name=path' or a JSON object")
        yield item, key, path, None


def _json_entry(line: str):
    try:
        entry = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{line!r} is not a JSON object: {e}") from None
    if not isinstance(entry, dict) or set(entry) - {"name", "path", "base_model_name"}:
        raise ValueError(f"{line!r}: a JSON entry has the keys name, path and base_model_name (optional)")
    name, path, base_model = entry.get("name"), entry.get("path"), entry.get("base_model_name")
    if not (isinstance(name, str) and name and isinstance(path, str) and path):
        raise ValueError(f"{line!r}: 'name' and 'path' must be non-empty strings")
    if base_model is not None and not isinstance(base_model, str):
        raise ValueError(f"{line!r}: 'base_model_name' must be a string")
    yield line, name, path, base_model or None


def split_adapter_key(key: str) -> tuple[str | None, str]:
    """'[tenant/]name' -> (tenant or None, name), both checked (AdapterError names a bad one)."""
    tenant, _, name = key.rpartition("/")
    check_name("adapter", name)
    if tenant:
        check_name("tenant", tenant)
    return tenant or None, name


def check_directories(modules: list[LoraModule]) -> None:
    """ValueError for a module whose directory lacks a PEFT adapter's two files."""
    for m in modules:
        try:
            missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (m.path / f).is_file()]
        except OSError as e:  # a name too long for the filesystem, a directory we may not read
            raise ValueError(f"{m.name}={m.path}: cannot read it: {e.strerror}") from None
        if missing:
            raise ValueError(f"{m.name}={m.path}: {m.path} has no {' or '.join(missing)} (a PEFT adapter directory)")


def preload(registry, modules: list[LoraModule], open_tenant: str, base_names: set[str]) -> None:
    """Register each module unless the store already holds the same files under its name."""
    for module in modules:
        if module.base_model is not None and module.base_model not in base_names:
            # vLLM only shows base_model_name in /v1/models; refusing it would break a command line
            log.warning("--lora-modules %s: base_model_name %r is not this server's model (%s): it runs on that",
                        module.name, module.base_model, ", ".join(sorted(base_names)))
        try:
            store_module(registry, module, module.tenant or open_tenant)
        except AdapterError as e:
            raise AdapterError(e.code, f"--lora-modules {module.name}={module.path}: {e.message}") from None


def store_module(registry, module: LoraModule, tenant: str):
    """The module's two files as the tenant's adapter `module.name`: its current version if
    that holds the same files, else a new one (also POST /v1/load_lora_adapter's way in)."""
    with tempfile.TemporaryDirectory(prefix="loragate-preload-") as tmp:
        # Copied, so the bytes validated are the bytes stored, whatever happens to the source.
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            try:
                shutil.copyfile(module.path / f, Path(tmp) / f)
            except OSError as e:  # e.g. not readable by the server's user
                raise AdapterError("missing_file", f"cannot read {module.path / f}: {e.strerror}") from None
        digest = files_digest([(f, _sha256(Path(tmp) / f), 0) for f in sorted((CONFIG_FILE, WEIGHTS_FILE))])
        try:
            current = registry.get(tenant, module.name)
        except AdapterNotFound:
            current = None
        if current is not None and current.sha256 == digest:
            log.warning("adapter %s/%s from %s: already stored (version %d)", tenant, module.name, module.path,
                        current.version)
            return current
        # reuse_same: another engine on this store may have stored them since the check above
        info = registry.register(tenant, module.name, tmp, reuse_same=True)
        log.warning("adapter %s/%s from %s: stored as version %d", tenant, module.name, module.path, info.version)
        return info


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
