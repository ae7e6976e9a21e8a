"""Chat templates of several families, and a tiny random chat model whose greedy replies are plain words
(so they print cleanly in a terminal and re-tokenize to the very tokens generated)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from conftest import write_tokenizer
from sp_tokenizer import write_spm_tokenizer

# SmolLM2 / Qwen2 style: ChatML, with a default system message when none is given.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3 style: bos_token from the tokenizer config, content trimmed.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama 2 style: system folded into the first user turn, alternation enforced with raise_exception.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Phi-3 / Mistral-like, written with whitespace control and a namespace, as newer templates are.
NAMESPACED = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if ns.system %}<|system|>\n{{ ns.system }}<|end|>\n{% endif -%}"
    "{%- for m in messages if m.role != 'system' -%}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif -%}"
)
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "llama2": [],
    "namespaced": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "llama2": LLAMA2, "namespaced": NAMESPACED}

TURNS = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris. 🇫🇷"},
    {"role": "user", "content": "And of Japan? 東京かな"},
    {"role": "assistant", "content": "  Tokyo, yes — 東京.  "},
    {"role": "user", "content": "Zürich then?"},
]
SYSTEM = {"role": "system", "content": "You are terse. Réponds en français si possible."}


def add_special_tokens(directory: Path, tokens: list[str]) -> None:
    """Adds chat tokens to a saved tokenizer.json, as real chat models have them."""
    from tokenizers import AddedToken, Tokenizer

    if not tokens:
        return
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save(str(directory / "tokenizer.json"))


def write_chat_tokenizer(directory: Path, kind: str, template: str, spm: bool = False) -> None:
    if spm:
        write_spm_tokenizer(directory, chat_template=template)
    else:
        write_tokenizer(directory, chat_template=template)
    add_special_tokens(directory, TEMPLATE_TOKENS[kind])



WORDS = ("the capital of france is paris and italy rome japan tokyo city river mountain small large "
         "question answer hello there thank you please tell me more about this that what where when why how "
         "good bad new old first last long short north south east west ocean island bridge garden house "
         "story night morning light storm keeper ship harbor music song book letter friend family").split()


def write_word_tokenizer(directory: Path, chat_template: str) -> Any:
    """Byte-level BPE trained on word salad (about 560 tokens, many of them whole " word"s), with the
    ChatML tokens <|im_start|> and <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(300)]
    corpus += ["Zürich, São Paulo, Kraków — 東京 and 北京; emoji 🙂🚀 too."] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": chat_template}))
    add_special_tokens(directory, TEMPLATE_TOKENS["chatml"])
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def word_tokens(tok: Any) -> list[int]:
    """Ids of the tokens that are a space and a word, and encode back to themselves: any sequence of them
    decodes to plain text that tokenizes to the same ids."""
    out = []
    for i in range(tok.get_vocab_size()):
        s = tok.decode([i])
        if len(s) > 1 and s[0] == " " and s[1:].isalpha() and tok.encode(s, add_special_tokens=False).ids == [i]:
            out.append(i)
    return out


def make_word_chat_model(make_llama: Callable[..., Any], seed: int = 8, **overrides: Any) -> Path:
    """A tiny random Llama with the word tokenizer and ChatML, whose LM head gives every token that is not
    a whole word a zero logit: greedy decoding (the largest of ~95 random logits is positive) only ever
    says words. <|im_end|> ends a turn."""
    import torch

    overrides.setdefault("max_position_embeddings", 2048)
    directory, hf_model = make_llama(seed=seed, vocab_size=576, **overrides)
    tok = write_word_tokenizer(directory, CHATML)
    allowed = torch.zeros(576, dtype=torch.bool)
    allowed[word_tokens(tok)] = True
    with torch.no_grad():
        hf_model.lm_head.weight[~allowed] = 0.0
    hf_model.save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|im_end|>")}))
    return directory
