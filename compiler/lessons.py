"""What an atom is taught: its text, the questions about it, and the window its teacher reads.

One place decides, so the compiler's pipeline and its tests agree on what a recipe means:
- ``taught_text``: the atom's sentence, or with ``resolve_pronouns`` the sentence with an
  opening pronoun replaced by the name it refers to (``compiler.decontext``);
- ``lesson_views``: question views of that sentence and, with ``window_views``, of its
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
    if config.subject_context == "lessons" and atom.context:
        views = question_views(resolve_pronoun(atom.context, atom.at), config.qa_views,
                               config.view_style, topic=unnamed_subject(atom.context, atom.at))
    else:
        views = question_views(taught_text(atom, config), config.qa_views, config.view_style)
    if config.window_views and atom.context:
        lo = max(0, atom.at - config.window_views)
        hi = min(len(atom.context), atom.at + config.window_views + 1)
        for j in range(lo, hi):
            if j != atom.at:
                views += question_views(resolve_pronoun(atom.context, j), config.qa_views,
                                        config.view_style)
    return views


def teacher_window(atom: Atom, config: TrainConfig, tokenizer) -> str:
    """The atom's sentence and its paragraph around it, ``distill_window`` of the tokenizer's
    tokens at most."""
    if not atom.context:
        return atom.text
    return " ".join(window(atom.context, atom.at, config.distill_window,
                           functools.partial(count_tokens, tokenizer)))
