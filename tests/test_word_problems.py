"""The word-problem task: answers checked by re-reading the story text, independently of the generator."""
from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from lit_covrl.data import PromptDataModule
from lit_covrl.rewards import MathVerifyReward
from lit_covrl.tasks import TASKS, get_task
from lit_covrl.tasks.word_problems import WordProblemTask

# The oracle's own reading of a sentence: which operation it describes (keywords, not templates).
_KEYWORDS = (
    ("divide", ("equal", "equally")),
    ("multiply", ("times as large", "trades every")),
    ("subtract", ("loses", "sells", "uses", " to ")),
    ("add", ("more", "wins", "gives her", "gives him")),
)


def read_story(prompt: str) -> Fraction:
    """Evaluate a story from its text alone: the first sentence states the start, each later
    sentence with a number changes it; exact fractions, so an inexact division would show."""
    sentences = [s for s in re.split(r"(?<=[.?])\s+", prompt) if re.search(r"\d", s)]
    (start,) = re.findall(r"\d+", sentences[0])
    value = Fraction(int(start))
    for sentence in sentences[1:]:
        (n,) = re.findall(r"\d+", sentence)  # one number per step sentence
        op = next(op for op, words in _KEYWORDS if any(w in sentence for w in words))
        value = {"add": value + int(n), "subtract": value - int(n),
                 "multiply": value * int(n), "divide": value / int(n)}[op]
    return value


@pytest.mark.parametrize("kwargs", [{}, {"num_steps": 4}, {"num_steps": 6, "max_value": 200, "max_factor": 9},
                                    {"num_steps": 3, "ops": ["add", "subtract"]}])
def test_answers_match_the_story_text(kwargs):
    task = get_task("word_problems", split="all", **kwargs)
    rng = random.Random(123)
    for _ in range(300):
        prob = task.problem(rng)
        value = read_story(prob.prompt)
        assert value.denominator == 1 and str(value.numerator) == prob.example.answer, prob.prompt
        # the story states exactly the recorded numbers, in order
        assert [int(x) for x in re.findall(r"\d+", prob.prompt)] == [prob.start] + [n for _, n in prob.steps]
        assert len(prob.steps) == task.num_steps
        assert {op for op, _ in prob.steps} <= set(task.ops)


def test_intermediate_values_stay_in_range_and_divisions_are_exact():
    task = WordProblemTask(num_steps=5, max_value=30, max_factor=4, split="all")
    rng = random.Random(7)
    seen_ops = set()
    for _ in range(500):
        prob = task.problem(rng)
        value = prob.start
        assert 2 <= value <= 30
        for op, n in prob.steps:
            seen_ops.add(op)
            if op == "divide":
                assert value % n == 0 and 2 <= n <= 4
                value //= n
            elif op == "multiply":
                assert 2 <= n <= 4
                value *= n
            else:
                value += n if op == "add" else -n
            assert 1 <= value <= 30
        assert value == prob.answer
    assert seen_ops == {"add", "subtract", "multiply", "divide"}


def test_hand_worked_story():
    # 14 marbles, +6 -> 20, split into 4 equal groups, keep one -> 5
    prompt = ("Maya has 14 marbles. She buys 6 more marbles. Then she splits the marbles into 4 equal "
              "groups and keeps only one group. How many marbles does Maya have now?")
    assert read_story(prompt) == 5


def test_prompt_asks_for_a_boxed_answer_and_math_verify_scores_it():
    task = WordProblemTask(num_steps=3)
    ex = task.sample(random.Random(0))
    assert "\\boxed{}" in ex.prompt and "<|" not in ex.prompt  # plain text: the module applies the template
    reward = MathVerifyReward()
    assert reward(f"Step by step ... so the answer is \\boxed{{{ex.answer}}}.", ex.answer) == 1.0
    assert reward(f"\\boxed{{{int(ex.answer) + 1}}}", ex.answer) == 0.0


def test_sampling_is_a_pure_function_of_the_rng():
    task = WordProblemTask(num_steps=3)
    a = [task.sample(random.Random(s)) for s in range(20)]
    b = [task.sample(random.Random(s)) for s in range(20)]
    assert a == b
    assert len({e.prompt for e in a}) == 20


def test_splits_are_disjoint():
    train, test = WordProblemTask(split="train", test_fraction=0.2), WordProblemTask(split="test", test_fraction=0.2)
    rng = random.Random(0)
    tr = {train.sample(rng).prompt for _ in range(300)}
    te = {test.sample(rng).prompt for _ in range(300)}
    assert all(test.is_heldout(p) for p in te) and not any(test.is_heldout(p) for p in tr)
    assert not tr & te


def test_registry_and_datamodule():
    assert "word_problems" in TASKS
    dm = PromptDataModule(task="word_problems", task_kwargs={"num_steps": 3}, batch_size=3, val_size=2)
    batch = dm.batch_at(0)
    assert len(batch.prompts) == 3 and all(a.lstrip("-").isdigit() for a in batch.answers)
    assert dm.batch_at(0) == batch


@pytest.mark.parametrize(
    "kwargs,message",
    [({"num_steps": 0}, "num_steps"), ({"max_value": 5}, "max_value"), ({"max_factor": 1}, "max_factor"),
     ({"ops": ["add", "modulo"]}, "ops"), ({"ops": ["add", "multiply"]}, "subtract"),
     ({"split": "val"}, "split"), ({"test_fraction": 1.0}, "test_fraction")],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WordProblemTask(**kwargs)
