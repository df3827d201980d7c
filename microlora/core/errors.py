"""Errors a user can act on.

Library code raises these; the CLI turns them into ``click.ClickException`` so the user sees
one clear line and a non-zero exit code instead of a traceback.
"""


class MicroloraError(Exception):
    """Base class: something the user can fix (bad input, wrong store, wrong model)."""


class ModelLoadError(MicroloraError):
    """A base model or embedder could not be found or loaded."""


class TargetError(MicroloraError):
    """The target-module selection matched nothing, or something that is not a linear layer."""


class AdapterError(MicroloraError):
    """Adapter tensors do not fit the layers they are applied to."""


class StoreError(MicroloraError):
    """The store is missing, corrupt, of another format version, or misused."""


class StoreMismatchError(StoreError):
    """The store was compiled for another base model (or embedder)."""


class CorruptAtomError(StoreError):
    """One atom's record fails its checksum or does not decode (``problem``: how). It names
    the atom, so a reader can leave that one out and go on with the rest."""

    def __init__(self, message: str = "", *, namespace: str = "", atom_id: str = "",
                 problem: str = ""):
        super().__init__(message)
        self.namespace, self.atom_id, self.problem = namespace, atom_id, problem


class UnknownNamespaceError(StoreError):
    """A namespace that the store does not hold (``namespace``: which, when known)."""

    def __init__(self, message: str = "", *, namespace: str | None = None):
        super().__init__(message)
        self.namespace = namespace


class UnknownDocumentError(StoreError):
    """A document id that the namespace does not hold."""


class TooFewAtomsError(MicroloraError):
    """A question asks for more atoms (``k``) than the namespaces searched hold (``total``,
    0 when they are empty). The numbers travel with it, so a server can word it its own way."""

    def __init__(self, message: str = "", *, k: int = 0, total: int = 0):
        super().__init__(message)
        self.k, self.total = k, total


class QuotaExceededError(StoreError):
    """A compile would take a namespace past its atom or byte quota."""
