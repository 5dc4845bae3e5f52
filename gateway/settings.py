"""GatewaySettings: the HTTP server's knobs (the engine's are EngineConfig), validated on
construction and settable from `loragate serve` flags and LORAGATE_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from loragate.engine.config import parse_bytes
from loragate.engine.errors import ModelConfigError


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_file: str | None = None  # lines of "<key> <tenant>"
    api_keys: str | None = None  # "key=tenant,key2=tenant2"
    admin_key: str | None = None
    max_waiting_requests: int = 256
    max_upload_size: int | str = "2GiB"
    served_model_name: str | None = None  # the name clients use for the base model
    strict_base_model: bool = False  # refuse adapters whose base_model_name_or_path differs

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ModelConfigError(f"port must be in 1..65535, got {self.port}")
        if self.max_waiting_requests < 1:
            raise ModelConfigError("max_waiting_requests must be >= 1")
        self.max_upload_size = parse_bytes(self.max_upload_size, "max_upload_size")
