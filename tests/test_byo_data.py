"""Bring-your-own data and generation: nested field paths, conversational rows, system prompt,
tasks by class path, the skipped-rows file, every EOS id and stop strings."""
from __future__ import annotations

import json
import logging
import string

import pytest
import torch

from lit_covrl.data import PromptDataModule
from lit_covrl.prompt_check import check_datamodule_prompts
from lit_covrl.prompts import encode_prompts
from lit_covrl.stopping import eos_token_ids, truncate_at_stop_strings
from lit_covrl.types import Example, Rollout

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c"))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_nested_fields_conversations_and_columns(tmp_path):
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}]
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": convo, "reward_model": {"ground_truth": "2", "style": "rule"}, "source": "a"},  # 1 valid
        {"prompt": "2+2?", "reward_model": {"ground_truth": 4}},  # 2 valid, number answer
        {"prompt": "3+3?", "reward_model": {"style": "rule"}},  # 3 no ground truth
        {"prompt": [], "reward_model": {"ground_truth": "0"}},  # 4 empty conversation
        {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "0"}},  # 5 no content
        {"prompt": [{"role": "user", "content": " "}], "reward_model": {"ground_truth": "0"}},  # 6 blank
        {"prompt": "5+5?", "reward_model.ground_truth": "10"},  # 7 a literal dotted key wins
        {"prompt": [*convo, {"role": "assistant", "content": "2"}], "reward_model": {"ground_truth": "2"}},  # 8 SFT row
    ])
    dm = PromptDataModule(task=None, train_files=[path], answer_field="reward_model.ground_truth", batch_size=2)
    dm.setup("fit")
    assert dm._train_rows == [
        Example(convo, "2", {"reward_model": {"ground_truth": "2", "style": "rule"}, "source": "a"}),
        Example("2+2?", "4", {"reward_model": {"ground_truth": 4}}),
        Example("5+5?", "10", {}),
    ]
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in dm.skipped] == ["3", "4", "5", "6", "8"]
    # a conversation ending with the assistant's answer (review byo25 F17: it trained with the answer in the prompt)
    assert "ends with an 'assistant' message (a supervised fine-tuning row?" in dm.skipped[4]
    assert "missing field 'reward_model.ground_truth'" in dm.skipped[0]
    assert "empty conversation" in dm.skipped[1] and "message 0" in dm.skipped[2] and "every message is empty" in dm.skipped[3]
    batch = dm.batch_at(0)
    assert len(batch.columns) == 2 and all(isinstance(c, dict) for c in batch.columns)


def test_verl_parquet_layout(tmp_path):
    """verl's parquet files: `prompt` a list of messages, the answer in `reward_model.ground_truth`,
    metadata columns beside them (they reach reward functions as `Example.columns`)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "1+1?"}], "ability": "math",
         "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": 0}},
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "2+3?"}], "ability": "math",
         "reward_model": {"ground_truth": None, "style": "rule"}, "extra_info": {"index": 1}},
    ]
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    dm = PromptDataModule(task=None, train_files=[path], answer_field="reward_model.ground_truth", batch_size=1)
    dm.setup("fit")
    assert dm._train_rows == [Example([{"role": "user", "content": "1+1?"}], "2", {
        "data_source": "gsm8k", "ability": "math", "reward_model": {"ground_truth": "2", "style": "rule"},
        "extra_info": {"index": 0}})]
    assert dm.skipped == [f"{path}:row 2: null field 'reward_model.ground_truth'"]


def test_system_prompt_and_chat_template(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": "hi", "answer": "1"},
        {"prompt": [{"role": "user", "content": "yo"}], "answer": "2"},
    ])
    dm = PromptDataModule(task=None, train_files=[path], val_files=[path], system_prompt="S", batch_size=2)
    dm.setup("fit")
    prompts = [ex.prompt for ex in dm._train_rows]
    assert prompts == [[{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                       [{"role": "user", "content": "yo"}]]  # conversations keep their own messages
    assert next(iter(dm.val_dataloader())).prompts == prompts
    ids, mask = encode_prompts(chat_tokenizer, prompts, max_prompt_length=64)
    texts = [chat_tokenizer.decode(row[m.bool()]) for row, m in zip(ids, mask)]
    assert texts == ["<system>S<user>hi<assistant>", "<user>yo<assistant>"]
    with pytest.raises(ValueError, match="is a conversation .*model.rollout.chat_template is false"):
        encode_prompts(chat_tokenizer, prompts, chat_template=False)


def test_system_prompt_without_a_chat_template_names_the_setting(tmp_path, chat_tokenizer):
    """data.system_prompt turns string prompts into conversations: without a chat template the
    start-up check names data.system_prompt, not the prompts."""
    from lit_covrl.policy import load_tokenizer

    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    for kw in (dict(task=None, train_files=[path]), dict(task="arithmetic")):
        dm = PromptDataModule(system_prompt="Be brief.", batch_size=1, val_size=2, **kw)
        dm.setup("fit")
        with pytest.raises(ValueError, match=r"^data\.system_prompt needs a chat template, but the tokenizer has no "):
            check_datamodule_prompts(load_tokenizer("lit_covrl:tiny-arith"), dm, chat_template=None,
                                     max_prompt_length=64)
        with pytest.raises(ValueError, match=r"^data\.system_prompt needs a chat template, but "
                                             r"model\.rollout\.chat_template is false"):
            check_datamodule_prompts(chat_tokenizer, dm, chat_template=False, max_prompt_length=64)
        check_datamodule_prompts(chat_tokenizer, dm, chat_template=None, max_prompt_length=64)  # with one: fine


def test_a_prompt_the_chat_template_rejects_names_file_line(tmp_path):
    """Templates that raise (Mistral-style "roles must alternate", Gemma-style "System role not
    supported") give a one-line ValueError naming file:line, and data.system_prompt when it is set."""
    from lit_covrl.cli import _STARTUP_ERRORS
    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c"))
    tok.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                         "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                         "<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    user = [{"role": "user", "content": "1+1="}]
    rows = [{"prompt": user, "answer": "2"}] * 3 + [{"prompt": user * 2, "answer": "1"}]  # row 4: user, user
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = PromptDataModule(task=None, train_files=[path], batch_size=1)
    dm.setup("fit")
    with pytest.raises(ValueError) as err:
        check_datamodule_prompts(tok, dm, chat_template=None, max_prompt_length=64)
    assert str(err.value) == (f"{path}:4: the chat template rejects this prompt: "
                              "Conversation roles must alternate user/assistant")
    assert isinstance(err.value, _STARTUP_ERRORS)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    path = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    dm = PromptDataModule(task=None, train_files=[path], batch_size=1, system_prompt="Be brief.")
    dm.setup("fit")
    with pytest.raises(ValueError, match=rf"^{path}:1: the chat template rejects this prompt: System role not "
                                         r"supported \(data\.system_prompt adds a system message"):
        check_datamodule_prompts(tok, dm, chat_template=None, max_prompt_length=64)


def test_chat_template_required_without_one_names_the_setting():
    from lit_covrl.policy import load_tokenizer

    with pytest.raises(ValueError, match=r"^model\.rollout\.chat_template is true but the tokenizer has no "):
        encode_prompts(load_tokenizer("lit_covrl:tiny-arith"), ["1+1="], chat_template=True)


def test_the_byo_task_never_trains_on_its_held_out_prompts():
    from examples.byo.my_task import ThreeDigitSums

    dm = PromptDataModule(task=ThreeDigitSums(max_digit=9), batch_size=16, val_size=64, val_batch_size=64)
    dm.setup("fit")
    val = {p for b in dm.val_dataloader() for p in b.prompts}
    train = {p for k in range(50) for p in dm.batch_at(k).prompts}
    assert len(val) > 20 and len(train) > 500 and not val & train


class SevenTask:
    name = "sevens"

    def __init__(self, times=1):
        self.times = times

    def sample(self, rng):
        a = rng.randint(0, 9)
        return Example(f"{a}*{self.times}=", str(a * self.times))


def test_task_by_class_path_string_and_object():
    dm = PromptDataModule(task="tests.test_byo_data.SevenTask", task_kwargs={"times": 7}, val_size=3, batch_size=2)
    assert isinstance(dm.task, SevenTask) and dm.task.times == 7
    b = dm.batch_at(0)
    assert all(int(p.split("*")[0]) * 7 == int(a) for p, a in zip(b.prompts, b.answers))
    dm2 = PromptDataModule(task=SevenTask(3), val_size=3, batch_size=2)
    assert dm2.hparams.task == "tests.test_byo_data.SevenTask"  # plain data in hparams
    with pytest.raises(ValueError, match="cannot import"):
        PromptDataModule(task="tests.test_byo_data.NoSuchTask")
    with pytest.raises(ValueError, match="no sample"):
        PromptDataModule(task=object())


def test_task_by_class_path_through_the_cli(tmp_path):
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.module import GRPOModule
    from tests.test_configs import QUICK

    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False, args=[
        "--config", str(QUICK), "--data.task", '{"class_path": "tests.test_byo_data.SevenTask", "init_args": {"times": 4}}',
        "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert isinstance(cli.datamodule.task, SevenTask) and cli.datamodule.task.times == 4


@pytest.mark.parametrize("flags", [
    ["--data.task.class_path", "tests.test_byo_data.SevenTask", "--data.task.init_args.times", "4"],
    ["--data.task", "tests.test_byo_data.SevenTask", "--data.task_kwargs", "{times: 4}"],
    ["--data.task", "{class_path: tests.test_byo_data.SevenTask, init_args: {times: 4}}"],
])
def test_every_command_line_form_of_a_class_path_task(tmp_path, flags):
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.module import GRPOModule
    from tests.test_configs import QUICK

    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                      args=["--config", str(QUICK), *flags, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert isinstance(cli.datamodule.task, SevenTask) and cli.datamodule.task.times == 4
    assert cli.datamodule.hparams.task == "tests.test_byo_data.SevenTask"


def test_a_task_mapping_given_as_text_is_named_by_its_class_in_hparams():
    dm = PromptDataModule(task="{class_path: tests.test_byo_data.SevenTask, init_args: {times: 4}}", val_size=3)
    assert dm.task.times == 4 and dm.hparams.task == "tests.test_byo_data.SevenTask"  # was 'builtins.str'


class RenamedTask(SevenTask):
    """sample's argument under another name: any task with a one-argument sample is one."""

    def sample(self, r):
        return super().sample(r)


class NotATask:
    name = "two_args"

    def __init__(self, times=1):
        self.times = times

    def sample(self, rng, extra):  # cannot be called with the rng alone
        return None


def test_a_yaml_class_path_task_is_checked_by_its_sample_method_not_its_argument_names(tmp_path, capsys):
    """`data.task` is typed with the Task protocol: the CLI compared sample's parameter names too,
    refusing `sample(self, r)` with a paragraph of union alternatives; a task whose sample cannot
    take the rng alone is refused at start-up in one line (it failed at the first rollout)."""
    from lit_covrl.cli import LitCovRLCLI, main
    from lit_covrl.module import GRPOModule
    from tests.test_configs import QUICK

    overlay = tmp_path / "task.yaml"
    overlay.write_text("data:\n  task:\n    class_path: tests.test_byo_data.RenamedTask\n    init_args: {times: 4}\n")
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False,
                      args=["--config", str(QUICK), "--config", str(overlay), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert isinstance(cli.datamodule.task, RenamedTask) and cli.datamodule.task.times == 4
    overlay.write_text("data:\n  task:\n    class_path: tests.test_byo_data.NotATask\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(QUICK), "--config", str(overlay), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "lit-covrl: error: data.task: tests.test_byo_data.NotATask is not a task: it needs a method sample(rng)")


@pytest.mark.parametrize("text, match", [
    ("{init_args: {times: 4}}", "must be {class_path"),
    ("{class_path: tests.test_byo_data.SevenTask, init_args: 4}", "init_args must be a mapping"),
    ("{class_path: [", "not a valid mapping"),
])
def test_a_malformed_task_mapping_is_named(text, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(task=text)


def test_every_skipped_row_is_listed_in_the_log_folder(tmp_path, tiny_model_dir, caplog):
    import lightning as L

    from tests.test_module import make_module

    rows = [{"prompt": "1+1=", "answer": "2"}] + [{"prompt": f"{i}+"} for i in range(8)] + ["{bad json"]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    dm = PromptDataModule(task=None, train_files=[path], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="t"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        trainer.fit(make_module(tiny_model_dir, rollout=dict(max_new_tokens=2)), dm)
    listed = (tmp_path / "t" / "version_0" / "skipped_rows.txt").read_text().splitlines()
    assert listed == [f"{path}:{n}: missing field 'answer'" for n in range(2, 10)] + [f"{path}:10: invalid JSON "
                                                                                      + listed[-1].split("invalid JSON ")[1]]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("skipping malformed row" in w for w in warnings) == 5  # the first five, then ...
    assert any("skipped 9 malformed rows in all" in w for w in warnings)
    assert any(f"all 9 skipped rows (file:line: reason) are listed in {tmp_path / 't' / 'version_0' / 'skipped_rows.txt'}" in w
               for w in warnings)


# ----------------------------------------------------------------------------- generation


def test_eos_ids_come_from_the_generation_config_and_the_tokenizer():
    class Cfg:
        eos_token_id = [7, 3]

    class Model:
        generation_config = Cfg()

    class Tok:
        eos_token_id = 3

    assert eos_token_ids(Model(), Tok()) == [7, 3]
    Cfg.eos_token_id = 9
    assert eos_token_ids(Model(), Tok()) == [9, 3]
    assert eos_token_ids(object(), Tok()) == [3]


def test_sampler_stops_on_every_eos_id_of_the_generation_config(tiny_model_dir):
    from tests.test_module import make_module

    module = make_module(tiny_model_dir, rollout=dict(max_new_tokens=8))
    module.configure_model()
    tok = module.tokenizer
    five = tok.convert_tokens_to_ids("5")
    module.policy.generation_config.eos_token_id = [five]  # the tokenizer's <eos> still counts too
    out = module.generate(["1+2=", "7+8="], 32, temperature=1.0, generator=torch.Generator().manual_seed(0))
    ends = 0
    for row, m in zip(out.input_ids[:, -8:], out.response_mask.bool()):
        kept = row[m].tolist()
        stops = [i for i, t in enumerate(kept) if t in (five, tok.eos_token_id)]
        assert stops in ([], [len(kept) - 1])  # a stop id only as the last kept token
        ends += kept[-1] == five
    assert ends > 0  # some rows did end on the config's extra id


def _rollout(tok, responses: list[str], width: int, truncated: list[bool]) -> tuple[Rollout, int]:
    prompt = torch.tensor([[tok.convert_tokens_to_ids("1")]] * len(responses))
    rows, masks = [], []
    for r in responses:
        ids = tok(r, add_special_tokens=False)["input_ids"]
        rows.append(ids + [tok.pad_token_id] * (width - len(ids)))
        masks.append([1.0] * len(ids) + [0.0] * (width - len(ids)))
    resp, m = torch.tensor(rows), torch.tensor(masks)
    return Rollout(torch.cat([prompt, resp], 1), torch.cat([torch.ones_like(prompt), m.long()], 1), m,
                   torch.full_like(m, -0.5) * m, torch.full_like(m, 2.0) * m, torch.tensor(truncated)), 1


def test_stop_strings_cut_the_response_after_the_completing_token(chat_tokenizer):
    tok = chat_tokenizer
    eos = tok.eos_token
    r, p = _rollout(tok, ["12+34+5", "12345", "7==8" + eos, "==", "9==" + eos], 8, [True, True, False, True, False])
    truncate_at_stop_strings(r, tok, p, ["+", "=="], tok.pad_token_id)
    # row 0: "+" completes at token 3 -> keep "12+"; row 1: no stop string, unchanged (truncated);
    # row 2: "==" completes at token 3 -> keep "7==" (its EOS dropped); row 3: "==" is the whole response;
    # row 4: only the EOS that ended the row follows "==": kept whole, EOS included (it stays in the loss)
    assert r.response_mask.sum(1).tolist() == [3, 5, 3, 2, 4]
    assert tok.batch_decode(r.input_ids[:, p:], skip_special_tokens=True) == ["12+", "12345", "7==", "==", "9=="]
    assert r.input_ids[4, p + 3].item() == tok.eos_token_id
    assert r.truncated.tolist() == [False, True, False, False, False]
    assert r.attention_mask[:, p:].float().equal(r.response_mask)
    assert r.logp.equal(-0.5 * r.response_mask) and r.entropy.equal(2.0 * r.response_mask)


def test_a_stop_string_that_is_a_special_token_stops_the_row():
    """`<|im_end|>` as a stop string with a base model whose EOS is another token: it is an added
    special token, and decoding without special tokens never showed it (the row ran on)."""
    from lit_covrl.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer("0123456789+=ab")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    r, p = _rollout(tok, ["12<|im_end|>ab", "1=2"], 8, [True, True])
    truncate_at_stop_strings(r, tok, p, ["<|im_end|>", "="], tok.pad_token_id)
    assert r.response_mask.sum(1).tolist() == [3, 2]  # "12<|im_end|>" and "1="
    assert tok.decode(r.input_ids[0, p:p + 3]) == "12<|im_end|>"
    assert r.truncated.tolist() == [False, False]


def test_stop_strings_through_the_module(tiny_model_dir):
    from tests.test_module import make_module

    module = make_module(tiny_model_dir, rollout=dict(max_new_tokens=8, stop=["1"]))
    module.configure_model()
    out = module.generate(["1+2=", "7+8="], 16, temperature=1.0, generator=torch.Generator().manual_seed(1))
    for text, n in zip(out.completions, out.response_mask.sum(1).tolist()):
        assert "1" not in text[:-1] and len(text) <= n  # nothing kept after the first "1"
    assert any(t.endswith("1") for t in out.completions)


def test_settings_the_chosen_source_ignores_are_warned_or_refused(tmp_path):
    """A run that silently did not do what its config says (review byo21): val_size with prompt
    files (no held-out prompts: no validation), task_kwargs without a task, prompt/answer fields
    with a task are warned; hf_config / hf_train_split without hf_dataset are refused like
    hf_val_split. The defaults warn nothing."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "answer": "1"}])
    with pytest.warns(UserWarning, match=r"data.val_size=64 draws held-out prompts from a synthetic task, and this run "
                                         r"reads its prompts from files or a HF dataset: it has no held-out prompts"):
        PromptDataModule(task=None, train_files=[path])
    with pytest.warns(UserWarning, match=r"data.task_kwargs=\{'digits': 3\} is ignored: data.task is null"):
        PromptDataModule(task=None, train_files=[path], task_kwargs={"digits": 3}, val_size=0)
    with pytest.warns(UserWarning, match=r"data.answer_field='solution' is ignored: a synthetic task"):
        PromptDataModule(answer_field="solution")
    for key in ("hf_config", "hf_train_split"):
        with pytest.raises(ValueError, match=rf"^{key} needs hf_dataset$"):
            PromptDataModule(task=None, train_files=[path], val_size=0, **{key: "x"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PromptDataModule()
        PromptDataModule(task=None, train_files=[path], val_size=0)
        PromptDataModule(task=None, train_files=[path], val_files=[path])
