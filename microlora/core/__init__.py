"""The ground floor: what every stage (store, compiler, composer) and the face may use, and
which imports none of them.

- ``config``: every stage's dataclass config, torch-free (the single source of defaults);
- ``pack``: the one form of an adapter (``Packed``, scale folded in) and ``compose``;
- ``kernel``: the per-sample LoRA wrappers (wrap, set, merge/unmerge, remove);
- ``models``, ``embedder``, ``targets``: loading the base model and embedder, choosing targets;
- ``errors``, ``paths``: errors a user can act on, where the cache lives.
"""
