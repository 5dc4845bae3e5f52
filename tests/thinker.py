"""A tiny "reasoning model": the tiny Llama with `<think>` and `</think>` in its vocabulary, a
chat template that writes them (Qwen3's `enable_thinking: false` empty section, or a section
left open as DeepSeek-R1's template does), and its output head rearranged so that greedy
decoding of THOUGHT_MESSAGES opens a section at once and closes it a few tokens later."""

from __future__ import annotations

import shutil

import torch

START, END = 510, 511  # token ids of <think> and </think>
THOUGHT_MESSAGES = [{"role": "user", "content": "t10 t11 t12"}]
TEMPLATE = ("{% for m in messages %}{{ 't3' if m['role'] == 'user' else 't4' }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}t5"
            "{% if enable_thinking is defined and not enable_thinking %} <think> </think>"
            "{% elif open_section is defined and open_section %} <think>{% endif %}{% endif %}")


def thinker_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .conftest import TINY_VOCAB

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, START)} | {"<think>": START,
                                                                                        "</think>": END}
    assert len(vocab) == TINY_VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Words split at spaces and at each "t<digits>", so decoded text ("t7t8", a ByteLevel decoder's
    # joining, which llguidance can read) encodes back to the same ids.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"t\d+"), behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    fast.chat_template = TEMPLATE
    return fast


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def write_thinker(tiny_llama, path) -> int:
    """Writes the model to `path`; returns where in its greedy answer to THOUGHT_MESSAGES the
    section closes (the index of </think>)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    tok = thinker_tokenizer()
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = tok.apply_chat_template(THOUGHT_MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    head = model.lm_head.weight

    def swap(a: int, b: int) -> None:  # token a's logit becomes b's and back: where a was chosen, b now is
        with torch.no_grad():
            head[[a, b]] = head[[b, a]]

    swap(greedy(model, prompt, 1)[0], START)
    answer = greedy(model, prompt, 12)
    close = next(j for j in range(3, 12) if answer[j] not in answer[:j] and answer[j] not in (START, END, 2))
    swap(answer[close], END)
    answer = greedy(model, prompt, 16)
    assert answer[0] == START and answer[close] == END and END not in answer[:close], answer
    model.save_pretrained(path)
    return close
