# ruff: noqa: E501  (chat templates are kept line for line as published)
"""The model-family matrix: tiny random-weight bases of real architectures with their real chat
templates and special tokens.

Each `Family` pairs a transformers architecture (Llama-3.1, Qwen2.5, Qwen3, Mistral v0.3, Gemma-2,
Gemma-3, Phi-3.5) with a locally trained BPE tokenizer carrying that family's special tokens, its
bos/eos/pad choices and its published chat template (tool-calling branches omitted: the trainer
never passes tools). `turn(content)` is what the family's template renders for one assistant
turn from its first trained character on, i.e. what training must put a loss on.

Everything is deterministic and takes well under a second per family on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# --- chat templates (as published with each family's instruct tokenizer) ------------------------

LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# --- families -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    arch: str  # transformers config class name
    template: str
    special: list[str]  # special tokens, in vocabulary order
    bos: str | None
    eos: str
    pad: str | None
    turn: Callable[[str], str]  # the trained text of one assistant turn (its last in the example)
    # The trained text of an opening assistant turn (no user query before it), where it differs.
    opening: Callable[[str], str] | None = None
    byte_level: bool = True  # GPT-style byte-level BPE (Llama-3, Qwen) vs SentencePiece-style
    extra_tokens: list[str] = field(default_factory=list)  # added, not special (Qwen3's <think>)
    system: bool = True  # the template accepts a system message
    assistant_first: bool = True  # the template accepts a conversation opening with the assistant
    rewrites_history: bool = False  # prefixes of a conversation do not render as prefixes
    config: dict = field(default_factory=dict)  # architecture-specific config values
    # Linear layers of one decoder layer, as named in the architecture.
    linear: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FAMILIES = {
    "llama31": Family(
        "llama31", "LlamaConfig", LLAMA31_TEMPLATE,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|finetune_right_pad_id|>", "<|python_tag|>", "<|eom_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
        turn=lambda c: c.strip() + "<|eot_id|>"),
    "qwen25": Family(
        "qwen25", "Qwen2Config", QWEN25_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        turn=lambda c: c + "<|im_end|>\n"),
    "qwen3": Family(
        "qwen3", "Qwen3Config", QWEN3_TEMPLATE,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        turn=lambda c: "<think>\n\n</think>\n\n" + c + "<|im_end|>\n",
        opening=lambda c: c + "<|im_end|>\n",  # no user query before it: no thinking block
        extra_tokens=["<think>", "</think>"], rewrites_history=True),
    "mistral": Family(
        "mistral", "MistralConfig", MISTRAL_V03_TEMPLATE,
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>", eos="</s>", pad=None, byte_level=False,
        turn=lambda c: " " + c.strip() + "</s>", assistant_first=False,
        config={"sliding_window": None}),
    "gemma2": Family(
        "gemma2", "Gemma2Config", GEMMA2_TEMPLATE,
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", pad="<pad>", byte_level=False,
        turn=lambda c: c.strip() + "<end_of_turn>\n", system=False, assistant_first=False,
        config={"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16,
                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    "gemma3": Family(
        "gemma3", "Gemma3TextConfig", GEMMA3_TEMPLATE,
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", pad="<pad>", byte_level=False,
        turn=lambda c: c.strip() + "<end_of_turn>\n", assistant_first=False,
        config={"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16}),
    "phi35": Family(
        "phi35", "Phi3Config", PHI35_TEMPLATE,
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", byte_level=False,
        turn=lambda c: c + "<|end|>\n<|endoftext|>", rewrites_history=True,
        linear=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
}

# Conversation shapes of the matrix; the roles, in order.
SHAPES = {
    "single": ["user", "assistant"],
    "system": ["system", "user", "assistant"],
    "multi": ["user", "assistant", "user", "assistant"],
    "multi-system": ["system", "user", "assistant", "user", "assistant"],
    "assistant-first": ["assistant", "user", "assistant"],
}

_WORDS = ["reset", "badge", "printer", "invoice", "ticket", "server", "order", "laptop", "green", "blue",
          "amber", "done", "status", "please", "thanks", "number", "now", "will", "check", "refund"]


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def conversation(shape: str, seed: int = 0) -> list[dict]:
    """A deterministic conversation of `shape` (see SHAPES); every turn's content is distinct."""
    rng = random.Random(f"{shape}-{seed}")
    out = []
    for k, role in enumerate(SHAPES[shape]):
        content = {"system": "Be brief and exact.", "user": f"Q{k}: " + _sentence(rng, 4)}.get(
            role, f"A{k}: " + _sentence(rng, 5))
        out.append({"role": role, "content": content})
    return out


def conversations(n: int, seed: int = 0, shapes=("single", "system", "multi")) -> list[dict]:
    """`n` records cycling through `shapes` (for training runs)."""
    return [{"messages": conversation(shapes[i % len(shapes)], seed * 1000 + i)} for i in range(n)]


def refuses(family: Family, shape: str) -> bool:
    """Whether the family's template raises on this conversation shape."""
    if "system" in shape and not family.system:
        return True
    return shape == "assistant-first" and not family.assistant_first


# --- building a base ------------------------------------------------------------------------------


def _corpus(family: Family) -> list[str]:
    texts = []
    for seed in range(60):
        for shape in SHAPES:
            texts += [m["content"] for m in conversation(shape, seed)]
    texts += ["Cutting Knowledge Date: December 2023", "Today Date: 26 Jul 2024",
              "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
              "system user assistant model"]
    return texts


def build_tokenizer(family: Family, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: spaces become "▁", byte fallback for anything unseen
        tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in family.special else None,
                                   byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
        alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=family.special + alphabet
                                  if not family.byte_level else family.special,
                                  initial_alphabet=alphabet if family.byte_level else [],
                                  show_progress=False)
    tok.train_from_iterator(_corpus(family), trainer=trainer)
    kw = {"bos_token": family.bos, "eos_token": family.eos, "pad_token": family.pad}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in kw.items() if v},
                                   additional_special_tokens=[t for t in family.special
                                                              if t not in kw.values()])
    if family.extra_tokens:
        fast.add_tokens(family.extra_tokens, special_tokens=False)
    fast.chat_template = family.template
    return fast


def _config(family: Family, tok, hidden: int, layers: int):
    import transformers

    cls = getattr(transformers, family.arch)
    values = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=family.name.startswith("gemma"),
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    values.update(family.config)
    return cls(**values)


def make_family_base(family: Family | str, path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a random-init base of `family` (config, safetensors, tokenizer with template)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    family = FAMILIES[family] if isinstance(family, str) else family
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, tok, hidden, layers))
    model.save_pretrained(path, safe_serialization=True)
    return path


def trained_turns(family: Family, messages: list[dict]) -> list[str]:
    """What training must put a loss on for `messages`: one text per assistant turn."""
    out = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            opening = not any(x["role"] == "user" for x in messages[:k])
            out.append((family.opening if opening and family.opening else family.turn)(m["content"]))
    return out
