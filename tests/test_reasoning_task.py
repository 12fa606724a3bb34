"""The built-in reasoning task (written steps), its verification and the shipped tiny-reasoning model."""
from __future__ import annotations

import random
import re

import pytest
import torch

from lit_covrl.assets import TINY_REASONING_DIR
from lit_covrl.policy import BUILTIN_MODELS
from lit_covrl.rewards import ExactMatchReward
from lit_covrl.tasks import Task, get_task
from lit_covrl.tasks.reasoning import ReasoningReward, ReasoningTask, Verdict, solution, verify
from lit_covrl.tokenizer import build_char_tokenizer

PROMPT = "12+34+5-7="
# Hand-worked: 12+34 = 46; 46+5 = 51; 51-7 = 44.
GOOD = "12+34=46,46+5=51,51-7=44|44"


def _python_value(prompt: str) -> int:
    """Python's own evaluation (an oracle independent of the task's code)."""
    assert re.fullmatch(r"\d+([+-]\d+)+=", prompt), prompt
    return eval(prompt[:-1], {"__builtins__": {}})  # noqa: S307  (digits and +- only, checked)


# ---------------------------------------------------------------------------------- verification
def test_solution_hand_worked():
    assert solution(PROMPT) == GOOD
    # 5-20 = -15; -15-3 = -18; -18+40 = 22 (negative intermediates keep their sign)
    assert solution("5-20-3+40=") == "5-20=-15,-15-3=-18,-18+40=22|22"
    assert solution("0-99-99-99=") == "0-99=-99,-99-99=-198,-198-99=-297|-297"
    # 7-7 = 0 (never "-0"); 0-3 = -3; -3+3 = 0
    assert solution("7-7-3+3=") == "7-7=0,0-3=-3,-3+3=0|0"
    assert verify("7-7-3+3=", "7-7=0,0-3=-3,-3+3=0|0").correct
    assert not verify("7-7-3+3=", "7-7=-0,-0-3=-3,-3+3=0|0").well_formed


@pytest.mark.parametrize("response, verdict", [
    (GOOD, (True, True, True)),
    (" " + GOOD + " ", (True, True, True)),                  # surrounding whitespace is stripped
    ("12+34=46,46+5=52,52-7=45|45", (True, False, False)),   # wrong intermediate carried on
    ("12+34=46,46+5=52,51-7=44|44", (True, False, True)),    # wrong intermediate, right answer
    ("12+34=46,46+5=51,51-7=44|43", (True, True, False)),    # right steps, wrong answer
    ("12+34=46,46+5=51|51", (True, False, False)),           # a step missing
    ("12+34=46,46+5=51,51+7=58|44", (True, False, True)),    # wrong operator copied
    ("12+43=55,55+5=60,60-7=53|44", (True, False, True)),    # wrong operand copied
    ("46+5=51,12+34=46,51-7=44|44", (True, False, True)),    # steps out of order
    ("44", (False, False, False)),                           # answer only: no steps
    ("|44", (False, False, False)),
    ("12+34=46,46+5=51,51-7=44", (False, False, False)),     # no answer
    ("12+34=46,46+5=51,51-7=44|44|44", (False, False, False)),
    ("12+34=46;46+5=51;51-7=44|44", (False, False, False)),  # wrong separator
    ("12+34=46,46+5=51,51-7=44|+44", (False, False, False)),
    ("12+34=46,,46+5=51,51-7=44|44", (False, False, False)),
    ("12+34=046,46+5=51,51-7=44|44", (False, False, False)),  # leading zero: not canonical
    ("12+34=46,46+05=51,51-7=44|44", (False, False, False)),
    ("12+34 = 46,46+5=51,51-7=44|44", (False, False, False)),  # space inside
    ("", (False, False, False)),
])
def test_verify_hand_worked(response, verdict):
    v = verify(PROMPT, response)
    assert (v.well_formed, v.steps_correct, v.answer_correct) == verdict
    assert v.correct == all(verdict)
    # The reward pays only fully correct responses (steps and answer), like exact match with
    # the reference solution; answer-only scoring pays whenever the answer after "|" is right.
    assert ReasoningReward()(response, GOOD) == float(v.correct)
    assert ExactMatchReward()(response, GOOD) == float(v.correct)
    assert ReasoningReward(check_steps=False)(response, GOOD) == float(v.well_formed and v.answer_correct)


def test_correct_iff_equal_to_the_solution_under_random_edits():
    # Oracle: the canonical solution is unique, so a response is correct exactly when it equals
    # it; one-character edits (substitution, deletion, insertion) from the task's alphabet probe
    # the parser for anything it accepts that it should not.
    task = ReasoningTask(split="all")
    rng = random.Random(0)
    exact, steps_only = ExactMatchReward(), ReasoningReward()
    n_correct = 0
    for _ in range(1500):
        ex = task.sample(rng)
        text, i = ex.answer, rng.randrange(len(ex.answer) + 1)
        kind = rng.choice(("sub", "del", "ins"))
        c = rng.choice(task.alphabet)
        edited = {"sub": text[:i] + c + text[i + 1:], "del": text[:i] + text[i + 1:],
                  "ins": text[:i] + c + text[i:]}[kind]
        v = verify(ex.prompt, edited)
        assert v.correct == (edited == ex.answer), (ex.prompt, edited)
        assert steps_only(edited, ex.answer) == exact(edited, ex.answer)
        n_correct += v.correct
    assert 0 < n_correct < 300  # a few edits are no-ops (same character substituted)


def test_verify_rejects_bad_prompt_and_reward_rejects_bad_reference():
    with pytest.raises(ValueError, match="prompt"):
        verify("12+34", GOOD)
    with pytest.raises(ValueError, match="reference"):
        ReasoningReward()(GOOD, "44")


# ---------------------------------------------------------------------------------- task
def test_registry_and_protocol():
    task = get_task("reasoning", num_terms=5)
    assert isinstance(task, ReasoningTask) and isinstance(task, Task)
    assert task.name == "reasoning" and task.num_terms == 5


@pytest.mark.parametrize("kwargs", [{}, {"num_terms": 6}, {"digits": 3, "ops": "+"}, {"ops": "-"}])
def test_samples_are_correct_and_long(kwargs):
    task = ReasoningTask(**kwargs)
    tok = build_char_tokenizer(task.alphabet)
    rng = random.Random(0)
    lengths = []
    for _ in range(300):
        ex = task.sample(rng)
        assert verify(ex.prompt, ex.answer).correct
        assert ex.answer.endswith("|" + str(_python_value(ex.prompt)))
        assert ex.answer.count(",") == task.num_terms - 2
        ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.unk_token_id not in tok(ex.prompt)["input_ids"]
        lengths.append(len(ids))
        assert len(ex.prompt) <= task.max_prompt_chars and len(ids) <= task.max_response_chars
    # Every response writes its steps: >= 19 tokens even with 1-digit operands ("0+0=0,0+0=0,0+0=0|0").
    assert min(lengths) >= 19 and sum(lengths) / len(lengths) >= 25


def test_max_response_chars_bound():
    # An upper bound from the widths of |value| <= k * 99 after k terms, plus a sign:
    # steps 3+1+2+1+4 = 11 and 4+1+2+1+4 = 12 (twice) = 35, + 2 "," + "|" + 4 = 42.
    task = ReasoningTask()
    assert task.max_response_chars == 42
    # "0-99=-99" 8 + "," + "-99-99=-198" 11 + "," + "-198-99=-297" 12 + "|-297" 5 = 38
    assert len(solution("0-99-99-99=")) == 38 <= 42
    every = ReasoningTask(split="all")
    rng = random.Random(3)
    assert max(len(every.sample(rng).answer) for _ in range(2000)) <= task.max_response_chars


def test_same_seed_same_examples():
    task = ReasoningTask()
    r1, r2, r3 = random.Random(7), random.Random(7), random.Random(8)
    s1 = [task.sample(r1) for _ in range(50)]
    assert s1 == [task.sample(r2) for _ in range(50)]
    assert s1 != [task.sample(r3) for _ in range(50)]
    assert len({e.prompt for e in s1}) == 50


def test_splits_are_disjoint_and_heldout_is_fixed():
    task = ReasoningTask()
    rng = random.Random(0)
    train = {task.sample(rng).prompt for _ in range(3000)}
    held = task.heldout(200, seed=5)
    assert held == task.heldout(200, seed=5)
    assert held != task.heldout(200, seed=6)
    assert len({e.prompt for e in held}) == 200
    assert not train & {e.prompt for e in held}
    assert all(task.is_heldout(e.prompt) for e in held) and not any(map(task.is_heldout, train))
    every = ReasoningTask(split="all")
    rng = random.Random(1)
    frac = sum(task.is_heldout(every.sample(rng).prompt) for _ in range(4000)) / 4000
    assert 0.07 < frac < 0.13


@pytest.mark.parametrize("kwargs, field", [
    ({"digits": 0}, "digits"), ({"digits": 5}, "digits"), ({"num_terms": 3}, "num_terms"),
    ({"num_terms": 9}, "num_terms"), ({"ops": "*"}, "ops"), ({"ops": ""}, "ops"),
    ({"split": "val"}, "split"), ({"test_fraction": 1.0}, "test_fraction"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ReasoningTask(**kwargs)


# ---------------------------------------------------------------------------------- shipped model
def test_shipped_reasoning_model_samples_some_but_not_all_right():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert BUILTIN_MODELS["lit_covrl:tiny-reasoning"] == TINY_REASONING_DIR
    tok = AutoTokenizer.from_pretrained(TINY_REASONING_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_REASONING_DIR).eval()
    assert model.config.model_type == "qwen2"
    assert sum(p.numel() for p in model.parameters()) < 1_500_000
    gc = model.generation_config
    assert gc.do_sample and gc.top_p == 1.0 and not gc.top_k and gc.eos_token_id == tok.eos_token_id

    task = ReasoningTask()
    held = task.heldout(32, seed=99)
    prompts = [e.prompt for e in held for _ in range(4)]
    enc = tok(prompts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=task.max_response_chars + 1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = [verify(p, t).correct for p, t in zip(prompts, texts)]
    well_formed = sum(verify(p, t).well_formed for p, t in zip(prompts, texts)) / len(texts)
    acc = sum(hits) / len(hits)
    # Measured held-out pass@1: 0.126 on the script's 512 prompts x 8 samples (README.md) and
    # 0.133 (17 / 128) on these 32 prompts x 4 samples (torch.manual_seed(0)). 0 is ~4 binomial std
    # (0.03) below, 1 far above; an untrained or broken model (wrong padding, positions,
    # tokenizer) scores 0, and one that solved everything would leave RL no room.
    assert 0.0 < acc < 1.0, (acc, list(zip(prompts, texts))[:5])
    assert well_formed > 0.5  # measured 0.98: it writes the step format even when a step is wrong


def test_make_reasoning_model_is_deterministic(tmp_path):
    """Two short runs of the build script (a smaller model, 3 steps) write identical weights."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "make_reasoning_model.py"
    spec = importlib.util.spec_from_file_location("make_reasoning_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    blobs = []
    for run in ("a", "b"):
        summary = script.main(["--hidden", "32", "--layers", "1", "--batch-size", "8", "--max-steps", "3",
                               "--eval-every", "2", "--eval-n", "2", "--final-eval-n", "2", "--samples", "2",
                               "--no-stop", "--out", str(tmp_path / run)])
        blobs.append((tmp_path / run / "model.safetensors").read_bytes())
        assert summary["sft_steps"] == 3 and 0.0 <= summary["pass1"] <= summary["pass2"] <= 1.0
    torch.set_num_threads(threads)
    assert blobs[0] == blobs[1]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert tok.convert_ids_to_tokens(tok("1-2=3,|")["input_ids"]) == list("1-2=3,|")
