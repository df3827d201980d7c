"""``microlora serve``: the OpenAI-compatible HTTP server with per-user namespaces and API keys.

It lives in the face package because it wires the composer (answers) to the compiler
(``POST /v1/documents``), which must not import each other.
"""
