"""Question views: questions about an atom's own sentence, answered by one of its spans."""

import pytest


def test_question_views_of_a_sentence():
    from compiler.views import question_views

    views = question_views("Madge Blake was born in Kinsley, Kansas in 1899.", 4)
    assert ("Question: Who was born in Kinsley, Kansas in 1899?\nAnswer:", " Madge Blake\n") \
        in views
    assert any(answer == " 1899\n" and "when" in q for q, answer in views)
    assert len(views) == 4 and question_views("no names here at all.", 2) == []
    assert len(question_views("Madge Blake was born in Kinsley, Kansas in 1899.", 2)) == 2


def test_clause_views_ask_with_the_clause_around_the_answer():
    from compiler.views import question_views

    sentence = ("Rajeshwari Sachdev voices Bumblebee , an Autobot scout and Optimus Prime 's "
                "second - in - command , who transforms into a custom - built yellow and black "
                "2016 Chevrolet Camaro .")
    views = dict((a.strip(), q) for q, a in question_views(sentence, 4, "clause"))
    # the clause (grown to a few words), not the whole sentence; " - " does not end a clause
    assert views["Rajeshwari Sachdev"] == ("Question: Who voices Bumblebee , an Autobot scout "
                                           "and Optimus Prime 's second - in - command?\nAnswer:")
    assert "Camaro" not in views["Optimus Prime"] and "Sachdev" not in views["Optimus Prime"]
    # a leading title stays in the question; brackets the cut left unmatched are dropped
    views = dict((a.strip(), q) for q, a in question_views(
        "It was a war , which led President Lauren Lapkus ( a Democrat ) to proclaim it .", 2,
        "clause"))
    assert "led President who" in views["Lauren Lapkus"]
    for question in views.values():
        assert question.count("(") == question.count(")"), question
    # the sentence style is unchanged: stores compiled before the clause style keep their atoms
    assert question_views(sentence, 1) == question_views(sentence, 1, "sentence")
    with pytest.raises(ValueError):
        question_views(sentence, 1, "paragraph")


def test_an_opening_pronoun_is_replaced_by_its_paragraphs_nearest_name():
    from compiler.decontext import resolve_pronoun

    paragraph = ["The astronomer Talia Orven grew up in Lisk.",
                 "She discovered the comet Harrow in 2011.",
                 "Her later work was on dust.",
                 "It was widely cited."]
    assert resolve_pronoun(paragraph, 1) == "Talia Orven discovered the comet Harrow in 2011."
    # a chain: the second sentence's name (resolved first) is the third's antecedent
    assert resolve_pronoun(paragraph, 2) == "Talia Orven's later work was on dust."
    assert resolve_pronoun(paragraph, 3) == "It was widely cited."  # "It" is left alone
    assert resolve_pronoun(paragraph, 0) == paragraph[0]
    assert resolve_pronoun(["She left.", "He stayed."], 1) == "He stayed."  # no name: unchanged
    assert resolve_pronoun(["Shelby Ann Rowe sang.", "Shelby left."], 1) == "Shelby left."


def test_resolve_pronouns_changes_what_is_taught_not_what_is_stored():
    from compiler.chunking import Atom
    from compiler.lessons import taught_text
    from microlora.core.config import TrainConfig

    paragraph = ("Talia Orven grew up in Lisk.", "She discovered a comet in 2011.")
    atom = Atom(paragraph[1], "d.md", 29, 60, context=paragraph, at=1)
    assert taught_text(atom, TrainConfig()) == atom.text
    resolving = TrainConfig(resolve_pronouns=True)
    assert taught_text(atom, resolving) == "Talia Orven discovered a comet in 2011."
    assert resolving.key() != TrainConfig().key()  # other atoms, other ids


def test_window_views_teach_an_atom_its_neighbours_facts_by_name():
    from compiler.chunking import Atom
    from compiler.lessons import lesson_views, teacher_window
    from microlora.core.config import TrainConfig

    paragraph = ("Talia Orven grew up in Lisk.", "She discovered a comet in 2011.",
                 "The comet was named Arvo.", "Nobody saw it again.")
    atom = Atom(paragraph[0], "d.md", 0, 28, context=paragraph, at=0)
    alone = lesson_views(atom, TrainConfig(qa_views=2))
    assert [a for _, a in alone] == [" Talia Orven\n", " Lisk\n"]
    wide = lesson_views(atom, TrainConfig(qa_views=2, window_views=1))
    assert [a for _, a in wide] == [" Talia Orven\n", " Lisk\n", " Talia Orven\n",
                                    " 2011\n"]  # only one place away
    assert "Talia Orven discovered a comet in" in wide[3][0]  # asked by name, not "She"
    def words(text, add_special_tokens=True):  # a tokenizer whose tokens are words
        return {"input_ids": text.split()}

    assert teacher_window(atom, TrainConfig(distill_window=12), words) == \
        "Talia Orven grew up in Lisk. She discovered a comet in 2011."
    assert TrainConfig(window_views=1).key() != TrainConfig().key()
    assert TrainConfig(distill=1.0).key() != TrainConfig().key()


def test_subject_context_names_the_paragraphs_subject_where_a_sentence_does_not():
    from compiler.chunking import Atom
    from compiler.decontext import about
    from compiler.lessons import embedded_text, lesson_views, taught_text
    from microlora.core.config import TrainConfig

    paragraph = ("Talia Orven grew up in Lisk.", "In 1891 she opened a furnace in Carrow.",
                 "Talia Orven died in 1920.")
    assert about(paragraph, 1) == "Talia Orven: In 1891 she opened a furnace in Carrow."
    assert about(paragraph, 2) == paragraph[2]  # it names her already
    assert about(("no names in here at all.",), 0) == "no names in here at all."
    atom = Atom(paragraph[1], "d.md", 29, 68, context=paragraph, at=1)
    # "embedding" (the default): retrieved by the subject, taught as with "off"
    embedding, off = TrainConfig(), TrainConfig(subject_context="off")
    assert embedded_text(atom, embedding) == about(paragraph, 1)
    assert taught_text(atom, embedding) == atom.text == embedded_text(atom, off)
    assert lesson_views(atom, embedding) == lesson_views(atom, off)
    # "lessons": taught with it too; every question names her, no answer is her name
    lessons = TrainConfig(subject_context="lessons")
    assert taught_text(atom, lessons) == embedded_text(atom, lessons) == about(paragraph, 1)
    views = lesson_views(atom, lessons)
    assert {a for _, a in views} == {" 1891\n", " Carrow\n"}
    assert all(q.startswith("Question: Talia Orven: ") for q, _ in views)
    assert len({off.key(), embedding.key(), lessons.key()}) == 3
    with pytest.raises(ValueError):
        TrainConfig(subject_context="title")
