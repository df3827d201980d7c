"""What an atom is taught: its text, the questions about it, and the window its teacher reads.

One place decides, so the compiler's pipeline and its tests agree on what a recipe means:
- ``taught_text``: the atom's sentence, or with ``resolve_pronouns`` the sentence with an
  opening pronoun replaced by the name it refers to (``compiler.decontext``);
- ``lesson_views``: question views of that sentence (of each of its sentences, for an atom of
  several: ``ChunkConfig.sentences``) and, with ``window_views``, of its
  paragraph neighbours' (pronouns resolved), so the atom also answers for its neighbours;
- ``teacher_window``: the paragraph around it that the distilling teacher reads;
- ``embedded_text``: what its retrieval vector is computed from.

``subject_context`` puts the paragraph's subject before a sentence that does not name it
(``compiler.decontext.about``): in its embedding only ("embedding"), or in what it is taught
as well ("lessons").
"""

from __future__ import annotations

import functools

from compiler.chunking import Atom
from compiler.decontext import about, resolve_pronoun, unnamed_subject
from compiler.views import question_views
from microlora.core.config import TrainConfig
from microlora.core.windows import count_tokens, window


def taught_text(atom: Atom, config: TrainConfig) -> str:
    """What an atom is trained as."""
    if config.subject_context == "lessons" and atom.context:
        return about(atom.context, atom.at)
    if config.resolve_pronouns and atom.context:
        return resolve_pronoun(atom.context, atom.at)
    return atom.text


def embedded_text(atom: Atom, config: TrainConfig) -> str:
    """What an atom is retrieved by: its taught text, or its sentence with its subject."""
    if config.subject_context == "embedding" and atom.context:
        return about(atom.context, atom.at)
    return taught_text(atom, config)


def lesson_views(atom: Atom, config: TrainConfig) -> list[tuple[str, str]]:
    """(question prompt, answer) pairs the atom's adapter is trained on besides its text."""
    topic = ""
    if config.subject_context == "lessons" and atom.context:
        text = resolve_pronoun(atom.context, atom.at)
        topic = unnamed_subject(atom.context, atom.at)
    else:
        text = taught_text(atom, config)
    views = [view for sentence in _sentences(text, atom)
             for view in question_views(sentence, config.qa_views, config.view_style, topic)]
    if config.window_views and atom.context:
        lo = max(0, atom.at - config.window_views)
        hi = min(len(atom.context), atom.at + config.window_views + 1)
        for j in range(lo, hi):
            if j != atom.at:
                views += question_views(resolve_pronoun(atom.context, j), config.qa_views,
                                        config.view_style)
    return views


def _sentences(text: str, atom: Atom) -> list[str]:
    """The sentences of ``text``: the atom's own text, or it with its opening rewritten (a
    pronoun resolved), which moves every sentence after the first by the same amount."""
    if not atom.parts:
        return [text]
    shift = len(text) - len(atom.text)
    return [text[(start + shift) if i else 0:end + shift]
            for i, (start, end) in enumerate(atom.parts)]


def teacher_window(atom: Atom, config: TrainConfig, tokenizer) -> str:
    """The atom's sentence and its paragraph around it, ``distill_window`` of the tokenizer's
    tokens at most."""
    if not atom.context:
        return atom.text
    return " ".join(window(atom.context, atom.at, config.distill_window,
                           functools.partial(count_tokens, tokenizer)))
