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
