"""The built-in arithmetic task, the character tokenizer and the shipped tiny model."""
from __future__ import annotations

import random
import re

import pytest
import torch

from lit_covrl.assets import TINY_MODEL_DIR
from lit_covrl.tasks import Task, get_task
from lit_covrl.tasks.arithmetic import ArithmeticTask, evaluate_expression
from lit_covrl.tokenizer import build_char_tokenizer


def _independent_value(prompt: str) -> int:
    """Python's own evaluation of the expression (an oracle independent of the generator)."""
    assert re.fullmatch(r"\d+([+-]\d+)+=", prompt), prompt
    return eval(prompt[:-1], {"__builtins__": {}})  # noqa: S307  (digits and +- only, checked)


# ---------------------------------------------------------------------------------- task
def test_registry_and_protocol():
    task = get_task("arithmetic", digits=3)
    assert isinstance(task, ArithmeticTask) and isinstance(task, Task)
    assert task.name == "arithmetic" and task.digits == 3
    with pytest.raises(ValueError, match="valid tasks"):
        get_task("nope")


def test_same_seed_same_examples_different_seed_different():
    task = ArithmeticTask()
    a = [task.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2, r3 = random.Random(7), random.Random(7), random.Random(8)
    s1 = [task.sample(r1) for _ in range(50)]
    s2 = [task.sample(r2) for _ in range(50)]
    s3 = [task.sample(r3) for _ in range(50)]
    assert s1 == s2
    assert s1 != s3
    assert len({e.prompt for e in s1}) > 40  # the stream is diverse, not one repeated prompt


@pytest.mark.parametrize("kwargs", [{}, {"digits": 3}, {"num_terms": 4, "ops": "+-"},
                                    {"digits": 1, "ops": "-"}, {"split": "test"}])
def test_answers_are_correct(kwargs):
    task = ArithmeticTask(**kwargs)
    rng = random.Random(0)
    for _ in range(300):
        ex = task.sample(rng)
        assert ex.answer == str(_independent_value(ex.prompt))
        assert ex.answer == str(evaluate_expression(ex.prompt))
        assert len(ex.prompt) <= task.max_prompt_chars
        assert len(ex.answer) <= task.max_answer_chars
        assert set(ex.prompt + ex.answer) <= set(task.alphabet)


def test_negative_answers_when_subtracting():
    task = ArithmeticTask(ops="-")
    answers = [task.sample(random.Random(i)).answer for i in range(200)]
    assert any(a.startswith("-") for a in answers) and any(a[0].isdigit() for a in answers)


def test_default_format():
    ex = ArithmeticTask().sample(random.Random(3))
    assert re.fullmatch(r"\d{1,2}\+\d{1,2}=", ex.prompt) and re.fullmatch(r"\d{1,3}", ex.answer)


def test_splits_are_disjoint_and_heldout_is_fixed():
    task = ArithmeticTask()
    rng = random.Random(0)
    train = {task.sample(rng).prompt for _ in range(3000)}
    held = task.heldout(200, seed=5)
    assert held == task.heldout(200, seed=5)  # fixed evaluation set
    assert held != task.heldout(200, seed=6)
    assert len({e.prompt for e in held}) == 200  # duplicate-free
    assert not train & {e.prompt for e in held}
    assert all(task.is_heldout(e.prompt) for e in held)
    assert not any(task.is_heldout(p) for p in train)
    # "all" covers both sides; roughly test_fraction of the prompts are held out.
    every = ArithmeticTask(split="all")
    rng = random.Random(1)
    frac = sum(task.is_heldout(every.sample(rng).prompt) for _ in range(4000)) / 4000
    assert 0.07 < frac < 0.13


def test_heldout_too_large_raises():
    with pytest.raises(ValueError, match="fewer than"):
        ArithmeticTask(digits=1).heldout(60)  # only ~10 of the 100 prompts are held out


@pytest.mark.parametrize("kwargs, field", [
    ({"digits": 0}, "digits"), ({"digits": 10}, "digits"), ({"digits": 2.0}, "digits"),
    ({"num_terms": 1}, "num_terms"), ({"ops": "*"}, "ops"), ({"ops": ""}, "ops"),
    ({"split": "val"}, "split"), ({"test_fraction": 0.0}, "test_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ArithmeticTask(**kwargs)


# ---------------------------------------------------------------------------------- tokenizer
def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer("0123456789+-=")
    ids = tok("47+85=", add_special_tokens=True)["input_ids"]
    assert len(ids) == 6  # one token per character, nothing added
    assert tok.convert_ids_to_tokens(ids) == list("47+85=")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back("47+85=")["input_ids"] == ids
    assert (back.pad_token, back.eos_token, back.bos_token, back.unk_token) == (
        "<pad>", "<eos>", "<bos>", "<unk>")
    assert back.padding_side == "left"
    assert back.decode(ids + [back.eos_token_id, back.pad_token_id], skip_special_tokens=True) \
        == "47+85="
    assert back("4x")["input_ids"] == [ids[0], back.unk_token_id]
    batch = back(["1+2=", "47+85="], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, :2].tolist() == [back.pad_token_id] * 2  # left padding
    assert back.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["1+2=", "47+85="]


def test_char_tokenizer_validation():
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer("0120")
    with pytest.raises(ValueError, match="padding_side"):
        build_char_tokenizer("01", padding_side="middle")


# ---------------------------------------------------------------------------------- tiny model
def test_shipped_tiny_model_greedy_decodes_heldout_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    gc = model.generation_config
    assert gc.do_sample and gc.top_p == 1.0 and not gc.top_k and gc.eos_token_id == tok.eos_token_id

    task = ArithmeticTask()
    held = task.heldout(128, seed=99)
    enc = tok([e.prompt for e in held], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=task.max_answer_chars + 1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    acc = sum(t.strip() == e.answer for t, e in zip(texts, held)) / len(held)
    # Measured greedy accuracy: 0.371 on the script's 512 held-out prompts (README.md) and 0.375
    # on these 128 (seed 99). 0.25 is ~3 binomial std (0.043) below; an untrained or broken model
    # (wrong padding, positions, tokenizer) scores ~0.
    assert acc >= 0.25, (acc, list(zip(texts, held))[:5])
