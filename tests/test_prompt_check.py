"""Prompts the tokenizer cannot represent: the shipped character tokenizer maps unknown characters
to "<unk>" (known characters keep their ids, so the shipped weights stay valid), and at start-up a
prompt from a file that encodes to unknown tokens or to nothing is an error naming file:line, or is
skipped and counted (data.unencodable_prompts: skip). Overlong prompts name file:line too."""
from __future__ import annotations

import json
import logging
import random

import pytest

from lit_covrl.assets import TINY_MODEL_DIR
from lit_covrl.data import TASK_CHECK_SAMPLES, PromptDataModule
from lit_covrl.policy import load_tokenizer
from lit_covrl.prompt_check import check_datamodule_prompts, find_unencodable
from lit_covrl.prompts import PromptTooLongError
from lit_covrl.tasks.arithmetic import ArithmeticTask
from lit_covrl.types import Example
from tests.helpers import fit
from tests.test_module import make_module


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_shipped_tokenizer_maps_unknown_characters_to_unk():
    tok = load_tokenizer("lit_covrl:tiny-arith")
    assert tok.unk_token == "<unk>" and tok.unk_token_id == 1
    # ids: <unk>=1, then "0".."9" = 4..13, "+" = 14, "=" = 15 (tokenizer.json). "What is " is 8
    # unknown characters, then '3' ' ' '+' ' ' '4' '?'
    assert _ids(tok, "What is 3 + 4?") == [1] * 8 + [7, 1, 14, 1, 8, 1]
    assert _ids(tok, "abc") == [1, 1, 1]
    assert _ids(tok, "é\n9") == [1, 1, 13]


def test_shipped_tokenizer_keeps_the_ids_of_known_characters():
    """The ids the shipped weights were trained on: each character of the alphabet at its
    tokenizer.json index, and every task prompt/answer encoded (and decoded) exactly as by
    transformers' own AutoTokenizer, which the quickstart used before."""
    from transformers import AutoTokenizer

    tok, auto = load_tokenizer("lit_covrl:tiny-arith"), AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    vocab = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    for ch in "0123456789+=":
        assert _ids(tok, ch) == [vocab[ch]]
    task, rng = ArithmeticTask(), random.Random(0)
    texts = [t for ex in (task.sample(rng) for _ in range(300)) for t in (ex.prompt, ex.answer)]
    assert [_ids(tok, t) for t in texts] == [_ids(auto, t) for t in texts]
    samples = [[8, 11, 14, 3, 0, 0], [2, 13, 1, 15, 3], [4]]  # sampled ids may hold specials
    assert tok.batch_decode(samples, skip_special_tokens=True) == auto.batch_decode(samples, skip_special_tokens=True)


def test_a_prompt_that_encodes_to_nothing_is_reported():
    """transformers' AutoTokenizer turns the shipped folder into a Qwen2Tokenizer that drops
    unknown characters: a prompt of letters becomes no token at all."""
    from transformers import AutoTokenizer

    dropping = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    rows = [Example("1+2=", "3", source="f.jsonl:1"), Example("abc", "1", source="f.jsonl:2")]
    assert find_unencodable(dropping, rows) == [(rows[1], "prompt 'abc' encodes to no token")]


def _rows(path, prompts) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in prompts))
    return str(path)


def test_unencodable_prompt_in_a_file_fails_at_start_up_naming_file_line(tiny_model_dir, tmp_path):
    train = _rows(tmp_path / "train.jsonl", ["1+2=", "What is 1+2?", "3+4=", "abc"])
    module = make_module(tiny_model_dir)
    with pytest.raises(ValueError) as err:
        fit(module, PromptDataModule(task=None, train_files=[train], batch_size=2), steps=1)
    # "What is 1+2?": 12 characters, 9 outside the alphabet "0123456789+-="
    assert str(err.value) == (
        f"{train}:2: prompt 'What is 1+2?' has 9 of 12 tokens unknown to the tokenizer ('<unk>'): "
        "'W', 'h', 'a', 't', ' ', 'i', 's', '?' (1 more unencodable prompt(s) in the data); "
        "fix the file or set data.unencodable_prompts: skip"
    )
    assert module.global_step == 0  # nothing ran


def test_unencodable_prompts_skipped_and_counted(tiny_model_dir, tmp_path, caplog):
    train = _rows(tmp_path / "train.jsonl", ["1+2=", "What is 1+2?", "3+4=", "abc", "5+5="])
    val = _rows(tmp_path / "val.jsonl", ["1+1=", "one plus one"])
    data = PromptDataModule(task=None, train_files=[train], val_files=[val], batch_size=2, val_batch_size=4,
                            unencodable_prompts="skip")
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        fit(make_module(tiny_model_dir), data, steps=1, limit_val_batches=0, log_dir=tmp_path / "logs")
    messages = [r.getMessage() for r in caplog.records]
    listed = (tmp_path / "logs" / "t" / "version_0" / "skipped_rows.txt").read_text().splitlines()
    assert listed[0].startswith(f"{train}:2: prompt 'What is 1+2?'") and len(listed) == 3  # in the file too
    assert any(m.startswith("3 of 7 prompts encode to the tokenizer's unknown token") for m in messages), messages
    assert any(f"{train}:4: prompt 'abc' has 3 of 3 tokens unknown" in m for m in messages), messages
    assert any(f"{val}:2: prompt 'one plus one'" in m for m in messages), messages
    assert data.skipped_rows == 3 and data.rows_used == 4 and data.rows_seen == 7
    assert [ex.prompt for ex in data.known_examples()] == ["1+2=", "3+4=", "5+5=", "1+1="]
    assert [b.prompts for b in data.val_dataloader()] == [["1+1="]]
    assert {p for k in range(6) for p in data.batch_at(k).prompts} == {"1+2=", "3+4=", "5+5="}


def test_overlong_prompt_error_names_file_line(tiny_model_dir, tmp_path):
    train = _rows(tmp_path / "p.jsonl", ["1+0=", "1+" * 40 + "0="])
    module = make_module(tiny_model_dir, rollout=dict(max_prompt_length=16))
    with pytest.raises(ValueError, match=rf"^{train}:2: prompt '1\+1\+.*' has 82 tokens > max_prompt_length=16"):
        fit(module, PromptDataModule(task=None, train_files=[train], batch_size=2), steps=1)


def test_messages_about_a_long_conversation_show_its_first_80_characters():
    """`[:80]` of a conversation kept whole messages: a 5000-character message was printed in full
    by the start-up checks (too long, unencodable) and by the rollout's encoding."""
    from lit_covrl.prompts import encode_prompts
    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 :+=")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    conv = [{"role": "user", "content": "a" * 5000}]
    shown = repr(str(conv)[:80])  # "[{'role': 'user', 'content': 'aaa...", 80 characters
    with pytest.raises(ValueError) as err:
        find_unencodable(tok, [Example(conv, "1", source="c.jsonl:1")], max_prompt_length=10)
    assert str(err.value).startswith(f"c.jsonl:1: prompt {shown} has 5000 tokens > max_prompt_length=10")
    with pytest.raises(ValueError) as err:
        encode_prompts(tok, [conv], max_prompt_length=10)
    assert str(err.value).startswith(f"prompt {shown} has 5000 tokens") and len(str(err.value)) < 300
    ((_, reason),) = find_unencodable(tok, [Example([{"role": "user", "content": "A" * 5000}], "1")])
    assert reason.startswith("prompt \"[{'role': 'user', 'content': 'AAA") and len(reason) < 300


def test_unencodable_prompts_setting_is_checked():
    with pytest.raises(ValueError, match="unencodable_prompts='drop'; valid: \\['error', 'skip'\\]"):
        PromptDataModule(unencodable_prompts="drop")


def test_a_task_the_tokenizer_cannot_represent_is_reported(tiny_model_dir, caplog):
    """Generated prompts are not dropped, but a task outside the tokenizer's alphabet (word problems
    for a digits-only tokenizer) is reported at start-up, from its held-out prompts and a sample of
    TASK_CHECK_SAMPLES drawn ones."""
    data = PromptDataModule(task="word_problems", batch_size=2, val_size=6, val_batch_size=6)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        fit(make_module(tiny_model_dir, rollout=dict(max_new_tokens=2)), data, steps=1, limit_val_batches=0)
    reports = [r.getMessage() for r in caplog.records if "checked prompts of the task" in r.getMessage()]
    n = 6 + TASK_CHECK_SAMPLES
    assert len(reports) == 1 and reports[0].startswith(f"{n} of {n} checked prompts"), reports
    assert "(first: task 'word_problems', held-out prompt 1: prompt " in reports[0], reports


def test_held_out_files_of_a_task_are_checked_at_start_up(tmp_path):
    """task + val_files: the files' prompts are checked like any file's (overlong, unencodable,
    with file:line), and not reported as the task's held-out prompts."""
    tok = load_tokenizer("lit_covrl:tiny-arith")
    val = _rows(tmp_path / "val.jsonl", ["1+1=", "What is one plus one?", "1+" * 20 + "1="])
    data = PromptDataModule(task="arithmetic", val_files=[val], val_batch_size=4)
    data.setup("fit")
    with pytest.raises(ValueError, match=rf"^{val}:3: prompt '1\+1\+.*' has 42 tokens > max_prompt_length=32"):
        check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=32)
    with pytest.raises(ValueError, match=rf"^{val}:2: prompt 'What is one plus one\?' has 21 of 21 tokens unknown"):
        check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=64)
    data.hparams.unencodable_prompts = "skip"
    check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=64)
    assert [b.prompts for b in data.val_dataloader()] == [["1+1=", "1+" * 20 + "1="]] and data.skipped_rows == 1


def test_chat_template_without_one_fails_at_start_up_even_without_known_prompts(tiny_model_dir, tmp_path):
    """`model.rollout.chat_template: true` with a template-less tokenizer was only found when the
    first batch was encoded if no prompt was known in advance (a synthetic task with val_size 0):
    past start-up, so a full traceback after the model had loaded. It fails in setup now."""
    import lightning as L

    from tests.test_module import make_data, make_module

    module = make_module(tiny_model_dir, rollout=dict(chat_template=True))
    module.training_step = lambda *a, **k: pytest.fail("a training step ran")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="chat_template is true but the tokenizer has no chat template"):
        trainer.fit(module, make_data(val_size=0))
    assert trainer.fit_loop.epoch_loop.batch_progress.total.started == 0  # before the first batch


def test_a_task_whose_prompts_exceed_max_prompt_length_fails_at_start_up(tiny_model_dir):
    """A synthetic task's held-out sample is checked against max_prompt_length too: the mistake was
    found only at the first rollout (after loading the model), with a traceback."""
    for val_size, label in ((4, "held-out prompt"), (0, "sampled prompt")):  # val_size 0: a sample of its own
        module = make_module(tiny_model_dir, rollout=dict(max_prompt_length=3))
        module.training_step = lambda *a: pytest.fail("a rollout ran")
        with pytest.raises(ValueError, match=rf"task 'arithmetic', {label} 1: prompt '.*' has \d+ tokens > max_prompt_length=3"):
            fit(module, PromptDataModule(task="arithmetic", batch_size=2, val_size=val_size, seed=0), steps=1)


def test_a_task_sample_without_held_out_prompts_carries_the_system_prompt():
    """val_size 0: the prompts sampled for the start-up check are what training sends, the system
    message included (it checked the bare task strings, which fit where the real prompts did not)."""
    import string

    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    data = PromptDataModule(task="arithmetic", batch_size=2, val_size=0, seed=0,
                            system_prompt="You are a careful assistant. Answer with one number.")
    data.setup("fit")
    assert data.task_sample()[0].prompt[0] == {"role": "system", "content": data.hparams.system_prompt}
    with pytest.raises(ValueError, match=r"task 'arithmetic', sampled prompt 1: prompt .* > max_prompt_length=40"):
        check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=40)


def test_truncate_left_warns_at_start_up_how_many_prompts_lose_their_first_tokens(tmp_path, caplog):
    """prompt_overflow: truncate_left cut over-long prompts without a word (review byo21): start-up
    now warns how many of the known prompts, and which is longest (file:line, tokens); no error."""
    tok = load_tokenizer("lit_covrl:tiny-arith")
    path = _rows(tmp_path / "train.jsonl", ["1+1=", "1+" * 20 + "1=", "2+" * 30 + "2=", "3+3="])
    data = PromptDataModule(task=None, train_files=[path], batch_size=2)
    data.setup("fit")
    with caplog.at_level("WARNING"):
        check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=32, truncate=True)
    warned = [r.getMessage() for r in caplog.records if "lose their first tokens" in r.getMessage()]
    assert warned == [f"2 of 4 prompts are longer than model.rollout.max_prompt_length=32 and lose their first tokens "
                      f"(prompt_overflow: truncate_left); the longest, {path}:3, has 62 tokens"], warned
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_datamodule_prompts(tok, data, chat_template=None, max_prompt_length=64, truncate=True)
    assert not [r for r in caplog.records if "lose their first tokens" in r.getMessage()]


class _LongPrompts:
    """A task whose every prompt is 40 sums long (a pure function of the rng, as tasks must be)."""
    name = "long"

    def sample(self, rng):
        a = rng.randint(0, 9)
        return Example("1+" * 40 + f"{a}=", str(40 + a))


def test_a_task_prompt_over_the_limit_drawn_in_training_names_the_step_and_the_checkpoint(tiny_model_dir, monkeypatch):
    """A task's training prompts are only sampled at start-up: one that escapes the sample stops
    the run naming the RL step, the start-up sample, the settings and the checkpoint to resume from
    (it was the bare encoding error). Here the sample is emptied so that the first rollout draws it."""
    monkeypatch.setattr("lit_covrl.data.TASK_CHECK_SAMPLES", 0)
    module = make_module(tiny_model_dir, rollout=dict(max_prompt_length=16))
    data = PromptDataModule(task=f"{__name__}._LongPrompts", batch_size=2, val_size=0, seed=0)
    with pytest.raises(PromptTooLongError) as err:
        fit(module, data, steps=1)
    msg = str(err.value)
    assert msg.startswith("prompt '1+1+") and "tokens > max_prompt_length=16; raise model.rollout.max_prompt_length" in msg
    assert f"It was drawn at RL step 0 (start-up checks a sample of {TASK_CHECK_SAMPLES} of a task's prompts)" in msg
    assert msg.endswith("Resume from the last checkpoint, none saved yet, with one of those settings changed")


def test_the_start_up_sample_of_a_task_catches_a_rare_long_prompt(tiny_model_dir):
    """1 prompt in 40 too long: 16 sampled prompts missed it two times in three (the run then
    died at a later step), TASK_CHECK_SAMPLES find it at start-up."""
    assert TASK_CHECK_SAMPLES >= 256
    module = make_module(tiny_model_dir, rollout=dict(max_prompt_length=16))
    module.training_step = lambda *a: pytest.fail("a rollout ran")
    data = PromptDataModule(task=f"{__name__}._RarelyLong", batch_size=2, val_size=0, seed=0)
    with pytest.raises(ValueError, match=r"task '.*_RarelyLong', sampled prompt \d+: prompt '1\+1\+.*' has \d+ tokens"):
        fit(module, data, steps=1)


class _RarelyLong:
    """Sums, one in 40 of them 40 terms long."""
    name = "rarely_long"

    def sample(self, rng):
        a, long = rng.randint(0, 9), rng.random() < 1 / 40
        return Example(("1+" * 40 if long else "") + f"{a}=", str(a))


def test_pre_templated_string_prompts_are_warned_about(tmp_path, caplog):
    """String prompts already in the template's format were templated again without a word (review
    byo25 F11): start-up warns, counting them and naming the first; not with chat_template: false,
    nor for plain prompts."""
    import string

    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("".join(c for c in string.printable if c not in "\t\r\x0b\x0c"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n")
    turn = "<|im_start|>user\n{}+1=<|im_end|>\n<|im_start|>assistant\n"
    rows = _rows(tmp_path / "rows.jsonl", ["1+1=", turn.format(2), turn.format(3)])
    data = PromptDataModule(task=None, train_files=[rows], batch_size=1)
    data.setup("fit")
    messages = {}
    for chat_template in (None, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lit_covrl"):
            check_datamodule_prompts(tok, data, chat_template=chat_template, max_prompt_length=None)
        messages[chat_template] = [r.getMessage() for r in caplog.records if "chat template writes" in r.getMessage()]
    assert messages[False] == []
    assert messages[None] == [f"2 of 3 string prompts already hold special tokens the chat template writes (first: "
                              f"{rows}:2: '<|im_start|>'): the template wraps each again, a user turn holding a whole "
                              "conversation; set model.rollout.chat_template: false to feed them as written"]
