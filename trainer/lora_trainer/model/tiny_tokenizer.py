"""A ChatML byte-level BPE tokenizer for tiny models trained from scratch: the test fixtures'
base (tests/tiny.py) and the demo's base (examples/harbor-support/make_base.py).

Real bases bring their own tokenizer; this one lets tests and the demo build a deterministic base in
seconds. It lives in the trainer package, not in tests/ or examples/, so both can import it without
one depending on the other. The same texts and arguments give byte-identical tokenizer files.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PAD, BOS, EOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"


def build_chatml_tokenizer(texts: Iterable[str], vocab_size: int, *, eos_token: str = EOS,
                           model_max_length: Optional[int] = None):
    """Train a byte-level BPE on `texts` and wrap it with the ChatML template and special tokens.

    `eos_token` is either `<|eos|>`, a token of its own (the test fixtures), or `<|im_end|>`, so
    that generation stops at the end of an assistant turn (the demo base).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if eos_token not in (EOS, IM_END):
        raise ValueError(f"eos_token must be {EOS} or {IM_END}, got {eos_token!r}")
    turn_tokens = [t for t in (IM_START, IM_END) if t != eos_token]
    specials = [PAD, BOS, *([EOS] if eos_token == EOS else []), IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # model_max_length only when given: passing None would change tokenizer_config.json.
    limits = {"model_max_length": model_max_length} if model_max_length is not None else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=eos_token,
                                   pad_token=PAD, additional_special_tokens=turn_tokens, **limits)
    fast.chat_template = CHAT_TEMPLATE
    return fast
