"""Structured output: a request's tokens constrained to a grammar (a JSON schema, any JSON
object, a regex, a list of choices, a Lark grammar), with llguidance computing each step's
set of allowed tokens.

A request with a grammar gets its own matcher, advanced by every token it emits. Before
sampling, each of the request's logits rows is masked to the tokens the grammar allows there;
a row verifying speculative proposals is masked as if the proposals before it were emitted
(the matcher consumes them, then rolls back), so speculation stays lossless. Once the grammar
is complete it allows only EOS, and the request ends there.

A draft model drafts within the grammar too: each drafted token is drawn from the draft's
logits masked the same way (the matcher consumes the drafts, then rolls back), so its
proposals follow the format's exact spelling instead of the one the draft would guess. Any
proposal is cut at the first token the grammar refuses, which verification would reject.

Where the grammar leaves no choice for several tokens (a schema's keys and punctuation), the
engine proposes them as speculative tokens when the speculator (if any) proposed nothing for
the request (jump-forward decoding): verified like any proposal, so nothing changes but the
number of steps.
"""

from __future__ import annotations

import json
import threading

import torch

from loragate.kernels.sampling import apply_token_bitmask, bitmask_to_bool

from .errors import InvalidRequestError

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_from_json_schema(schema: dict | bool | None) -> str:
    """A grammar for the output: JSON valid against `schema`, or (None) any JSON object."""
    import llguidance

    schema = {"type": "object"} if schema is None else schema
    try:
        # One spelling of whitespace (", " and ": ", no newlines): left free, small models
        # often pad with whitespace or loop without ever closing the object.
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise InvalidRequestError(f"the JSON schema is not usable: {e}", "response_format") from None


def grammar_from_regex(pattern: str) -> str:
    """The output matches `pattern` (Rust regex syntax, anchored at both ends)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(pattern)


def grammar_from_choice(choices: list[str]) -> str:
    """The output is exactly one of `choices`."""
    import llguidance

    # JSON string literals are valid Lark literals, escapes included.
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def grammar_from_lark(grammar: str) -> str:
    """The output is a sentence of this Lark grammar (llguidance's dialect; `start` first)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(grammar)


class GrammarCompiler:
    """The engine's tokenizer in llguidance's form (built once: by the server right after it is
    ready, else on the first grammar) and the matchers made from it."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self._hf_tokenizer, self._vocab_size, self._eos = hf_tokenizer, vocab_size, sorted(eos_token_ids)
        self._tokenizer = None
        self._unusable: str | None = None  # why this tokenizer cannot be used, once known
        self._lock = threading.Lock()

    def _ll_tokenizer(self):
        with self._lock:
            if self._tokenizer is None and self._unusable is None:
                import llguidance.hf

                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size,
                                                                   eos_token=self._eos)
                except ValueError as e:
                    self._unusable = str(e)
        if self._unusable is not None:
            raise InvalidRequestError("structured output is not available for this model's tokenizer "
                                      f"({self._unusable})", "response_format")
        return self._tokenizer

    def warm(self) -> None:
        """Build the grammar tokenizer now (about 0.4 s for a 49k vocabulary, 1.4 s for
        151k); a tokenizer llguidance cannot read is noted, for requests to be told."""
        try:
            self._ll_tokenizer()
        except InvalidRequestError:
            pass

    def constraint(self, grammar: str) -> GrammarConstraint:
        import llguidance

        tokenizer = self._ll_tokenizer()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidRequestError(f"the output format is invalid: {error}", "response_format")
        constraint = GrammarConstraint(llguidance.LLMatcher(tokenizer, grammar, log_level=0), self._vocab_size,
                                       self._eos)
        if not constraint.allowed().any():
            raise InvalidRequestError("no token of this model's vocabulary can start the requested format",
                                      "response_format")
        return constraint


class GrammarConstraint:
    """One request's grammar state: token bitmasks for its next rows, advanced by emitted tokens."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: list[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.words = (vocab_size + 31) // 32
        self._drafted = 0  # draft tokens consumed by the matcher, undone after drafting

    def _fill(self, bitmask: torch.Tensor) -> None:
        """bitmask [words] int32 (contiguous): the tokens allowed next."""
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), self.words * 4)
        if not bool(bitmask.any()):  # a state the vocabulary cannot continue: let EOS end the request
            for token in self.eos_token_ids:
                word = (int(bitmask[token >> 5]) | 1 << (token & 31)) & 0xFFFFFFFF
                bitmask[token >> 5] = word - (1 << 32) if word >= 1 << 31 else word

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens the grammar allows next."""
        bitmask = torch.zeros(self.words, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), self.words * 4)
        return bitmask_to_bool(bitmask, self.vocab_size)

    def bitmasks(self, proposals: list[int]) -> torch.Tensor:
        """[1 + k, words] int32: row j allows the tokens the grammar allows after the first j
        of the k proposals. Past a proposal the grammar refuses, rows repeat that position's
        mask: verification rejects that proposal, so they are never used."""
        out = torch.empty(len(proposals) + 1, self.words, dtype=torch.int32)
        valid = self.matcher.validate_tokens(proposals) if proposals else 0
        self._fill(out[0])
        consumed = 0
        for j in range(1, len(out)):
            # A complete grammar allows only EOS, which ends the request: nothing to consume
            # (and llguidance's rollback over an EOS loses the matcher's stopped state).
            if j <= valid and not self.matcher.is_stopped():
                self.matcher.consume_token(proposals[j - 1])
                consumed += 1
                self._fill(out[j])
            else:
                out[j] = out[j - 1]
        if consumed:
            self.matcher.rollback(consumed)
        return out

    def valid_prefix(self, proposals: list[int]) -> int:
        """How many of the proposals, in order, the grammar accepts from here."""
        return self.matcher.validate_tokens(proposals) if proposals else 0

    # -- drafting within the grammar ---------------------------------------------------------

    def mask_draft_logits(self, logits: torch.Tensor) -> bool:
        """In place: a draft's fp32 logits row [V] keeps only the tokens the grammar allows after
        the drafts so far. A draft head over part of the vocabulary may have none of them;
        if the grammar allows just one token, that one is drafted (the row is 0 there), else
        False: the draft cannot propose anything."""
        bitmask = torch.empty(1, self.words, dtype=torch.int32)
        self._fill(bitmask[0])
        apply_token_bitmask(logits.unsqueeze(0), bitmask)
        if bool(logits.isfinite().any()):
            return True
        allowed = bitmask_to_bool(bitmask[0], self.vocab_size).nonzero()
        if len(allowed) != 1:
            return False
        logits[int(allowed[0])] = 0.0
        return True

    def draft(self, token: int) -> bool:
        """Consume a drafted token (undone by undo_drafts); False when drafting ends with it: an
        EOS or a complete grammar ends the request (and rolling back over an EOS would lose
        the matcher's stopped state)."""
        if token in self.eos_token_ids or self.matcher.is_stopped() or not self.matcher.consume_token(token):
            return False
        self._drafted += 1
        return not self.matcher.is_stopped()

    def undo_drafts(self) -> None:
        if self._drafted:
            self.matcher.rollback(self._drafted)
            self._drafted = 0

    def forced_tokens(self, limit: int) -> list[int]:
        """Tokens the grammar allows nothing but (a key, a quote, a separator), at most
        `limit`: proposals the target verifies in one step, as if speculated."""
        return self.matcher.compute_ff_tokens()[:limit] if not self.matcher.is_stopped() else []

    def advance(self, token: int) -> bool:
        """Consume an emitted token; True once the grammar is complete (only EOS may follow)
        or cannot go on (a state the vocabulary cannot continue, or the matcher's error: a
        token the mask did not allow, which sampling from masked logits cannot draw)."""
        return not self.matcher.consume_token(token) or self.matcher.is_stopped()
