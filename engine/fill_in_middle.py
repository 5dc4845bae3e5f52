"""Fill in the middle (FIM): a completion that must fit between a given prefix and suffix,
as code editors ask for at the cursor (OpenAI's `suffix` on /v1/completions).

Code models are trained on documents rearranged as <prefix marker> prefix <suffix marker>
suffix <middle marker> middle, so the prompt is laid out that way and the model writes the
middle. Each family names its markers differently; the tokenizer's vocabulary says which
(if any) the model knows. The layout is the string the model vendors document, tokenized
as a whole, so it gets exactly the ids their examples feed the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequestError

# (prefix, suffix, middle) markers, in the order they are looked for.
MARKERS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder, CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, SantaCoder, Granite Code
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
)
# Tokens a model trained on these layouts writes when the gap is filled: padding, the end
# of a document, the start of the next file or repository. None can be part of a middle, so
# generation stops at any the vocabulary has (besides the model's own end-of-sequence).
ENDINGS = ("<|endoftext|>", "<|fim_pad|>", "<fim_pad>", "<|file_sep|>", "<file_sep>", "<|file_separator|>",
           "<|repo_name|>", "<repo_name>", "<|EOT|>", "<｜end▁of▁sentence｜>")


@dataclass(frozen=True)
class FimFormat:
    prefix: str
    suffix: str
    middle: str
    stop_token_ids: tuple[int, ...]  # ENDINGS and the markers themselves, as the vocabulary numbers them

    def prompt(self, prefix: str, suffix: str) -> str:
        return f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}"


def _token_id(tokenizer, token: str) -> int | None:
    """The id of `token` where the vocabulary holds it as one token (added or not)."""
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token else None


def fim_format(tokenizer) -> FimFormat | None:
    """The model's fill-in-the-middle markers; None when its vocabulary has no complete set."""
    for markers in MARKERS:
        ids = [_token_id(tokenizer, m) for m in markers]
        if None not in ids:
            endings = (_token_id(tokenizer, t) for t in ENDINGS)
            return FimFormat(*markers, stop_token_ids=tuple(sorted({*ids, *(i for i in endings if i is not None)})))
    return None


def require_fim_format(tokenizer, param: str = "suffix") -> FimFormat:
    fim = fim_format(tokenizer)
    if fim is None:
        sets = ", ".join(" ".join(m) for m in MARKERS)
        raise InvalidRequestError(f"'{param}' needs a model trained to fill in the middle; this model's vocabulary "
                                  f"has none of the marker sets ({sets})", param)
    return fim
