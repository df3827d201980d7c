"""Whose adapters a store holds: the base model (and its quantization) and the embedder its
header names, checked before anything is composed from it or added to it."""

from __future__ import annotations

from microlora.core.config import quantization
from microlora.core.errors import StoreMismatchError


class Identity:
    """The identity half of ``AdapterStore`` (a mixin over its ``header`` and ``path``)."""

    def check_compatible(self, base_fingerprint: str, embedder_fingerprint: str | None = None,
                         *, base_name: str = "", embedder_name: str = "") -> None:
        """Refuse to mix adapters of one base model (or embedder) with another."""
        h = self.header
        if base_fingerprint != h.base_fingerprint:
            raise StoreMismatchError(
                f"store {self.path} was compiled for base model {h.base_name} "
                f"(fingerprint {h.base_fingerprint[:12]}), but the model in use is "
                f"{base_name or 'another'} (fingerprint {base_fingerprint[:12]}). Pass "
                "--base-model with the store's model, or compile into a new store."
            )
        if embedder_fingerprint is not None and embedder_fingerprint != h.embedder_fingerprint:
            raise StoreMismatchError(
                f"store {self.path} was indexed with embedder {h.embedder_name} (fingerprint "
                f"{h.embedder_fingerprint[:12]}), not {embedder_name or 'this one'} "
                f"({embedder_fingerprint[:12]}). Pass --embedder with the store's embedder."
            )

    def check_base_dtype(self, base_dtype: str | None, *, strict: bool) -> str | None:
        """Compare the quantization of the base in use ("int8", "int4", or None: fp32 or bf16)
        with the one this store's adapters were trained against. ``strict`` (compiling):
        a mismatch raises. Otherwise (answering) it is returned as a warning to show: the
        answers come from another function than the one the adapters were trained on."""
        theirs, ours = self.header.base_dtype, quantization(base_dtype)
        if ours == theirs:
            return None
        stored, used = theirs or "fp32 or bf16", base_dtype or "fp32 or bf16"
        if strict:
            raise StoreMismatchError(
                f"store {self.path} holds adapters trained against a base in {stored}, and "
                f"this base is in {used}: one store never mixes the two. Pass --base-dtype "
                f"{theirs or 'fp32'} (or leave it out: the store's is the default), or "
                "compile into a new store.")
        return (f"store {self.path} was compiled against a base in {stored} but is answered "
                f"with one in {used} (--base-dtype {base_dtype or 'fp32'}); its adapters were "
                f"trained for the other: leave --base-dtype out to use the store's.")
