"""The compiler: documents -> knowledge atoms -> batched rank-1/2 adapters -> the store.

It trains through ``microlora.core.kernel``'s multi-adapter kernel and writes through ``store``; it
never imports ``composer``. Entry points: ``compiler.pipeline.compile_corpus`` (paths) and
``compile_documents`` (documents already in memory, e.g. uploaded to the server).
"""
