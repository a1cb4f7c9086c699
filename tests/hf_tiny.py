"""Tiny random Hugging Face models and tokenizers, saved to a directory and loaded back with
``from_pretrained`` (nothing can be downloaded here): GPT-2 (causal) and BERT (encoder)."""

from __future__ import annotations

from pathlib import Path

from pydoc_data.topics import topics

TEXT = [line for topic in topics.values() for line in topic.splitlines() if line.strip()]


def gpt2_dir(root: Path) -> str:
    """GPT-2, d 32, 2 layers, no dropout, a byte-level BPE of 320 symbols trained on the smoke corpus."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = root / "gpt2-tiny"
    if not (out / "config.json").exists():
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(TEXT, vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                            bos_token="<|endoftext|>", unk_token="<|endoftext|>")
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=512,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # exact gradient comparisons
        GPT2LMHeadModel(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)


def bert_dir(root: Path) -> str:
    """BERT, d 32, 2 layers, no dropout, a WordPiece vocabulary of 400 trained on the smoke corpus."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = root / "bert-tiny"
    if not (out / "config.json").exists():
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(TEXT, vocab_size=400, show_progress=False)
        out.mkdir(parents=True)
        wordpiece.save_model(str(out))
        tokenizer = BertTokenizerFast.from_pretrained(out, do_lower_case=True)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        BertModel(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)


def llama_dir(root: Path) -> str:
    """Llama (rotary positions, RMSNorm, grouped-query attention), d 32, 2 layers, GPT-2's tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = root / "llama-tiny"
    if not (out / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(gpt2_dir(root))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return str(out)
