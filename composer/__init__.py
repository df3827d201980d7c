"""The composer: question -> retrieved atoms (FAISS) -> their adapters composed into the
frozen base model for this request (stacked or merged) -> answer."""

from composer.composer import Answer, Composer, Source
from composer.retrieval import Hit, retrieve
from microlora.core.config import AskConfig, Mode

__all__ = ["Answer", "AskConfig", "Composer", "Hit", "Mode", "Source", "retrieve"]
