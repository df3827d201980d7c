"""The composer: question -> retrieved atoms -> composed adapter -> answer.

Not built yet: it is the subject of the issue "Composer: question -> retrieved atoms ->
composed adapter -> answer". It will retrieve through ``store``'s FAISS index and apply
adapters through ``microlora.lora``; it never imports ``compiler``.
"""
