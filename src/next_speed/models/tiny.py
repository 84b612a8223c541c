"""Tiny random-init stand-ins for the real models, built in seconds with no download.

Used by the unit tests and the `tiny` preset: a sentence-transformers encoder over a small BERT
with a character-level WordPiece vocabulary, and a small Llama-style causal LM with a byte-level
BPE tokenizer trained on the given texts.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

from next_speed.models.hf import quiet_hf


def _char_vocab() -> list[str]:
    chars = string.ascii_letters + string.digits + string.punctuation
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars) + ["##" + c for c in chars]


def build_tiny_encoder(path: str | Path, dim: int = 32, seed: int = 0) -> str:
    """Save a random-init 1-layer BERT sentence encoder (mean pooling) to `path`; return the path."""
    if (Path(path) / "modules.json").is_file():
        return str(path)
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    quiet_hf()

    path = Path(path)
    if (path / "modules.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    tok_dir = path / "_tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(_char_vocab()) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tok_dir / "vocab.txt"), do_lower_case=False)
    cfg = BertConfig(
        vocab_size=len(_char_vocab()),
        hidden_size=dim,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * dim,
        max_position_embeddings=256,
    )
    bert = BertModel(cfg)
    hf_dir = path / "_hf"
    bert.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    word = Transformer(str(hf_dir), max_seq_length=128)
    pool = Pooling(dim, pooling_mode="mean")
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(path))
    return str(path)


def train_tiny_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `texts`, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))
    return fast


def build_tiny_causal_lm(
    path: str | Path, texts: Iterable[str], hidden: int = 32, layers: int = 2, seed: int = 0
) -> str:
    """Save a random-init tiny Llama causal LM with its own tokenizer to `path`; return the path."""
    if (Path(path) / "config.json").is_file():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_hf()

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    tok = train_tiny_tokenizer(texts, path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def build_tiny_seq2seq(path: str | Path, texts: Iterable[str], d_model: int = 32, seed: int = 0) -> str:
    """Save a random-init tiny T5 with its own tokenizer to `path`; return the path."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    tok = train_tiny_tokenizer(texts, path)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    T5ForConditionalGeneration(cfg).save_pretrained(str(path))
    return str(path)
