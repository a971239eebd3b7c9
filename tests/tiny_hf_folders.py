"""Tiny random Hugging Face model folders of three families (Llama, GPT-2, GPT-NeoX) for tests that
compare workbench against the plain Hugging Face modules. Final norms get a random gain (and bias
where the norm has one): the built-in tiny-random has an all-ones gain, which would hide a missing
fold. Each folder carries the minilm WordPiece tokenizer (vocab 30522), as tiny-random does."""

from pathlib import Path

import torch

VOCAB = 30522


def _randomise_final_norm(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = model.base_model
    norm = next(getattr(base, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(base, n))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 2.5 - 0.5)   # some gains negative
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))


def make_folder(family: str, out: Path, seed: int = 0) -> Path:
    """Write a tiny `family` ("llama" | "gpt2" | "gpt_neox") causal LM into `out`; returns it."""
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaForCausalLM)

    from workbench._specs import _parse_tiny, _source_folder, minilm_dir
    out = Path(out)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM.from_pretrained(str(_source_folder("tiny", _parse_tiny("tiny-random"))))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=101, eos_token_id=102))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=VOCAB,
                                                 max_position_embeddings=64, bos_token_id=101, eos_token_id=102))
    else:
        raise ValueError(family)
    _randomise_final_norm(model, seed + 1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(out)
    return out
