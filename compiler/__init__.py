"""The compiler: documents -> knowledge atoms -> batched rank-1/2 adapters -> the store.

Not built yet: it is the subject of the issue "Compiler: documents -> knowledge atoms ->
batched rank-1/2 adapters that compose". It will train through ``microlora.lora``'s
multi-adapter kernel and write through ``store``; it never imports ``composer``.
"""
