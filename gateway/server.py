"""`loragate serve`: build the state, load the model in the background, run uvicorn."""

from __future__ import annotations

import gc
import logging
import os
import sys

from .audit import AuditLog
from .auth import KEYS_RELOAD_SECONDS, KeyStore
from .rate_limits import TenantRateLimits
from .settings import GatewaySettings
from .state import ServerState
from .tracing import tracing_of

log = logging.getLogger("loragate.gateway")


def make_adapter_store(settings: GatewaySettings):
    """The configured adapter store, built (an S3 bucket probed) before the server starts, so a
    wrong bucket or missing credentials is one line at start-up rather than a 503 later."""
    from loragate.adapters.s3_client import StoreUnavailableError
    from loragate.adapters.store_factory import make_adapter_store as make_store
    from loragate.engine.errors import ModelConfigError
    from loragate.engine.models.prepare import loragate_home

    try:
        return make_store(settings.adapter_store, loragate_home(), s3_bucket=settings.s3_bucket,
                          s3_prefix=settings.s3_prefix, s3_endpoint_url=settings.s3_endpoint_url,
                          cache_max_bytes=settings.adapter_cache_size)
    except StoreUnavailableError as e:
        raise ModelConfigError(f"adapter store: {e}") from None


def make_loader(engine_config, settings: GatewaySettings, freeze_heap: bool = False):
    store = make_adapter_store(settings) if engine_config.max_loras > 0 else None

    def load(state: ServerState) -> None:
        from functools import partial

        from loragate.adapters.host_lru import HostLru
        from loragate.adapters.loader import DEFAULT_MAX_ADAPTER_BYTES
        from loragate.adapters.preload import preload
        from loragate.adapters.registry import AdapterRegistry
        from loragate.engine import AsyncEngine
        from loragate.engine.models.prepare import CATALOG
        from loragate.engine.models.vocab_lora import check_base_copies

        from .auth import OPEN_TENANT
        from .reasoning import reasoning_markers

        engine = AsyncEngine(engine_config)
        inner = engine.engine
        entry = CATALOG.get(engine_config.model)
        names = settings.served_names() or [inner.model_name]
        state.model_name, state.served_names = names[0], tuple(names)
        state.base_names = {*names, inner.model_name} | ({entry.hf_id} if entry else set())
        if inner.lora_pool is not None and store is not None:
            registry = AdapterRegistry(store, inner.model.config, engine_config.max_lora_rank,
                                       base_model_name=entry.hf_id if entry else None,
                                       strict_base_model=settings.strict_base_model,
                                       refresh_interval=settings.adapter_refresh_interval,
                                       max_cached_bytes=engine_config.max_cpu_lora_memory,
                                       # what may be uploaded may be loaded (and what is stored still loads)
                                       max_bytes=max(settings.max_upload_size, DEFAULT_MAX_ADAPTER_BYTES),
                                       check_weights=partial(check_base_copies, inner.model))
            try:
                preload(registry, settings.preloaded_adapters(), OPEN_TENANT, state.base_names)
            except BaseException:
                engine.shutdown()  # the server stays up, unready, saying why: without a running engine
                raise
            registry.listeners.append(state.on_adapter_change)
            state.engine_adapters = HostLru(64, engine_config.max_cpu_lora_memory, keep_newest=True)
            state.registry = registry
        state.think_markers = reasoning_markers(settings.reasoning_parser, inner.tokenizer)
        state.engine = engine  # last: from here on the server is ready
        log.warning("ready: model %r", state.model_name)
        inner.grammars.warm()  # after ready: the first structured-output request need not build it
        if freeze_heap:
            freeze_heap_now()

    return load


def freeze_heap_now() -> None:
    """What the process has loaded (torch, transformers, the model: ~400k objects) lives as long
    as it does: out of the cyclic collector's sight, its full passes (0.2 s each with a model,
    every stream waiting them out) stop scanning it. Only where the process is the server's
    own: tests' in-process servers would leave whatever they free in cycles uncollected."""
    gc.collect()
    gc.freeze()


def serve_router(settings: GatewaySettings) -> int:
    """role=router: no model; keys only to keep rate limits (engines authenticate); see gateway/router.py."""
    import uvicorn

    from .router import build_router_app

    app = build_router_app(settings)
    engines = ", ".join(filter(None, [settings.engine_urls, settings.engine_dns and f"dns {settings.engine_dns}"]))
    print(f"loragate: routing on http://{settings.host}:{settings.port} to engines: {engines} "
          f"(policy {settings.route_policy}; /readyz is 200 once one engine is ready)", file=sys.stderr)
    freeze_heap_now()  # 180k objects (it imports torch): 80 ms a full pass
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=os.environ.get("LORAGATE_LOG_LEVEL", "warning"))
    return 0


def _example_call(base: str, model: str, model_dir) -> str:
    """A curl line for the banner: a chat request, or a completion for a model without a chat
    template (a base model such as gemma-3-270m, whose chat requests are refused)."""
    import json
    from pathlib import Path

    config = Path(model_dir) / "tokenizer_config.json"
    try:
        has_template = (Path(model_dir) / "chat_template.jinja").is_file() or "chat_template" in json.loads(config.read_text())
    except (OSError, ValueError):
        has_template = True  # unknown: show the usual call
    if has_template:
        return (f"curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")
    return (f"curl {base}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}}'")


def serve(engine_config, settings: GatewaySettings) -> int:
    import uvicorn

    from loragate.adapters.preload import check_directories
    from loragate.engine.errors import ModelConfigError

    from .app import build_app

    if settings.role == "router":  # no model to resolve or load
        return serve_router(settings)

    try:
        keys = KeyStore.from_sources(settings.api_keys_file, settings.key_entries(), settings.admin_key)
    except (ValueError, OSError) as e:
        raise ModelConfigError(f"API keys: {e}") from e
    per_tenant = settings.tenant_limits()  # read now: a bad file fails before the model loads
    if settings.lora_modules and engine_config.max_loras < 1:
        raise ModelConfigError("lora_modules: adapters need LoRA slots: set --max-loras 1 or more")
    try:
        check_directories(settings.preloaded_adapters())
    except ValueError as e:
        raise ModelConfigError(f"lora_modules: {e}") from None
    if not keys.is_open and any(m.tenant is None for m in settings.preloaded_adapters()):
        raise ModelConfigError("lora_modules: with API keys configured, name each adapter's tenant: tenant/name=path")
    if keys.is_open:
        print("loragate: no API keys configured: the server is open and every caller is tenant "
              "'default' (set --api-key, LORAGATE_API_KEYS or --api-keys-file to require keys)", file=sys.stderr)
    elif not keys.num_keys:
        print(f"loragate: {settings.api_keys_file} holds no API keys yet: every request is refused (401) until "
              f"keys are added to it (it is read again every {KEYS_RELOAD_SECONDS:g} s)", file=sys.stderr)
    from loragate.engine.models.prepare import resolve_model

    # Fail now, with one line, for a model that cannot exist; preparing a catalog model
    # (first run only) happens here too, with its progress on the terminal.
    model_dir = resolve_model(engine_config.model)
    try:
        audit = AuditLog(settings.audit_log) if settings.audit_log else None
    except OSError as e:
        raise ModelConfigError(f"audit_log {settings.audit_log}: {e.strerror}") from None
    state = ServerState(keys=keys, max_waiting=settings.max_waiting_requests,
                        max_tenant_requests=settings.max_tenant_requests,
                        rate_limits=TenantRateLimits(settings.tenant_requests_per_minute,
                                                     settings.tenant_tokens_per_minute, per_tenant=per_tenant),
                        tenant_priorities=settings.tenant_priority_map(),
                        shared_tenant=settings.shared_adapters_tenant,
                        per_request_metrics=settings.enable_per_request_metrics, pooler=settings.pooler(),
                        audit=audit)
    app = build_app(state, make_loader(engine_config, settings, freeze_heap=True), tracing_of(settings, "loragate-engine"))
    app.state.settings = settings
    base = f"http://{settings.host}:{settings.port}"
    print(f"loragate: serving on {base} (model loads in the background; {base}/readyz says when it is up)\n"
          f"  {_example_call(base, (settings.served_names() or [engine_config.model])[0], model_dir)}", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=os.environ.get("LORAGATE_LOG_LEVEL", "warning"))
    return 0
