"""Runs every `lit-covrl` command of the README section "Bring your own reward, data and model"
(short: 2 RL steps, logs under tmp) and checks what each example is for."""
from __future__ import annotations

import json
import re
import shlex
import string
from pathlib import Path

import pytest
import torch

from lit_covrl.cli import main
from tests.helpers import scalar_tags

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Bring your own reward, data and model"


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(line)[1:] for block in blocks for line in block.splitlines() if line.startswith("lit-covrl ")]


COMMANDS = readme_commands()
FITS = {next(a for a in cmd if a.startswith("examples/")).split("/")[-1]: cmd for cmd in COMMANDS if cmd[0] == "fit"}


def test_the_section_lists_every_example_config():
    on_disk = {p.name for p in (ROOT / "examples" / "byo").glob("*.yaml")}
    assert set(FITS) == on_disk == {"rewards.yaml", "data.yaml", "task.yaml", "chat.yaml", "regularizer.yaml"}
    assert [cmd[0] for cmd in COMMANDS].count("export") == 1


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Qwen2 whose character tokenizer has a chat template (for chat.yaml)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lit_covrl.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny_chat")
    tok = build_char_tokenizer("".join(c for c in string.printable if c not in "\t\n\r\x0b\x0c"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def at_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's commands run from the repository root


def run(cmd: list[str], log_dir: Path, *extra: str) -> Path:
    main([*cmd, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1000",
          "--trainer.logger.init_args.save_dir", str(log_dir), *extra])
    return next(p for p in log_dir.rglob("*-v0") if p.is_dir())  # runs are named <method>-<config>-v<N>


def test_rewards_example_logs_each_reward_and_their_weighted_sum(tmp_path):
    run(FITS["rewards.yaml"], tmp_path)
    tags = scalar_tags(tmp_path)
    parts = {k: dict(tags[f"rollout/reward/{k}"]) for k in ("exact", "length_penalty", "all_digits")}
    total = dict(tags["rollout/reward_mean"])
    assert len(total) == 2 and all(len(p) == 2 for p in parts.values())
    for step, value in total.items():  # weights 1.0, 0.1, 0.1 from the YAML
        expected = parts["exact"][step] + 0.1 * parts["length_penalty"][step] + 0.1 * parts["all_digits"][step]
        assert value == pytest.approx(expected, abs=1e-6)
    assert 0 < max(parts["exact"].values()) < 1  # the tiny model answers some prompts right


def test_data_example_reads_nested_answers_and_lists_skipped_rows(tmp_path):
    log_dir = run(FITS["data.yaml"], tmp_path)
    assert (log_dir / "skipped_rows.txt").read_text() == (
        "examples/byo/data.jsonl:4: missing field 'reward_model.ground_truth'\n")
    tags = scalar_tags(tmp_path)
    assert set(v for _, v in tags["data/skipped_rows"]) == {1.0}
    assert len(tags["rollout/reward/close_enough"]) == 2


def test_task_example_trains_on_the_custom_task(tmp_path, monkeypatch):
    from examples.byo.my_task import ThreeDigitSums

    seen = []
    sample = ThreeDigitSums.sample
    monkeypatch.setattr(ThreeDigitSums, "sample", lambda self, rng: seen.append(1) or sample(self, rng))
    run(FITS["task.yaml"], tmp_path)
    assert len(seen) >= 2 * 16  # two RL steps of 16 prompts came from the task
    rewards = [v for _, v in scalar_tags(tmp_path)["rollout/reward_mean"]]
    assert len(rewards) == 2 and max(rewards) > 0  # the tiny model answers some: the example can learn


def test_task_example_takes_an_init_arg_from_the_command_line(tmp_path, monkeypatch):
    """The YAML's comment: one constructor argument of a class_path task overridden by flag (it
    arrived as a bare NestedArg when data.task was typed Any: 'NestedArg has no sample(rng)')."""
    from examples.byo.my_task import ThreeDigitSums

    built = []
    init = ThreeDigitSums.__init__
    monkeypatch.setattr(ThreeDigitSums, "__init__", lambda self, **kw: built.append(kw) or init(self, **kw))
    run(FITS["task.yaml"], tmp_path, "--data.task.init_args.max_digit", "5")
    assert built and built[-1] == {"max_digit": 5}


def test_chat_example_and_export(tmp_path, tiny_chat_model, monkeypatch):
    from lit_covrl import generation

    rendered = []
    encode = generation.encode_prompts
    monkeypatch.setattr(generation, "encode_prompts", lambda tok, prompts, **kw: rendered.extend(prompts) or encode(tok, prompts, **kw))
    log_dir = run(FITS["chat.yaml"], tmp_path, "--model.model", tiny_chat_model)
    system = {"role": "system", "content": "Answer with the number only."}

    def user(text):
        return {"role": "user", "content": text}

    # conversations as in the file; string prompts get data.system_prompt before them
    expected = [[system, user("What is 12+7?")], [user("What is 30+45?")], [system, user("What is 8+8?")],
                [system, user("What is 61+19?")]]
    assert {json.dumps(p) for p in rendered} == {json.dumps(p) for p in expected}

    export = next(cmd for cmd in COMMANDS if cmd[0] == "export")
    main([export[0], str(log_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "hf")])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.vocab_size > 90
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template is not None


def test_regularizer_example_anneals_its_coefficient_and_logs_under_its_name(tmp_path):
    log_dir = run(FITS["regularizer.yaml"], tmp_path)
    assert log_dir.name.startswith("sampled_token_penalty-")
    tags = scalar_tags(tmp_path)
    # linear from 0.02 to 0 over the whole run (2 steps): 0.02 at step 0, 0 at the last step
    assert [round(v, 6) for _, v in tags["reg/sampled_token_penalty/coef"]] == [0.02, 0.0]
    assert len(tags["reg/sampled_token_penalty/loss"]) == 2


def test_section_claims_about_built_in_rewards_optimizer_and_lr_schedule_hold(tiny_model_dir):
    """The built-in rewards paragraph's worked answer, the default optimizer and the warm-up YAML
    example, read from the section itself."""
    import importlib

    import yaml

    from lit_covrl.module import GRPOModule
    from lit_covrl.rewards import ExactMatchReward, MathVerifyReward

    section = (ROOT / "README.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    worked, answer = re.search(r"a worked answer \(`(.+?)` against `(.+?)`\) scores 0", section.replace("\n", " ")).groups()
    assert ExactMatchReward()(worked, answer) == 0.0 and MathVerifyReward()(worked, answer) == 1.0

    assert "AdamW, lr 1e-5, weight decay 0" in section
    module = GRPOModule(model=tiny_model_dir)
    module.configure_model()
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-5 and opt.defaults["weight_decay"] == 0.0

    example = yaml.safe_load(re.search(r"```yaml\n(model:\n  lr_scheduler:.*?)```", section, flags=re.S).group(1))
    assert "the full lr from step 10" in section
    spec = example["model"]["lr_scheduler"]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    module_name, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    scheduler, lrs = cls(opt, **spec["init_args"]), []
    for _ in range(12):  # the module steps it once per RL step
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5) and lrs[5] == pytest.approx(5.5e-5) and lrs[10:] == pytest.approx([1e-4] * 2)


SEEN_PROMPTS: list = []


def km_in_prompt(completion: str, answer: str, prompt) -> float:
    """A reward reading its prompt's text (test below)."""
    SEEN_PROMPTS.append(prompt)
    return float("km" in prompt)


def test_rewards_get_the_data_s_prompt_when_a_system_prompt_is_shown(tiny_chat_model, tmp_path):
    """With data.system_prompt the policy sees [system, user] messages, but a reward's `prompt` is
    still the row's string: a reward testing `"km" in prompt` scored 0 on every row (it got the
    message list; review byo21)."""
    data = tmp_path / "km.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} km + 1 km =", "answer": str(a + 1)}) + "\n" for a in range(8)))
    SEEN_PROMPTS.clear()
    log_dir = run(["fit", "--config", "configs/quickstart.yaml"], tmp_path, "--data.task", "null",
                  "--data.train_files", f"[{data}]", "--data.val_size", "0", "--data.batch_size", "4",
                  "--model.model", tiny_chat_model, "--model.reward", "tests.test_byo_readme.km_in_prompt",
                  "--data.system_prompt", "Be brief.", "--trainer.limit_val_batches", "0")
    assert SEEN_PROMPTS and all(isinstance(p, str) and p.endswith(" km + 1 km =") for p in SEEN_PROMPTS)
    assert [v for _, v in scalar_tags(log_dir)["rollout/reward_mean"]] == [1.0, 1.0]
