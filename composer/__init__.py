"""The composer: question -> retrieved atoms (FAISS) -> their adapters composed into the
frozen base model for this request (stacked or merged) -> answer."""

from composer.composer import Answer, AskConfig, Composer, Source
from composer.prompts import Mode
from composer.retrieval import Hit, retrieve

__all__ = ["Answer", "AskConfig", "Composer", "Hit", "Mode", "Source", "retrieve"]
