"""Text preprocessing: train a tokenizer on catalog titles, or load a local HF tokenizer dir.

Every step that published evaluations hinge on is explicit here and in config:
lowercasing, the special tokens around a title, truncation side and padding to
`context_length`. The end-of-text token is always the last non-pad token, which is
where the text tower's 'eot' pooling reads.
"""

from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

import ml_collections
import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def train_tokenizer(titles: Iterable[str], *, kind: str = "wordpiece", vocab_size: int = 4096,
                    lowercase: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Trains a WordPiece or BPE tokenizer on titles; returns it as a transformers tokenizer.

    Titles are encoded as `[CLS] title [SEP]`; [PAD] has id 0. The same titles give the same
    vocabulary in every process (see `word_piece_alphabet`).
    """
    titles = list(titles)
    normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if kind == "wordpiece":
        model = models.WordPiece(unk_token="[UNK]")
        continuing = word_piece_alphabet(titles, normalizer, pre_tokenizer)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *continuing])
        decoder = decoders.WordPiece()
    elif kind == "bpe":
        model = models.BPE(unk_token="[UNK]")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
        decoder = decoders.BPEDecoder()
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: wordpiece, bpe")
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(titles, trainer=trainer)
    if kind == "wordpiece":  # the same vocabulary in a tokenizer whose only special tokens are SPECIAL_TOKENS
        tok = tokenizers.Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.decoder = decoder
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
    )


def word_piece_alphabet(titles: Sequence[str], normalizer, pre_tokenizer) -> list[str]:
    """Sorted '##c' for every character c of the normalised, pre-tokenised titles.

    The WordPiece trainer numbers these word-inner pieces in the order it meets them in a
    hash map, and breaks ties between equally frequent merges by those numbers, so two
    processes could learn different vocabularies from the same titles. Given to the trainer
    first (as special tokens, which it numbers in list order), they get fixed numbers and
    every tie is broken the same way.
    """
    chars = set()
    for title in titles:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(title)):
            chars.update(word)
    return [f"##{c}" for c in sorted(chars)]


class TitleTokenizer:
    """Turns titles into fixed-length id arrays, as the config says.

    Attributes:
      hf: the underlying transformers tokenizer.
      context_length: every output row has exactly this many ids.
      pad_id, vocab_size: what the text tower needs to know.
    """

    def __init__(self, hf, *, context_length: int, lowercase: bool = True, truncation: str = "right"):
        if hf.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one in its tokenizer_config.json")
        self.hf = hf
        self.hf.truncation_side = truncation
        self.hf.padding_side = "right"
        self.context_length = context_length
        self.lowercase = lowercase
        self.pad_id = int(hf.pad_token_id)
        self.vocab_size = len(hf)

    def __call__(self, titles: Sequence[str]) -> np.ndarray:
        """titles: N strings -> [N, context_length] int32 ids (truncated, then padded with pad_id)."""
        texts = [t.lower() if self.lowercase else t for t in titles]
        out = self.hf(texts, padding="max_length", truncation=True, max_length=self.context_length,
                      return_attention_mask=False, return_token_type_ids=False)
        return np.asarray(out["input_ids"], dtype=np.int32)

    def save(self, directory: str | pathlib.Path) -> None:
        self.hf.save_pretrained(str(directory))


def load_hf_tokenizer(directory: str | pathlib.Path):
    """Loads a local HF tokenizer directory, never touching the network."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def tokenizer_from_config(config: ml_collections.ConfigDict, train_titles: Iterable[str] | None,
                          workdir_tokenizer: pathlib.Path | None = None) -> TitleTokenizer:
    """The run's tokenizer: a saved one in the workdir, `tokenizer.path`, or one trained on `train_titles`.

    When it is trained or loaded from `tokenizer.path`, it is saved to `workdir_tokenizer`
    so that evaluation of the run never depends on anything outside the workdir.
    """
    t = config.tokenizer
    if workdir_tokenizer is not None and (workdir_tokenizer / "tokenizer_config.json").exists():
        hf = load_hf_tokenizer(workdir_tokenizer)
    elif t.path:
        hf = load_hf_tokenizer(t.path)
    else:
        if train_titles is None:
            raise ValueError("no tokenizer to load and no titles to train one on")
        hf = train_tokenizer(train_titles, kind=t.kind, vocab_size=t.vocab_size, lowercase=t.lowercase)
    tokenizer = TitleTokenizer(hf, context_length=t.context_length, lowercase=t.lowercase, truncation=t.truncation)
    if workdir_tokenizer is not None and not (workdir_tokenizer / "tokenizer_config.json").exists():
        tokenizer.save(workdir_tokenizer)
    return tokenizer
