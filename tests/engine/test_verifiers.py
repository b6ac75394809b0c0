"""Verifiers in this process: GSM8K, MATH (math-verify), the arithmetic demo task, and each of
the 25 IFEval checks on a response that follows the constraint and one that does not, with
the ground truth in Tülu 3's layout; the registry and reward shaping."""

from __future__ import annotations

import json

import pytest

from nova_engine.rl.verifiers import (
    RewardConfig,
    VerifierResult,
    VerifyItem,
    check_ground_truth,
    count_reasons,
    register_verifier,
    shape_rewards,
    unregister_verifier,
    verifier_names,
    verify_one,
)
from nova_engine.rl.verifiers.ifeval import CHECKS, count_sentences, parse_constraints


def run(dataset, response, gt) -> VerifierResult:
    return verify_one(VerifyItem(dataset, response, gt))


# ---------------------------------------------------------------------------------- GSM8K

GSM8K_RIGHT = [
    ("She sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The total is 1,080 dollars.", "1080"),
    ("So the answer is 1,234,567.", "1234567"),
    ("The answer is 18.00", "18"),
    ("It drops to -5 degrees.", "-5"),
    ("The answer: 7", ["6", "7"]),  # any of a list
    ("Half of it: 0.5", ".5"),
]
GSM8K_WRONG = [
    ("She makes 9 * 2 = 18 dollars, plus a 5 dollar tip.", "18"),  # the LAST number counts
    ("From 10-5 the result follows.", "-5"),  # a minus between terms is not a sign
    ("The answer is 1,2", "12"),  # not a thousands separator
    ("The answer is 17.5", "17"),
]


@pytest.mark.parametrize("response,gt", GSM8K_RIGHT)
def test_gsm8k_right(response, gt):
    res = run("gsm8k", response, gt)
    assert res.correct and res.reason == "correct", res


@pytest.mark.parametrize("response,gt", GSM8K_WRONG)
def test_gsm8k_wrong(response, gt):
    res = run("gsm8k", response, gt)
    assert res.score == 0.0 and res.kind == "wrong", res


def test_gsm8k_no_number_and_bad_ground_truth():
    assert run("gsm8k", "I do not know.", "3").kind == "no_answer"
    with pytest.raises(ValueError, match="not a number"):
        check_ground_truth("gsm8k", "three")
    check_ground_truth("GSM8K", "$1,080")  # names are case-insensitive


# ---------------------------------------------------------------------------------- MATH

MATH_RIGHT = [
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("Therefore $x = \\boxed{0.5}$.", "\\frac{1}{2}"),
    ("Final Answer: The final answer is $\\dfrac12$. I hope it is correct.", "\\frac{1}{2}"),
    ("We get \\boxed{\\sqrt{8}}.", "2\\sqrt{2}"),
    ("Expanding, \\boxed{(x+1)^2}.", "x^2+2x+1"),
    ("The interval is $\\boxed{(1, 2)}$.", "(1,2)"),
    ("Thus the probability is $\\boxed{\\tfrac{3}{4}}$", "0.75"),
    ("The answer is $\\boxed{\\frac{6}{8}}$", "\\frac34"),
]
MATH_WRONG = [
    ("Final Answer: The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{2}"),
    ("I computed 3 then 7 and the total is \\boxed{11}", "10"),
    ("So we have $\\boxed{2\\sqrt{3}}$.", "2\\sqrt{2}"),
    ("Hence \\boxed{x^2 + 1}.", "(x+1)^2"),
]


@pytest.mark.parametrize("response,gt", MATH_RIGHT)
def test_math_right(response, gt):
    res = run("MATH", response, gt)
    assert res.correct and res.answer, res


@pytest.mark.parametrize("response,gt", MATH_WRONG)
def test_math_wrong(response, gt):
    res = run("math", response, gt)
    assert res.score == 0.0 and res.kind == "wrong", res


def test_math_no_answer():
    assert run("math", "I cannot solve this one.", "5").kind == "no_answer"


# ------------------------------------------------------------------------------ arithmetic


def test_arithmetic_exact_number():
    assert run("arithmetic", "65", "65").correct
    assert run("arithmetic", " 65.\n", "65").correct
    assert run("arithmetic", "64", "65").kind == "wrong"
    assert run("arithmetic", "65 apples", "65").kind == "wrong"  # the demo's exact match
    assert run("arithmetic", "", "65").kind == "no_answer"
    with pytest.raises(ValueError, match="not an integer"):
        check_ground_truth("arithmetic", "6.5")


# ---------------------------------------------------------------------------------- IFEval

TULU_KEYS = (
    "N",
    "quantifier",
    "end_phrase",
    "keyword_list",
    "word",
    "forbidden_words",
    "letter",
    "i",
    "first_word",
    "postscript_marker",
    "options",
    "section_splitter",
    "original_prompt",
    "language",
)


def tulu_gt(func, **kwargs) -> str:
    """Tülu 3's ground truth: every argument name present, null where unused."""
    return json.dumps({"func_name": func} | {k: kwargs.get(k) for k in TULU_KEYS})


IFEVAL = [  # func, kwargs, a response that follows, one that does not
    ("verify_keywords", {"keyword_list": ["ocean", "Tide"]},
     "The tide rolls in from the Ocean.", "The tide rolls in."),
    ("verify_keyword_frequency", {"word": "sand", "N": 3},
     "Sand, sand and more SAND; sandy shores.", "Sand and sand; sandy shores."),
    ("validate_forbidden_words", {"forbidden_words": ["bad", "awful"]},
     "A badge is fine here.", "That was awful."),
    ("verify_letter_frequency", {"letter": "z", "N": 3},
     "Zebras zigzag.", "Zebras zigzag lazily."),
    ("validate_response_language", {"language": "fr"},
     "Bonjour, je suis très heureux de vous voir aujourd'hui dans cette belle ville.",
     "Hello, I am very happy to see you today in this beautiful city."),
    ("verify_paragraph_count", {"N": 3},
     "First part.\n* * *\nSecond part.\n* * *\nThird part.",
     "First part.\n* * *\n\n* * *\nThird part."),
    ("validate_word_constraint", {"N": 5, "quantifier": "at most"},
     "Short and sweet reply.", "This reply has far too many words in it."),
    ("verify_sentence_constraint", {"N": 3, "quantifier": "at least"},
     "Dr. Smith arrived. He sat down! Was it late? Yes.", "Dr. Smith arrived at 3.5 p.m. today."),
    ("validate_paragraphs", {"N": 2, "first_word": "however", "i": 2},
     "Cats sleep a lot.\n\nHowever, dogs do too.", "Cats sleep a lot.\n\nDogs do too."),
    ("verify_postscript", {"postscript_marker": "P.S."},
     "Thanks for reading.\n\nP.S. See you soon.", "Thanks for reading. See you soon."),
    ("validate_placeholders", {"N": 2},
     "Dear [name], we ship to [address].", "Dear [name], we ship to you []."),
    ("verify_bullet_points", {"N": 2},
     "**Plan**\n* Buy milk\n- Walk dog\n* * *", "* Buy milk\n* Walk dog\n* Cook"),
    ("validate_title", {}, "<<Ode to Joy>>\nA poem.", "Ode to Joy\nA poem. <<  >>"),
    ("validate_choice", {"options": "('My answer is yes.', 'My answer is no.')"},
     "My answer is no.", "My answer is perhaps."),
    ("validate_highlighted_sections", {"N": 2},
     "Note *this part* and **that part**.", "Note *this part* and ** **."),
    ("validate_sections", {"N": 2, "section_splitter": "SECTION"},
     "Section 1\nIntro.\n## SECTION 2\nBody.", "Section 1\nIntro. Body follows in section."),
    ("validate_json_format", {}, '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]'),
    ("validate_repeat_prompt", {"original_prompt": "Write a haiku about rain."},
     "write a haiku about rain. Rain falls soft...", "Here is a haiku about rain."),
    ("validate_two_responses", {},
     "Answer one.\n******\nAnswer two.", "Answer one.\n******\nAnswer one."),
    ("validate_uppercase", {}, "ALL CAPS HERE, 100%!", "ALL CAPS except this"),
    ("validate_lowercase", {}, "all lowercase here, 100%!", "all lowercase But this"),
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "at least"},
     "This is VERY IMPORTANT.", "This is Very important."),
    ("validate_end", {"end_phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?  \n", "Is there anything else I can help "
     "with? Done."),
    ("validate_quotation", {}, '  "Wrapped in quotes."  ', '"Only at the start.'),
    ("validate_no_commas", {}, "No commas at all here.", "One, comma."),
]  # fmt: skip


def test_all_25_checks_covered():
    assert len(CHECKS) == 25
    assert sorted(func for func, *_ in IFEVAL) == sorted(CHECKS)


@pytest.mark.parametrize("func,kwargs,good,bad", IFEVAL, ids=[c[0] for c in IFEVAL])
def test_ifeval_check(func, kwargs, good, bad):
    gt = tulu_gt(func, **kwargs)
    check_ground_truth("ifeval", gt)
    ok, fail = run("ifeval", good, gt), run("ifeval", bad, gt)
    assert ok.correct and ok.reason == "correct", ok
    assert fail.score == 0.0 and fail.kind == "wrong" and func in fail.reason, fail


def test_ifeval_ground_truth_forms_and_errors():
    nested = {"func_name": "validate_end", "kwargs": {"end_phrase": "Bye."}}
    assert run("ifeval", "See you. Bye.", json.dumps(nested)).correct
    assert run("ifeval", "See you. Bye.", nested).correct  # a dict, not a string
    both = [tulu_gt("validate_no_commas"), tulu_gt("validate_lowercase")]
    res = run("ifeval", "one two", both)  # list: all must hold, score = fraction held
    assert res.correct
    res = run("ifeval", "One two", json.dumps(both))
    assert res.kind == "partial" and res.score == 0.5 and "validate_lowercase" in res.reason
    with pytest.raises(ValueError, match="unknown IFEval check 'validate_haiku'"):
        check_ground_truth("ifeval", json.dumps({"func_name": "validate_haiku"}))
    with pytest.raises(ValueError, match=r"missing argument\(s\) \['N'\]"):
        parse_constraints(tulu_gt("verify_bullet_points"))
    # keys the check does not take are ignored (Tülu rows carry every argument name)
    assert run("ifeval", "no commas", tulu_gt("validate_no_commas", N=3, word="x")).correct
    with pytest.raises(ValueError, match="quantifier"):
        parse_constraints(tulu_gt("validate_word_constraint", N=3, quantifier="roughly"))
    with pytest.raises(ValueError, match="not JSON"):
        parse_constraints("{func_name: oops")
    assert run("ifeval", "text", "{not json").kind == "bad_ground_truth"


def test_sentence_counter():
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("Mr. Smith met Dr. Jones, e.g. at 3.5 p.m. on J. Street.") == 1
    assert count_sentences("") == 0


# ------------------------------------------------------------------ registry and rewards


def test_registry_names_errors_and_crashes():
    assert {"gsm8k", "math", "ifeval", "arithmetic"} <= set(verifier_names())
    with pytest.raises(ValueError, match="no verifier for dataset 'chess'; known: .*gsm8k"):
        run("chess", "e4", "e4")

    @register_verifier("boom_test", "kaboom_test")
    def boom(response, gt):
        raise ZeroDivisionError("division by zero")

    @register_verifier("half_test")
    def half(response, gt):
        return 0.5

    try:
        res = run("KABOOM_TEST", "x", "y")
        assert res.score == 0.0 and res.reason == "error: ZeroDivisionError: division by zero"
        assert run("half_test", "x", "y").kind == "partial"
        with pytest.raises(ValueError, match="already registered"):
            register_verifier("boom_test")(boom)
    finally:
        unregister_verifier("boom_test")
        unregister_verifier("half_test")
    assert "kaboom_test" not in verifier_names()


def test_reward_shaping_tulu3():
    results = [
        VerifierResult(1.0, "correct"),
        VerifierResult(0.0, "wrong"),
        VerifierResult(1.0, "correct"),
        VerifierResult(0.0, "timeout"),
        VerifierResult(0.5, "partial"),
    ]
    finished = [True, True, False, True, True]
    assert shape_rewards(results, finished, RewardConfig()) == [10.0, 0.0, 10.0, 0.0, 5.0]
    cfg = RewardConfig(verified_reward=1.0, unverified_reward=-1.0, truncated_reward=-2.0)
    assert shape_rewards(results, finished, cfg) == [1.0, -1.0, -2.0, -1.0, 0.0]
    assert count_reasons(results) == {"correct": 2, "wrong": 1, "timeout": 1, "partial": 1}
    with pytest.raises(ValueError, match="finite"):
        RewardConfig(verified_reward=float("nan"))
    with pytest.raises(ValueError, match="2 results for 1"):
        shape_rewards(results[:2], [True], RewardConfig())
