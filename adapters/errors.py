"""Exceptions for adapters a user can fix (or that do not exist).

The gateway maps them in one place: every AdapterError to 422 except `too_large` (413),
AdapterNotFound to 404. The `code` is what clients and tests branch on, so it is part of
the API; the message says which file/key/module is wrong and what was expected.
"""

from __future__ import annotations

CODES = frozenset({
    "invalid_config",         # adapter_config.json unreadable, not JSON, or a field of the wrong type/value
    "unsupported_adapter",    # valid PEFT, but a method/option loragate cannot serve (DoRA, IA3, modules_to_save, ...)
    "rank_too_large",         # r above the server's max_lora_rank
    "unknown_target_module",  # targets a module the base model does not have (or none at all)
    "shape_mismatch",         # a tensor's shape does not fit the base model (or the config's r)
    "non_finite_weights",     # NaN or inf in a tensor
    "pickle_weights",         # only pickle-based weights (.bin/.pt/.pth/.pkl), which are never loaded
    "missing_file",           # adapter_config.json or adapter_model.safetensors absent
    "invalid_weights",        # corrupt safetensors, unexpected/missing keys, bad dtypes
    "base_model_mismatch",    # base_model_name_or_path names another model (strict mode)
    "too_large",              # over a size limit
    "invalid_name",           # tenant/adapter/file name not allowed in the store
})


class AdapterError(ValueError):
    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown AdapterError code {code!r}")  # a typo here would reach clients
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"AdapterError({self.code!r}, {self.message!r})"


class AdapterNotFound(KeyError):
    """No such adapter (or version) for this tenant. A KeyError so mapping-style callers can
    catch it; str() is the plain message, not KeyError's repr-quoted key."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
