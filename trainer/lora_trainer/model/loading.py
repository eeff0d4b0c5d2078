"""Resolving the pinned base model to local files, loading it (quantized or not) and adding LoRA.

A base is only used when its files match `spec.baseModel.revision`: a hub commit hash for hf://,
otherwise `sha256:<hex>` as printed by `lora-trainer fingerprint` (storage.fingerprint_dir).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..io import storage
from . import attention

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RevisionError(ValueError):
    """The base model is not pinned, or its files do not match the pinned revision."""


def check_pinned(uri: str, revision: str) -> None:
    if uri.startswith("hf://"):
        if not COMMIT_RE.match(revision):
            raise RevisionError(f"base model {uri} is not pinned: revision must be a 40-hex commit "
                                f"hash, got {revision!r}")
    elif not SHA256_RE.match(revision):
        raise RevisionError(f"base model {uri} is not pinned: revision must be sha256:<64 hex> "
                            f"(see `lora-trainer fingerprint`), got {revision!r}")


def resolve_base(uri: str, revision: str, work_dir: Path, **store_kw) -> Path:
    """Local directory holding the base model files, verified against `revision`."""
    check_pinned(uri, revision)
    if uri.startswith("hf://"):
        return _from_hub(uri, revision, work_dir)
    store, key = storage.open_uri(uri, **store_kw)
    local = store.local_path(key)  # file:// and pvc:// are read in place
    if local is not None:
        if not local.is_dir():
            raise FileNotFoundError(f"base model {uri}: no directory at {local}")
    else:
        local = Path(work_dir) / "base"
        if local.exists():
            import shutil

            shutil.rmtree(local)
        storage.download_prefix(store, key, local)
    actual = storage.fingerprint_dir(local)
    if actual != revision:
        raise RevisionError(f"base model {uri} does not match its pinned revision: expected "
                            f"{revision}, files hash to {actual}")
    return local


def _from_hub(uri: str, revision: str, work_dir: Path) -> Path:
    parsed = urlparse(uri)
    repo_id = f"{parsed.netloc}{parsed.path}".strip("/")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(Path(work_dir) / "hf")))
    except Exception as exc:
        raise RevisionError(f"cannot fetch {uri}@{revision} from the Hugging Face hub "
                            f"({type(exc).__name__}); mirror it to s3:// or a PVC and pin its "
                            f"sha256 fingerprint instead") from None


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _quant_config(quantization: str, double_quant: bool, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def attn_implementation(path: Path, requested: str = "auto") -> str:
    """`requested`, or for auto: sdpa where the architecture supports it (Gemma-2 does not), else eager."""
    if requested != "auto":
        return requested
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(path))
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return "eager"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def gradient_checkpointing(requested: bool | None, quantization: str) -> bool:
    """The spec's choice; by default on for quantized bases (the memory-bound QLoRA case)."""
    return requested if requested is not None else quantization != "none"


def keep_4bit_weights_trainable(model) -> int:
    """Turn off bitsandbytes' CPU inference repacking of NF4 weights; returns the layers changed.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weights for an inference
    kernel on the first no-grad eval forward and keeps them repacked when training resumes; that
    kernel has no autograd, so LoRA gradients after an in-loop evaluation are wrong, and each save
    rounds the scales to bf16. Training needs the weights in their trainable layout.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base(path: Path, quantization: str, double_quant: bool, compute_dtype: str, device, *,
              attn: str = "auto", checkpointing: bool = False):
    """The base model with frozen weights, ready for k-bit training when quantized.

    Gradient checkpointing is non-reentrant: it works with frozen inputs and inside DDP without
    `enable_input_require_grads` tricks.
    """
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[compute_dtype]
    qconf = _quant_config(quantization, double_quant, dtype)
    impl = attn_implementation(path, attn)
    if impl == "sdpa":  # sdpa, with per-example attention for packed rows (model.attention)
        impl = attention.register()
    device_map = {"": device} if qconf is not None else None
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, quantization_config=qconf, device_map=device_map,
        attn_implementation=impl,
    )
    ckpt_kwargs = {"use_reentrant": False}
    if qconf is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_weights_trainable(model)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        model.to(device)
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    model.config.use_cache = False
    return model
