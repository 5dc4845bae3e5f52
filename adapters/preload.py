"""Adapters registered at start-up from directories on the server (vLLM's `--lora-modules`),
so a deployment can ship its adapters with it instead of uploading them after every start.

Each entry is `[tenant/]name=path`: a PEFT output directory holding adapter_config.json and
adapter_model.safetensors (its other files, such as training_args.bin or a README, are left
out). It goes through the same validation as an upload. An adapter already stored under that
tenant and name with the same two files is left as it is, so restarts add no versions, nor do
engines starting together on one store; other bytes there become its next version, as a
re-upload would."""

from __future__ import annotations

import hashlib
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


def parse_lora_modules(spec: str | None) -> list[LoraModule]:
    """'sql=/adapters/sql,team-a/chat=/adapters/chat' -> LoraModules: ValueError names what is
    wrong (check_directories looks at the paths, on the machine that serves)."""
    modules, seen = [], set()
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"{item!r} is not '[tenant/]name=path'")
        try:
            tenant, name = split_adapter_key(key)
        except AdapterError as e:
            raise ValueError(f"{item!r}: {e.message}") from None
        if (tenant, name) in seen:
            raise ValueError(f"{key!r} is named twice")
        seen.add((tenant, name))
        modules.append(LoraModule(tenant, name, Path(path)))
    return modules


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


def preload(registry, modules: list[LoraModule], open_tenant: str) -> None:
    """Register each module unless the store already holds the same files under its name."""
    for module in modules:
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
