"""One module per CLI noun or verb; ``microlora.cli`` registers them."""
