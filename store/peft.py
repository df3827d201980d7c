"""PEFT's LoRA folder format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What PEFT, vLLM, LoRAX and TGI load. Weights are stored under
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), and PEFT
multiplies B A by ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA; per module with
``rank_pattern`` / ``alpha_pattern``). microlora keeps the scale folded into B, so it writes
``lora_alpha = r`` (scale 1) and folds a foreign adapter's scale into B when reading one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from microlora.core.errors import AdapterError
from microlora.core.pack import Adapter, Packed

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
                  r"(?:\.(?P<name>[^.]+))?\.weight")


@dataclass
class PeftAdapter:
    """A LoRA read from a PEFT folder, its scale folded into B."""

    adapter: Packed
    base_model: str  # base_model_name_or_path, as the folder says (informational)
    config: dict


def write_peft(out_dir: str | Path, adapter: Adapter, *, base_model: str = "",
               fan_in_fan_out: bool = False) -> Path:
    """Write ``adapter`` (delta = B A per module, tensors kept in their dtype) as a PEFT LoRA
    folder. Modules of lower rank are zero-padded to the largest, so one ``r`` describes it."""
    if not adapter:
        raise AdapterError("nothing to export: the adapter has no modules")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise AdapterError(f"{out} is not empty; give a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    rank = max(A.shape[0] for A, _ in adapter.values())
    tensors = {}
    for name, (A, B) in adapter.items():
        pad = rank - A.shape[0]  # zero rows/columns: the same delta
        A = torch.cat([A, A.new_zeros(pad, A.shape[1])]) if pad else A
        B = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1) if pad else B
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
              "target_modules": sorted(adapter), "fan_in_fan_out": fan_in_fan_out,
              "use_rslora": False, "inference_mode": True, "modules_to_save": None}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def read_peft(path: str | Path) -> PeftAdapter:
    """Read a PEFT LoRA folder, with clear errors for anything that is not one."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder (no {CONFIG_FILE})")
    if not weights_file.is_file():
        hint = " (adapter_model.bin is not read: convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise AdapterError(f"{config_file} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} holds a JSON {_JSON_TYPES.get(type(config), 'value')}"
                           ", not an object: it is not a PEFT adapter config")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')!r} adapter; only LORA imports")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path} also trains whole modules ({config['modules_to_save']}), "
                           "which an atom cannot hold")
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise AdapterError(f"{weights_file} is not a readable safetensors file ({e})") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{weights_file} holds {key!r}, which is not a LoRA weight "
                               "(only lora_A / lora_B weights import)")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor.float()
    adapter = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"module {module} has lora_{'A' if 'A' in ab else 'B'} only")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"module {module}: lora_A {tuple(A.shape)} and lora_B "
                               f"{tuple(B.shape)} do not form a LoRA pair")
        B = B * _scale(config_file, config, module, A.shape[0])
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"{path}: module {module} has NaN or inf values (its lora_A, "
                               "or lora_B times its scale); the adapter is broken and is not "
                               "read")
        adapter[module] = (A, B)
    if not adapter:
        raise AdapterError(f"{weights_file} holds no LoRA weights")
    return PeftAdapter(Packed.of(adapter), str(config.get("base_model_name_or_path") or ""),
                       config)


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _scale(config_file: Path, config: dict, module: str, rank: int) -> float:
    """PEFT's scale for one module: alpha / r (alpha / sqrt(r) with rsLoRA), where a
    rank_pattern / alpha_pattern key matching the module's name overrides the default.
    Values that PEFT itself would not accept are refused, naming the field."""
    def pattern(name: str, default):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{config_file}: {name!r} must be an object (module name or "
                               f"regular expression -> value), not {patterns!r}")
        for key, value in patterns.items():
            try:
                if module == key or module.endswith("." + key) or re.fullmatch(key, module):
                    return value, f"{name}[{key!r}]"
            except re.error as e:
                raise AdapterError(f"{config_file}: {name} key {key!r} is not a valid regular "
                                   f"expression ({e})") from None
        return default

    r, r_field = pattern("rank_pattern", (config.get("r", rank), "'r'"))
    alpha, alpha_field = pattern("alpha_pattern", (config.get("lora_alpha", r), "'lora_alpha'"))
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{config_file}: {r_field} is {r!r}; it must be a positive whole "
                           "number (the LoRA rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise AdapterError(f"{config_file}: {alpha_field} is {alpha!r}; it must be a positive "
                           "number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


READER_INFO = "microlora-reader.json"


def write_reader(out_dir: str | Path, adapter: Packed, *, base_fingerprint: str,
                 base_model: str, info: dict) -> Path:
    """A reader adapter (``compiler.reader``): a PEFT folder plus what it was trained for and
    on, so it is never composed into a model it does not belong to."""
    out = write_peft(out_dir, adapter.unpack(), base_model=base_model)
    (out / READER_INFO).write_text(json.dumps({"base_fingerprint": base_fingerprint, **info},
                                              indent=2))
    return out


def read_reader(path: str | Path, base_fingerprint: str) -> tuple[Packed, dict]:
    """(the reader's adapter, its info); refuses a reader made for another base model."""
    path = Path(path)
    try:
        info = json.loads((path / READER_INFO).read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path} is not a microlora reader (no readable {READER_INFO}); "
                           "make one with `microlora reader train`") from e
    if info.get("base_fingerprint") != base_fingerprint:
        raise AdapterError(f"the reader in {path} was trained for base model "
                           f"{str(info.get('base_fingerprint'))[:12]}, not "
                           f"{base_fingerprint[:12]}; train one for this model")
    return read_peft(path).adapter, info
