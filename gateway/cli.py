"""`loragate` command line: prepare the bundled models, serve over HTTP, generate text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from .config_flags import add_dataclass_flags, dataclass_from_args

ENGINE_HELP = {
    "model": "catalog name (see `loragate models list`) or a local Hugging Face model directory",
    "device": "auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or cuda:N",
    "dtype": "weights, activations and KV cache dtype: bfloat16 or float32",
    "cuda_graphs": "on a CUDA GPU, replay decode and speculative verification steps as CUDA graphs (false: run every step eagerly)",
    "max_model_len": "longest prompt + output in tokens (capped by the model and the KV cache)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "memory for the KV cache, e.g. 512MiB or 2GiB, or a share of the memory free once the model "
                       "is loaded, e.g. 85%% (of the GPU's on CUDA, of MemAvailable on CPU)",
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "token budget per step; longer prompts are prefilled in chunks",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "num_threads": "torch compute threads (default: the cores this process may use)",
    "max_loras": "LoRA adapter slots, i.e. distinct adapters per step (0: LoRA support off)",
    "max_lora_rank": "highest LoRA rank accepted (slots are padded to it)",
    "max_cpu_loras": "adapters kept in host memory after leaving a slot",
    "max_cpu_lora_memory": "host memory for adapter weights, e.g. 8GiB: adapters beyond it are read from disk again when "
                           "next used (a sparse-expert model's expert adapters are gigabytes each)",
    "speculative": "speculative decoding: off, draft (a smaller model proposes) or ngram (prompt lookup)",
    "draft_model": "draft model for --speculative draft: catalog name or directory, same tokenizer as --model",
    "num_speculative_tokens": "most tokens proposed per request and step (adapted to each request's acceptance)",
    "draft_vocab_size": "the draft proposes among this many lowest token ids plus each request's own tokens (0: all)",
    "draft_quantization": "int4 (the draft's weights quantized to 4 bits: faster drafting, still lossless) or none",
    "ngram_min": "n-gram prompt lookup: shortest suffix to match",
    "ngram_max": "n-gram prompt lookup: longest suffix to match",
}


def _engine_config(args):
    from loragate.engine import EngineConfig

    return dataclass_from_args(EngineConfig, args)


def cmd_models_list(args) -> int:
    from loragate.engine.models.prepare import CATALOG, DEFAULT_MODEL, MARKER, loragate_home

    for name, entry in CATALOG.items():
        ready = (loragate_home() / "models" / name / MARKER).is_file()
        flag = " (default)" if name == DEFAULT_MODEL else "" if entry.chat else " (base model: completions only)"
        print(f"{name}{flag}\t{'prepared' if ready else 'not prepared'}\tweights: {entry.pip_command}")
    return 0


def cmd_models_prepare(args) -> int:
    from loragate.engine.models.prepare import prepare_model

    path = prepare_model(args.name, progress=not args.quiet)
    print(path)
    return 0


def _prompt_ids(engine, text: str, chat: bool | None) -> list[int]:
    tok = engine.tokenizer
    use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
    if use_chat:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    return tok.encode(text)


def _stream_one(engine, ids, params, adapter=None) -> str:
    req = engine.add_request(ids, params, adapter=adapter)
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id == req.request_id:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
                if out.finished:
                    sys.stdout.write("\n")
                    return out.finish_reason
    return req.finish_reason


def _read_flag_file(flag: str, path: str, parse=lambda f: f.read()):
    """The file a flag names, parsed; an unreadable or unparsable one is a one-line error."""
    from loragate.engine import InvalidRequestError

    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSON errors are ValueErrors
        raise InvalidRequestError(f"{flag} {path}: {e}", flag.lstrip("-").replace("-", "_")) from None


def _json_grammar(args) -> str | None:
    """--json-schema FILE or --json: the output is JSON (valid against the schema)."""
    from loragate.engine.structured_output import grammar_from_json_schema

    if args.json_schema is None:
        return grammar_from_json_schema(None) if args.json else None
    return _read_flag_file("--json-schema", args.json_schema, lambda f: grammar_from_json_schema(json.load(f)))


def _prediction(args) -> str | None:
    """--prediction FILE: text the output is expected to be much like."""
    return None if args.prediction is None else _read_flag_file("--prediction", args.prediction)


def cmd_generate(args) -> int:
    from loragate.engine import InvalidRequestError, LLMEngine, SamplingParams
    from loragate.engine.fill_in_middle import require_fim_format

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop or [],
                            repetition_penalty=args.repetition_penalty, grammar=_json_grammar(args),
                            prediction=_prediction(args))
    engine = LLMEngine(_engine_config(args), progress=not args.quiet)
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidRequestError(f"--adapter takes NAME=PATH, got {spec!r}", "adapter")
        engine.add_adapter(name, path)
    adapter = args.use_adapter
    if adapter is not None and adapter not in engine.adapters:
        raise InvalidRequestError(f"--use-adapter {adapter!r} names no adapter loaded with --adapter", "adapter")
    fim = None
    if args.suffix is not None:  # the prompt is the text before the gap: plain text in the model's FIM layout
        fim = require_fim_format(engine.tokenizer, "--suffix")
        params = dataclasses.replace(params, stop_token_ids=list(fim.stop_token_ids))

    def prompt_ids(text: str) -> list[int]:
        return _prompt_ids(engine, text, args.chat) if fim is None else engine.tokenize(fim.prompt(text, args.suffix))

    if args.prompt is not None:
        _stream_one(engine, prompt_ids(args.prompt), params, adapter)
        return 0
    if not sys.stdin.isatty():
        _stream_one(engine, prompt_ids(sys.stdin.read()), params, adapter)
        return 0
    print("Interactive generation: type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip():
            _stream_one(engine, prompt_ids(text), params, adapter)


GATEWAY_HELP = {
    "host": "address to listen on",
    "port": "TCP port",
    "api_keys_file": "file of '<key> <tenant>' lines; keys map callers to tenants. Read again every 5 s, so keys "
                     "are added and revoked without a restart (a file that does not parse leaves the keys as they were)",
    "api_keys": "keys as 'key=tenant,key2=tenant2'",
    "api_key": "one key every request must carry, as vLLM's --api-key: its callers are tenant 'default' (combine "
               "with --api-keys or --api-keys-file for other tenants)",
    "admin_key": "key that manages every tenant's adapters",
    "max_waiting_requests": "with this many queued, tenants over their share of the queue are answered 429 "
                            "with Retry-After",
    "max_tenant_requests": "inference requests one tenant may have open at once; more are answered 429 (0: no limit)",
    "tenant_requests_per_minute": "interactive requests one tenant may make per minute, a token bucket holding a "
                                  "minute's worth; more are answered 429 with Retry-After (0: no limit; batch "
                                  "lines are exempt)",
    "tenant_tokens_per_minute": "prompt and output tokens one tenant's interactive requests may use per minute; "
                                "once used up, its next requests are answered 429 until the bucket refills "
                                "(0: no limit)",
    "tenant_rate_limits_file": "JSON file of tenants' own limits where they differ from the two above, e.g. "
                               "{\"tenant-a\": {\"requests_per_minute\": 600, \"tokens_per_minute\": 200000}}",
    "rate_limit_redis_url": "router: keep tenants' rate limits in this Redis (redis://host:6379/0, rediss://, "
                            "unix://), so every router replica draws on one allowance; if it cannot be reached, "
                            "each router uses its own buckets meanwhile (pip install 'loragate[redis]')",
    "tenant_priorities": "each tenant's most urgent scheduling priority, e.g. 'gold=-1,free=1' (lower runs first, "
                         "and preempts less urgent requests when the KV cache is full; tenants not named: 0); a "
                         "request's 'priority' can only make it less urgent than its tenant's",
    "max_adapters_per_tenant": "adapters one tenant may store; uploading another is answered 403 (0: no limit)",
    "max_upload_size": "largest adapter upload, e.g. 512MiB",
    "served_model_name": "name clients use for the base model (default: the model's name); several, comma-"
                         "separated, make the others aliases: 'assistant,gpt-4o-mini'",
    "lora_modules": "adapters to store at start-up from directories on this machine, as vLLM's --lora-modules: "
                    "one or more '[tenant/]name=path' (comma-separated too) or '{\"name\": ..., \"path\": ..., "
                    "\"base_model_name\": ...}'; each a PEFT output directory, validated as an upload; the "
                    "tenant is required with API keys; a restart with the same files adds no version",
    "allow_runtime_lora_updating": "vLLM's runtime LoRA API: POST /v1/load_lora_adapter {\"lora_name\": "
                                   "\"[tenant/]name\", \"lora_path\": \"/dir\"} stores a PEFT directory on this "
                                   "machine as an adapter (validated as an upload), /v1/unload_lora_adapter "
                                   "{\"lora_name\"} deletes it; with API keys only the admin key may call them",
    "strict_base_model": "refuse adapters whose base_model_name_or_path names another model",
    "shared_adapters_tenant": "a tenant whose adapters every tenant may use, as model '<tenant>/<name>' (e.g. "
                              "'public/sql'; listed in everyone's /v1/models); only its own keys and the admin key "
                              "upload, replace or delete them",
    "pooler_config": "how /v1/embeddings pools the prompt's final hidden states, as vLLM's JSON: "
                     "{\"pooling_type\": \"LAST\" | \"CLS\" (the first token) | \"MEAN\" | \"MAX\", "
                     "\"normalize\": true | false} (default: the model's sentence-transformers pooling config, "
                     "else LAST; normalized; a request's own \"normalize\" wins)",
    "reasoning_parser": "chat answers of reasoning models (Qwen3, DeepSeek-R1, ...): the <think> ... </think> "
                        "section goes to the message's 'reasoning' and 'reasoning_content', the rest to 'content'. "
                        "auto: for models whose chat template writes those markers; think: always (the model must "
                        "have them); none: the text as generated",
    "adapter_store": "where adapters are stored: local ($LORAGATE_HOME/adapters) or s3 (a bucket shared by "
                     "every engine; credentials and region from the standard AWS_* variables)",
    "s3_bucket": "s3 store: bucket name (must exist; checked at start-up)",
    "s3_prefix": "s3 store: key prefix under which adapters are kept",
    "s3_endpoint_url": "s3 store: endpoint of an S3-compatible service, e.g. http://minio:9000 (unset: AWS)",
    "adapter_cache_size": "s3 store: local cache of downloaded adapters ($LORAGATE_HOME/adapter-cache); least "
                          "recently used versions are removed beyond this, e.g. 20GiB",
    "adapter_refresh_interval": "seconds between checks of the store for adapters uploaded, replaced or deleted "
                                "through other servers",
    "role": "all: one process serving everything; engine: the same server, behind a router; "
            "router: no model, proxies the API to engines by adapter affinity",
    "engine_urls": "router: engine base URLs, comma-separated (e.g. http://10.0.0.5:8000,http://10.0.0.6:8000)",
    "engine_dns": "router: 'name:port' whose every A/AAAA record is an engine (a Kubernetes headless Service)",
    "discovery_interval": "router: seconds between re-resolutions of --engine-dns",
    "health_interval": "router: seconds between GET /readyz checks of each engine",
    "max_engine_load": "router: most requests open on one engine; beyond it, its adapters spill to their next engine",
    "route_policy": "router: affinity (rendezvous hashing on the adapter) or round_robin (a baseline)",
    "prefix_routing": "router: where an adapter has several engines (the base model, a hot adapter), send a "
                      "request to the one that last ran the start of its prompt (a conversation's earlier turns: "
                      "its prefix cache), unless that one has a quarter of max_engine_load more requests open "
                      "than the least loaded",
    "engine_timeout": "router: seconds to wait for an engine's next response bytes",
    "audit_log": "append a JSON line for every adapter upload, replacement, delete and runtime load/unload "
                 "(who, which adapter, version and sha256, from where, ok or refused and why) to this file "
                 "(created mode 0600, each line fsynced), or '-' for stderr",
    "enable_per_request_metrics": "answers carry their own timings as vLLM's flag does: \"metrics\" with "
                                  "time_to_first_token_ms, generation_time_ms, queue_time_ms, mean_itl_ms and "
                                  "tokens_per_second (null for n > 1 or several prompts; a stream's usage chunk)",
    "otlp_traces_endpoint": "send OpenTelemetry traces of inference requests (a span each: tokens, latencies, "
                            "tenant, adapter; the router's span is the engine's parent) to this OTLP collector: "
                            "http://otel-collector:4318/v1/traces over HTTP, grpc://otel-collector:4317 over gRPC "
                            "(or OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc); the OTEL_* variables apply "
                            "(pip install 'loragate[tracing]')",
    "batch_max_concurrency": "batch API: engine requests batch lines may have in flight at once "
                             "(interactive requests go first)",
    "batch_max_lines": "batch API: most request lines in one input file",
    "response_retention_days": "Responses API: days a completed response stays stored for previous_response_id and "
                               "GET /v1/responses/{id} (0: none is stored)",
    "response_store_max_bytes_per_tenant": "Responses API: most bytes one tenant's stored responses may hold, e.g. "
                                           "512MiB; beyond it the tenant's oldest are deleted (0: no limit)",
}


def cmd_serve(args) -> int:
    from .server import serve
    from .settings import GatewaySettings

    return serve(_engine_config(args), dataclass_from_args(GatewaySettings, args))


def build_parser() -> argparse.ArgumentParser:
    from loragate.engine import EngineConfig

    parser = argparse.ArgumentParser(prog="loragate", description="Multi-LoRA LLM serving: models and generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="list or prepare the bundled models").add_subparsers(
        dest="models_command", required=True, metavar="ACTION")
    lst = models.add_parser("list", help="the bundled models and whether they are prepared")
    lst.set_defaults(func=cmd_models_list)
    prep = models.add_parser("prepare", help="verify a bundled model's weights package and convert it once "
                                             "into $LORAGATE_HOME/models (idempotent)")
    prep.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="model name (default: %(default)s)")
    prep.add_argument("--quiet", action="store_true", help="no progress output")
    prep.set_defaults(func=cmd_models_prepare)

    srv = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                         description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/responses, "
                                     "/v1/models, /v1/files, /v1/batches), adapter management (/v1/adapters) and the "
                                     "tokenizer (/tokenize, /detokenize, /tokenizer_info) over HTTP.")
    from .settings import GatewaySettings

    add_dataclass_flags(srv.add_argument_group("server"), GatewaySettings, GATEWAY_HELP)
    add_dataclass_flags(srv.add_argument_group("engine"), EngineConfig, ENGINE_HELP)
    srv.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate text from a prompt (argument, stdin, or interactive)",
                         description="Generate text with the engine. The prompt comes from --prompt, else from "
                                     "stdin, else interactively; output streams to stdout.")
    gen.add_argument("--prompt", help="prompt text; without it, read stdin or prompt interactively")
    gen.add_argument("--chat", dest="chat", action="store_true", default=None,
                     help="wrap the prompt in the model's chat template (default: when the model has one)")
    gen.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as plain text")
    gen.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--min-p", type=float, default=0.0,
                     help="sample among tokens at least this fraction as likely as the most likely one (0: all)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="divide the logits of tokens already seen (prompt and output) by this (default: %(default)s)")
    gen.add_argument("--json", action="store_true", help="the output is a JSON object")
    gen.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this JSON schema file")
    gen.add_argument("--prediction", metavar="FILE",
                     help="a file the output is expected to be much like (the file an edit rewrites): its text is "
                          "verified as proposed tokens, so the output is the same, in fewer steps")
    gen.add_argument("--suffix", metavar="TEXT",
                     help="fill in the middle: generate what goes between the prompt and this text, in the "
                          "model's FIM format (code models such as Qwen2.5-Coder; e.g. --suffix \"$(cat after.py)\")")
    gen.add_argument("--adapter", action="append", metavar="NAME=PATH",
                     help="load a PEFT LoRA adapter directory under NAME (repeatable)")
    gen.add_argument("--use-adapter", metavar="NAME", help="generate with this loaded adapter")
    gen.add_argument("--quiet", action="store_true", help="no start-up output")
    add_dataclass_flags(gen.add_argument_group("engine"), EngineConfig, ENGINE_HELP)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="loragate: %(message)s")
    args = build_parser().parse_args(argv)
    from loragate.adapters.errors import AdapterError
    from loragate.engine.errors import InvalidRequestError, ModelConfigError
    from loragate.engine.models.prepare import ModelPrepareError

    try:
        return args.func(args)
    except (InvalidRequestError, ModelConfigError, ModelPrepareError, AdapterError) as e:
        print(f"loragate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
