"""A small SentencePiece-style tokenizer, laid out like Llama 2's tokenizer.json: BPE over words marked
with "▁", byte fallback (<0x00>..<0xFF>) for anything outside its alphabet, a decoder that turns "▁" back
into spaces and strips the one space the normalizer prepended. Trained here on ASCII text, so accented
letters, CJK and emoji all arrive as byte tokens that split characters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ASCII_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Hello there, how are you today? I am fine, thank you.",
] * 20

SPECIALS = ["<unk>", "<s>", "</s>"]


def build_spm_tokenizer() -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizer
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay in words
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=SPECIALS, show_progress=False)
    trainer_tok.train_from_iterator(ASCII_CORPUS, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def write_spm_tokenizer(directory: Path, chat_template: str | None = None) -> Any:
    tok = build_spm_tokenizer()
    tok.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok
