"""Bring an existing PEFT LoRA into a store as one atom.

The adapter is checked against the store's base model before anything is written: every
module it adapts must exist there as a linear of the same shape (an adapter trained for
another model fails here, by name). Its text is what retrieval matches questions against.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from microlora.core.embedder import Embedder
from microlora.core.errors import AdapterError, MicroloraError
from microlora.core.models import BaseModel
from microlora.core.targets import is_linear, linear_features
from store import AdapterStore, AtomRecord, BatchDocuments
from store.peft import read_peft


def import_peft(path: str | Path, store: AdapterStore, *, base: BaseModel, embedder: Embedder,
                namespace: str, text: str) -> AtomRecord:
    """Read the PEFT folder at ``path``, check it against ``base``, and store it in
    ``namespace`` as an atom described by ``text``; returns the stored record."""
    if not text or not text.strip():
        raise MicroloraError("an imported adapter needs --text: what it knows, in words "
                             "(retrieval matches questions against it)")
    store.check_compatible(base.fingerprint, embedder.fingerprint, base_name=base.name,
                           embedder_name=embedder.name)
    peft = read_peft(path)
    modules = peft.adapter.unpack()
    for name, (A, B) in modules.items():
        try:
            module = base.model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"{path} adapts {name}, which base model {base.name} does not have; it was "
                f"trained for {peft.base_model or 'another model'}") from None
        if not is_linear(module):
            raise AdapterError(f"{path} adapts {name}, which is not a linear layer")
        d_in, d_out = linear_features(module)
        if (A.shape[1], B.shape[0]) != (d_in, d_out):
            raise AdapterError(
                f"{path}: {name} is {A.shape[1]}->{B.shape[0]} in the adapter but {d_in}->"
                f"{d_out} in base model {base.name}; it was trained for "
                f"{peft.base_model or 'another model'}")
    digest = hashlib.sha256(base.fingerprint.encode())
    for name, (A, B) in sorted(modules.items()):
        digest.update(name.encode())
        digest.update(A.numpy().tobytes())
        digest.update(B.numpy().tobytes())
    source = Path(path).name  # its document id, as of a file compiled on its own
    record = AtomRecord(
        id=digest.hexdigest()[:32], text=text.strip(), adapter=peft.adapter,
        embedding=embedder.encode([text.strip()])[0], base_fingerprint=base.fingerprint,
        source=source, config={"imported": "peft", "rank": peft.adapter.rank, "scale": 1.0},
        extra={"peft_base_model": peft.base_model, "peft_r": peft.config.get("r"),
               "peft_lora_alpha": peft.config.get("lora_alpha")})
    store.put(namespace, [record], documents=BatchDocuments({source: [record.id]},
                                                            frozenset([source])))
    return record
