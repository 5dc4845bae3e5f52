"""GatewaySettings: the HTTP server's knobs (the engine's are EngineConfig), validated on
construction and settable from `loragate serve` flags and LORAGATE_* variables."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from loragate.engine.config import parse_bytes
from loragate.engine.errors import ModelConfigError

from .auth import TENANT_NAME

ROLES = ("all", "engine", "router")
ROUTE_POLICIES = ("affinity", "round_robin")
REASONING_PARSERS = ("auto", "think", "none")  # gateway/reasoning.py
# --pooler-config's pooling_type (vLLM's names; MAX as sentence-transformers' max_tokens) ->
# SamplingParams.pooling (engine/pooling.py)
POOLING_TYPES = {"LAST": "last", "CLS": "first", "MEAN": "mean", "MAX": "max"}


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None  # lines of "<key> <tenant>"
    api_keys: str | None = None  # "key=tenant,key2=tenant2"
    api_key: str | None = None  # vLLM's --api-key: one key, the tenant "default"'s (as an open server's callers)
    admin_key: str | None = None
    max_waiting_requests: int = 256
    max_tenant_requests: int = 0  # most inference requests one tenant may have open at once (0: no limit)
    max_adapters_per_tenant: int = 0  # most adapters one tenant may store (0: no limit)
    # Per tenant, interactive requests and their tokens (prompt and output) per minute (0: no
    # limit); gateway/rate_limits.py.
    tenant_requests_per_minute: int = 0
    tenant_tokens_per_minute: int = 0
    tenant_rate_limits_file: str | None = None  # JSON: tenant -> its own limits (rate_limits.load_tenant_limits)
    # router: keep the buckets in this Redis, shared by every router replica (shared_buckets.py)
    rate_limit_redis_url: str | None = None
    # "tenant=-1,other=2": each tenant's most urgent priority (lower runs first; others: 0). A
    # request's own `priority` can only make it less urgent than its tenant's.
    tenant_priorities: str | None = None
    max_upload_size: int | str = "2GiB"
    # The name(s) clients use for the base model, comma-separated: the first is its name, the
    # others aliases (vLLM's --served-model-name takes several too); served_names() parses them
    served_model_name: str | None = None
    # "[tenant/]name=path,..." or JSON objects, one per line: adapters stored at start-up from
    # directories on the server (vLLM's --lora-modules; adapters/preload.py)
    lora_modules: str | None = field(default=None, metadata={"several": True})
    # vLLM's runtime LoRA API (POST /v1/load_lora_adapter, /v1/unload_lora_adapter): it reads
    # directories on the server, so it is off unless asked for (gateway/runtime_lora_api.py).
    allow_runtime_lora_updating: bool = False
    strict_base_model: bool = False  # refuse adapters whose base_model_name_or_path differs
    # A tenant whose adapters every tenant may use, as model "<tenant>/<name>" (None: none)
    shared_adapters_tenant: str | None = None
    # How /v1/embeddings pools and normalizes, as vLLM's --pooler-config JSON (pooler() parses it)
    pooler_config: str | None = None
    # Chat answers of reasoning models split into reasoning and content (gateway/reasoning.py):
    # auto (models whose chat template writes <think> ... </think>), think (required), none.
    reasoning_parser: str = "auto"
    # Adapter store: "local" (LORAGATE_HOME/adapters) or "s3", a bucket every engine shares,
    # read through a bounded local cache (LORAGATE_HOME/adapter-cache); adapters/s3_store.py.
    adapter_store: str = "local"
    s3_bucket: str | None = None
    s3_prefix: str = "loragate/adapters"
    s3_endpoint_url: str | None = None  # None: AWS; else an S3-compatible service, e.g. http://minio:9000
    adapter_cache_size: int | str = "20GiB"  # s3: least recently used versions leave the cache beyond this
    adapter_refresh_interval: float = 2.0  # seconds between checks for adapters changed by other servers
    # Batch API: engine requests that batch lines may have in flight at once, and the most
    # lines one input file may hold.
    batch_max_concurrency: int = 4
    batch_max_lines: int = 50_000
    # Responses API: days a completed response stays stored (for previous_response_id and
    # GET /v1/responses/{id}); 0 stores none (every response says store: false).
    response_retention_days: int = 30
    # ... and the most bytes one tenant's stored responses may hold: beyond it its oldest go.
    response_store_max_bytes_per_tenant: int | str = "1GiB"
    # Roles: "all" (one process), "engine" (the same server, behind a router), "router" (no
    # model: proxies to engines by adapter affinity, see gateway/router.py).
    role: str = "all"
    engine_urls: str | None = None  # router: "http://10.0.0.5:8000,http://10.0.0.6:8000"
    engine_dns: str | None = None  # router: "name:port"; every address it resolves to is an engine
    discovery_interval: float = 10.0  # router: seconds between DNS re-resolutions
    health_interval: float = 2.0  # router: seconds between /readyz checks of each engine
    # router: most requests open on one engine; beyond it, its adapters spill to their next
    # engine. The engine's max_num_seqs default: requests beyond it would only queue there.
    max_engine_load: int = 32
    route_policy: str = "affinity"  # router: affinity | round_robin (a baseline for bench/router.py)
    prefix_routing: bool = True  # router: among a hot adapter's engines, follow the prompt's cached start
    engine_timeout: float = 600.0  # router: seconds to wait for an engine's next response bytes
    # A file (or "-": stderr) where adapter management is recorded, a JSON line per call (gateway/audit.py)
    audit_log: str | None = None
    # Answers carry their own timings in "metrics" (vLLM's --enable-per-request-metrics)
    enable_per_request_metrics: bool = False
    # OpenTelemetry traces of inference requests, exported over OTLP/HTTP or gRPC (gateway/tracing.py)
    otlp_traces_endpoint: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ModelConfigError(f"port must be in 1..65535, got {self.port}")
        if self.max_waiting_requests < 1:
            raise ModelConfigError("max_waiting_requests must be >= 1")
        for name in ("max_tenant_requests", "max_adapters_per_tenant", "tenant_requests_per_minute",
                     "tenant_tokens_per_minute"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"{name} must be >= 0 (0: no limit)")
        self.max_upload_size = parse_bytes(self.max_upload_size, "max_upload_size")
        for name in ("batch_max_concurrency", "batch_max_lines"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.response_store_max_bytes_per_tenant = parse_bytes(self.response_store_max_bytes_per_tenant,
                                                               "response_store_max_bytes_per_tenant")
        if self.response_retention_days < 0:
            raise ModelConfigError("response_retention_days must be >= 0 (0: responses are not stored)")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ModelConfigError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                                   f"got {self.reasoning_parser!r}")
        if self.otlp_traces_endpoint and not re.fullmatch(r"(https?://[^\s/]+(/\S*)?|grpc://[^\s/]+/?)",
                                                          self.otlp_traces_endpoint):
            raise ModelConfigError("otlp_traces_endpoint must be an OTLP collector's URL such as "
                                   "http://collector:4318/v1/traces (OTLP/HTTP) or grpc://collector:4317 (OTLP/gRPC), "
                                   f"got {self.otlp_traces_endpoint!r}")
        if self.shared_adapters_tenant is not None and not TENANT_NAME.match(self.shared_adapters_tenant):
            raise ModelConfigError(f"shared_adapters_tenant must be a tenant name (letters, digits, '.', '_', '-'), "
                                   f"got {self.shared_adapters_tenant!r}")
        if self.api_key is not None and (not self.api_key or any(c.isspace() or c in ",=" for c in self.api_key)):
            raise ModelConfigError("api_key must be one key without spaces, ',' or '='")
        self.tenant_priority_map()
        self.served_names()
        self.pooler()
        self.preloaded_adapters()
        self._check_router_settings()
        self._check_adapter_store_settings()

    def tenant_priority_map(self) -> dict[str, int]:
        """tenant_priorities parsed (a ModelConfigError names what is wrong)."""
        out = {}
        for item in filter(None, (self.tenant_priorities or "").split(",")):
            tenant, sep, value = item.strip().partition("=")
            if not sep or not tenant or not re.fullmatch(r"-?\d+", value.strip()):
                raise ModelConfigError(f"tenant_priorities: {item.strip()!r} is not 'tenant=integer'")
            out[tenant] = int(value)
        return out

    def key_entries(self) -> str | None:
        """api_keys with api_key added as the default tenant's (KeyStore's "key=tenant" list)."""
        from .auth import OPEN_TENANT

        own = f"{self.api_key}={OPEN_TENANT}" if self.api_key else None
        return ",".join(filter(None, (self.api_keys, own))) or None

    def served_names(self) -> list[str]:
        """served_model_name split at commas ([]: the model's own name)."""
        names = [n.strip() for n in (self.served_model_name or "").split(",")] if self.served_model_name else []
        for name in names:
            if not name or ":" in name or any(c.isspace() for c in name):
                raise ModelConfigError(f"served_model_name: {name!r} is not a model name (names are separated by "
                                       "commas; none may be empty or hold ':', which separates base and adapter)")
        if len(set(names)) != len(names):
            raise ModelConfigError(f"served_model_name names one model twice: {self.served_model_name!r}")
        return names

    def pooler(self) -> tuple[str | None, bool]:
        """pooler_config parsed: (the pooling /v1/embeddings uses, None: the model's own;
        whether vectors are L2-normalized by default). vLLM's sequence pooling types, and MAX."""
        if not self.pooler_config:
            return None, True
        try:
            config = json.loads(self.pooler_config)
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise ModelConfigError(f"pooler_config must be a JSON object such as "
                                   f"'{{\"pooling_type\": \"MEAN\"}}', got {self.pooler_config!r}")
        unknown = set(config) - {"pooling_type", "normalize"}
        if unknown:
            raise ModelConfigError(f"pooler_config: {', '.join(sorted(unknown))} not supported (pooling_type and "
                                   "normalize are)")
        pooling_type, normalize = config.get("pooling_type"), config.get("normalize", True)
        if pooling_type is not None and pooling_type not in POOLING_TYPES:
            raise ModelConfigError(f"pooler_config: pooling_type must be one of {', '.join(POOLING_TYPES)}, "
                                   f"got {pooling_type!r}")
        if not isinstance(normalize, bool):
            raise ModelConfigError(f"pooler_config: normalize must be true or false, got {normalize!r}")
        return POOLING_TYPES.get(pooling_type), normalize

    def preloaded_adapters(self):
        """lora_modules parsed and their directories checked (a ModelConfigError names what is wrong)."""
        from loragate.adapters.preload import parse_lora_modules

        try:
            return parse_lora_modules(self.lora_modules)
        except ValueError as e:
            raise ModelConfigError(f"lora_modules: {e}") from None

    def tenant_limits(self) -> dict[str, dict[str, int]]:
        """tenant_rate_limits_file read and checked (a ModelConfigError names what is wrong)."""
        from .rate_limits import load_tenant_limits

        return load_tenant_limits(self.tenant_rate_limits_file) if self.tenant_rate_limits_file else {}

    def _check_adapter_store_settings(self) -> None:
        if self.adapter_store not in ("local", "s3"):
            raise ModelConfigError(f"adapter_store must be local or s3, got {self.adapter_store!r}")
        if self.adapter_store == "s3" and not self.s3_bucket:
            raise ModelConfigError("adapter_store s3 needs a bucket: set --s3-bucket (LORAGATE_S3_BUCKET)")
        prefix = self.s3_prefix.strip("/")
        if prefix and not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", prefix) or \
                any(part in (".", "..") for part in prefix.split("/")):
            raise ModelConfigError(f"s3_prefix {self.s3_prefix!r} is not allowed: use letters, digits, '.', '_', "
                                   "'-' and '/' between non-empty parts other than '.' and '..'")
        if self.s3_endpoint_url and not re.fullmatch(r"https?://[^\s/]+/?", self.s3_endpoint_url):
            raise ModelConfigError(f"s3_endpoint_url must look like http(s)://host[:port], got {self.s3_endpoint_url!r}")
        self.adapter_cache_size = parse_bytes(self.adapter_cache_size, "adapter_cache_size")
        if not self.adapter_refresh_interval > 0:
            raise ModelConfigError(f"adapter_refresh_interval must be > 0 seconds, got {self.adapter_refresh_interval}")

    def _check_router_settings(self) -> None:
        from .discovery import parse_dns_target, parse_engine_urls

        if self.role not in ROLES:
            raise ModelConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.route_policy not in ROUTE_POLICIES:
            raise ModelConfigError(f"route_policy must be one of {', '.join(ROUTE_POLICIES)}, got {self.route_policy!r}")
        parse_engine_urls(self.engine_urls)
        parse_dns_target(self.engine_dns)
        if self.role == "router" and not (self.engine_urls or self.engine_dns):
            raise ModelConfigError("role 'router' needs engines: set --engine-urls and/or --engine-dns")
        for name in ("discovery_interval", "health_interval", "engine_timeout"):
            if not getattr(self, name) > 0:
                raise ModelConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_engine_load < 1:
            raise ModelConfigError(f"max_engine_load must be >= 1, got {self.max_engine_load}")
        if self.rate_limit_redis_url:
            if self.role != "router":
                raise ModelConfigError("rate_limit_redis_url is for role 'router', which keeps the fleet's rate "
                                       "limits; an engine or a single server keeps its own")
            if not re.fullmatch(r"(rediss?|unix)://\S+", self.rate_limit_redis_url):
                # not echoed: it may hold a password
                raise ModelConfigError("rate_limit_redis_url must look like redis://[:password@]host:port/db, "
                                       "rediss://... (TLS) or unix:///path")
