"""Faults are survived or stop the run cleanly: non-finite updates, bad settings, OOM messages."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lit_covrl.regularizers.base import Regularizer
from lit_covrl.types import TokenShaping
from tests.helpers import fit, scalar_tags
from tests.test_module import make_data, make_module


class NaNPenalty(Regularizer):
    """Poisons the loss of the first `bad_updates` optimizer updates."""

    default_name = "nan"

    def __init__(self, bad_updates: int) -> None:
        super().__init__()
        self.bad_updates, self.calls = bad_updates, 0

    def prepare(self, ctx) -> None:
        self.calls += 1

    def shape(self, batch) -> TokenShaping:
        value = float("nan") if self.calls <= self.bad_updates else 0.0
        return TokenShaping(penalty=batch.logp * value)


def test_non_finite_update_is_skipped_whole_and_counted(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2))  # 2 updates per rollout
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = fit(module, make_data(), steps=1, callbacks=[NaNPenalty(bad_updates=2)], log_dir=tmp_path,
                  limit_val_batches=0)
    assert trainer.global_step == 1  # the RL step still counts
    for k, v in module.policy.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although every update was skipped"
    assert scalar_tags(tmp_path)["policy/skipped_steps"][-1][1] == 2
    # AdamW state was never touched either
    assert all(not s for s in trainer.optimizers[0].state.values())


def test_training_continues_after_a_transient_bad_update(tiny_model_dir):
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2))
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    fit(module, make_data(), steps=2, callbacks=[NaNPenalty(bad_updates=1)], limit_val_batches=0)
    assert module.skipped_steps == 1
    assert any(not torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())


def test_too_many_consecutive_bad_updates_stop_with_a_checkpoint(tiny_model_dir, tmp_path):
    """2 updates per RL step, all non-finite, stop after 3: in the middle of step 1 (0-based). The
    message names the step-1 checkpoint to resume from, not the stop file, which holds a state
    taken mid-step (its prompt batch already counted as used)."""
    from lit_covrl.checkpointing import AtomicCheckpoint

    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2, max_consecutive_skips=3))
    ck = AtomicCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="3 consecutive optimizer updates had non-finite gradients") as err:
        fit(module, make_data(), steps=5, callbacks=[NaNPenalty(bad_updates=100), ck], limit_val_batches=0,
            default_root_dir=str(tmp_path), enable_checkpointing=True)
    assert f"Resume from the last checkpoint: {tmp_path / 'ck' / 'last.ckpt'}" in str(err.value)
    assert "in the middle of RL step 1" in str(err.value)
    assert f"saved for inspection to {tmp_path / 'ck' / 'nonfinite-stop.ckpt'}." in str(err.value)
    ckpt = torch.load(tmp_path / "ck" / "nonfinite-stop.ckpt", weights_only=False)
    assert ckpt["skipped_steps"] == 3
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)["global_step"] == 1


def test_the_cli_saves_the_stop_state_in_the_runs_checkpoint_folder(tmp_path, monkeypatch):
    """`lit-covrl fit` started from another folder: nonfinite-stop.ckpt went to the working
    directory (Lightning's default_root_dir), where the next stopped run overwrote it."""
    from lit_covrl.cli import main

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    poison = '{"class_path": "tests.test_reliability.NaNPenalty", "init_args": {"bad_updates": 100}}'
    with pytest.raises(RuntimeError, match="2 consecutive optimizer updates had non-finite gradients") as err:
        main(["fit", "--config", str(root / "configs/quickstart.yaml"), "--torch_threads", "1",
              f"--trainer.callbacks+={poison}", "--model.update.max_consecutive_skips", "2",
              "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    (saved,) = (tmp_path / "runs").rglob("nonfinite-stop.ckpt")
    assert saved.parent.name == "checkpoints" and f"saved for inspection to {saved}." in str(err.value)
    assert not list((tmp_path / "cwd").iterdir())


class NaNAt(Regularizer):
    """Poisons the loss of the listed (RL step, update within the step) pairs."""

    default_name = "nan_at"

    def __init__(self, bad) -> None:
        super().__init__()
        self.bad, self.step, self.k = set(bad), None, -1

    def prepare(self, ctx) -> None:
        self.step, self.k = ctx.step, (self.k + 1 if ctx.step == self.step else 0)

    def shape(self, batch) -> TokenShaping:
        return TokenShaping(penalty=batch.logp * (float("nan") if (self.step, self.k) in self.bad else 0.0))


def test_a_run_resumed_inside_a_run_of_skips_stops_where_the_uninterrupted_run_stops(tiny_model_dir, tmp_path):
    """2 updates per RL step; step 1's two updates and step 2's first are non-finite: 3 in a row stop
    the run in RL step 2. Resumed from the step-2 checkpoint (2 in a row so far), the same run stops at
    the same update; the count of the run of skips used to restart at 0 and the resumed run trained on."""
    from lit_covrl.checkpointing import AtomicCheckpoint

    bad, kw = {(1, 0), (1, 1), (2, 0)}, dict(update=dict(mini_batch_size=2, max_consecutive_skips=3))
    stop = r"3 consecutive optimizer updates had non-finite gradients .* in the middle of RL step 2"
    ck = AtomicCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match=stop):
        fit(make_module(tiny_model_dir, **kw), make_data(), steps=5, callbacks=[NaNAt(bad), ck],
            limit_val_batches=0, default_root_dir=str(tmp_path / "a"), enable_checkpointing=True)
    resumed = make_module(tiny_model_dir, **kw)
    with pytest.raises(RuntimeError, match=stop) as err:
        fit(resumed, make_data(), steps=5, callbacks=[NaNAt(bad)], limit_val_batches=0,
            default_root_dir=str(tmp_path / "b"), ckpt_path=str(tmp_path / "ck" / "epoch=0-step=2.ckpt"))
    assert resumed.skipped_steps == 3
    # nothing saved since the resume: the file it resumed from is the one to resume from (was 'none saved yet')
    assert f"Resume from the last checkpoint: {tmp_path / 'ck' / 'epoch=0-step=2.ckpt'}." in str(err.value)
    step2 = torch.load(tmp_path / "ck" / "epoch=0-step=2.ckpt", weights_only=False)
    assert (step2["skipped_steps"], step2["consecutive_skips"]) == (2, 2)


class PoisonAfter(torch.optim.SGD):
    """SGD whose step writes a NaN into one weight from its `bad_from`-th call on (finite gradients,
    non-finite weights: what float16 AdamW state does)."""

    def __init__(self, params, bad_from: int) -> None:
        super().__init__(params, lr=1e-4)
        self.bad_from, self.calls = bad_from, 0

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        self.calls += 1
        if self.calls >= self.bad_from:
            self.param_groups[0]["params"][3].view(-1)[0] = float("nan")
        return out


def test_non_finite_weights_after_an_update_stop_the_run_before_they_are_saved(tiny_model_dir, tmp_path):
    """Finite gradients, NaN weights after the step: the run went on to save them at the step's end
    and stopped one step later calling that checkpoint 'Last good checkpoint'."""
    from lit_covrl.checkpointing import AtomicCheckpoint

    module = make_module(tiny_model_dir, optimizer=lambda p: PoisonAfter(p, bad_from=3))  # RL step 2's update
    ck = AtomicCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match=r"non-finite weights \(NaN or inf\) after the updates of RL step 2 "
                                           r"\(parameter '.+' on rank 0\); the run is stopped before saving them") as err:
        fit(module, make_data(), steps=5, callbacks=[ck], limit_val_batches=0, default_root_dir=str(tmp_path),
            enable_checkpointing=True)
    assert f"Last good checkpoint: {tmp_path / 'ck' / 'last.ckpt'}" in str(err.value)
    saved = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_float16_weights_with_adamw_are_refused_before_the_first_update(tiny_model_dir):
    """AdamW's state in float16 (eps 1e-8 rounds to 0, squared gradients underflow): the first
    update turned every weight to NaN, and the run saved them."""
    with pytest.raises(ValueError, match=r"AdamW on float16 weights \(model.dtype: float16 or trainer.precision: "
                                         r"16-true\): its state underflows"):
        fit(make_module(tiny_model_dir, dtype="float16"), make_data(), steps=1, limit_val_batches=0)
    module = make_module(tiny_model_dir, dtype="float16", optimizer=lambda p: torch.optim.SGD(p, lr=1e-4))
    fit(module, make_data(), steps=1, limit_val_batches=0)  # no second-moment state: allowed


@pytest.mark.parametrize("lr", [1e-4, 1e-5, 2e-6, 5e-7])
def test_the_bf16_rounded_away_count_matches_adding_the_step_and_rounding(lr):
    """The start-up warning's fraction against brute force: w + lr rounded to bfloat16 == w."""
    from lit_covrl.startup_checks import _rounded_away

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(50_000, generator=g) * torch.logspace(-5, 0, 50_000)).bfloat16()
    unchanged = int(((w.float() + lr).bfloat16() == w).sum())  # positive step: ties to even aside
    lost, total = _rounded_away([w], lr, chunk=4096)
    assert total == w.numel() and abs(lost - unchanged) <= 0.002 * total, (lost, unchanged)
    assert 0 < lost < total


def test_bf16_weights_warn_how_many_updates_round_away(tiny_model_dir):
    """bfloat16 weights with no float32 copy: at RL learning rates most of an AdamW step rounds away
    (lr 1e-5 changed ~10 % of the tiny model's weights); the float16 refusal used to recommend them."""
    with pytest.warns(UserWarning, match=r"training bfloat16 weights .* At lr=1e-05 the first AdamW step \(about lr "
                                         r"per weight\) would leave \d+% of them unchanged"):
        fit(make_module(tiny_model_dir, dtype="bfloat16", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5)),
            make_data(), steps=1, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="training bfloat16 weights")
        fit(make_module(tiny_model_dir, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5)), make_data(), steps=1,
            limit_val_batches=0, precision="bf16-mixed")
        fit(make_module(tiny_model_dir, dtype="bfloat16"), make_data(), steps=1, limit_val_batches=0)  # lr 0.03


def test_out_of_memory_in_a_rollout_names_the_settings_to_lower(tiny_model_dir, monkeypatch):
    module = make_module(tiny_model_dir)
    module.configure_model()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(module.generation, "sample", oom)
    with pytest.raises(torch.OutOfMemoryError, match="Set model.rollout.sampling_batch_size, or lower data.batch_size, model.rollout.group_size or model.rollout.max_new_tokens"):
        module.generate(["1+1="], 2, temperature=1.0, generator=torch.Generator())


def test_an_overlong_prompt_in_a_data_file_fails_at_start_up(tiny_model_dir, tmp_path):
    import json

    from lit_covrl.data import PromptDataModule

    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ["1+0=", "1+" * 40 + "0="]))
    module = make_module(tiny_model_dir, rollout=dict(max_prompt_length=16))
    data = PromptDataModule(task=None, train_files=[str(rows)], batch_size=2)
    with pytest.raises(ValueError, match=r"has 82 tokens > max_prompt_length=16"):
        fit(module, data, steps=1)
    assert module.global_step == 0  # nothing ran
    ok = make_module(tiny_model_dir, rollout=dict(max_prompt_length=16, prompt_overflow="truncate_left"))
    fit(ok, PromptDataModule(task=None, train_files=[str(rows)], batch_size=2), steps=1, limit_val_batches=0)


def test_a_tokenizer_with_ids_the_model_cannot_embed_fails_at_start_up(tiny_model_dir, tmp_path):
    """A tokenizer of another model (here 26 more characters than the tiny model embeds) passed every
    start-up check and failed inside the first rollout with a bare IndexError (on CUDA a device-side
    assert). A model whose own folder holds a longer tokenizer is named the same way."""
    import shutil

    from lit_covrl.tokenizer import build_char_tokenizer

    big = build_char_tokenizer("0123456789+-=abcdefghijklmnopqrstuvwxyz")
    big.save_pretrained(tmp_path / "big_tok")
    weights = _weights_only(tiny_model_dir, tmp_path / "weights")  # no tokenizer of its own to compare with
    module = make_module(weights, tokenizer=str(tmp_path / "big_tok"))
    with pytest.raises(ValueError, match=r"model.tokenizer='.*big_tok' has \d+ tokens, but the model of model.model=.* embeds only"):
        fit(module, make_data(), steps=1, limit_val_batches=0)

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, folder)
    big.save_pretrained(folder)  # the folder's own tokenizer no longer matches its weights
    with pytest.raises(ValueError, match=r"model.model='.*mixed': its tokenizer has \d+ tokens, but its model embeds only"):
        fit(make_module(str(folder)), make_data(), steps=1, limit_val_batches=0)


def _weights_only(model_dir, folder) -> str:
    """A copy of the model folder without its tokenizer files."""
    import shutil

    from lit_covrl.vocab_check import TOKENIZER_FILES

    shutil.copytree(model_dir, folder)
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja"):
        (Path(folder) / name).unlink(missing_ok=True)
    return str(folder)


def _other_vocab(model_dir, folder) -> str:
    """A copy of the model folder (same weights, same number of tokens) whose own tokenizer gives its
    characters other ids: the digits reversed."""
    from lit_covrl.tokenizer import build_char_tokenizer

    _weights_only(model_dir, folder)
    build_char_tokenizer("9876543210+-=").save_pretrained(folder)
    return str(folder)


def test_a_reference_model_or_tokenizer_of_another_vocabulary_fails_at_start_up(tiny_model_dir, tmp_path):
    """A reference model whose own tokenizer gives the characters other ids, with as many embedding
    rows, passed start-up: ReferenceKL then compared the policy's tokens with unrelated ones of the
    reference (review byo25 F15). The same for model.tokenizer beside a policy folder with its own
    tokenizer. A reference of weights only (no tokenizer to compare) and a tokenizer of the same
    vocabulary saved elsewhere pass."""
    from lit_covrl.policy import load_tokenizer
    from lit_covrl.regularizers import ReferenceKL

    other = _other_vocab(tiny_model_dir, tmp_path / "other")
    module = make_module(tiny_model_dir, reference_model=other)
    with pytest.raises(ValueError, match=r"model.reference_model='.*other' has another vocabulary than the policy's "
                                         r"tokenizer \(model.model='.*'\): 17 tokens vs the policy's 17, '0' is id 13 "
                                         r"there and 4 in the policy's"):
        fit(module, make_data(), steps=1, callbacks=[ReferenceKL(beta=0.1)], limit_val_batches=0)
    with pytest.raises(ValueError, match=r"model.model='.*tiny_qwen2.*' has another vocabulary than the policy's "
                                         r"tokenizer \(model.tokenizer='.*other'\)"):
        make_module(tiny_model_dir, tokenizer=other).tokenizer
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "same")
    with pytest.raises(ValueError, match=r"model.reference_model=.* \(model.tokenizer=.*same'\)"):
        fit(make_module(tiny_model_dir, tokenizer=str(tmp_path / "same"), reference_model=other), make_data(),
            steps=1, callbacks=[ReferenceKL(beta=0.1)], limit_val_batches=0)

    weights = _weights_only(tiny_model_dir, tmp_path / "weights")
    module = make_module(tiny_model_dir, tokenizer=str(tmp_path / "same"), reference_model=weights)
    fit(module, make_data(), steps=1, callbacks=[ReferenceKL(beta=0.1)], limit_val_batches=0)
    assert module.global_step == 1


def test_a_reference_model_with_a_smaller_vocabulary_fails_at_start_up(tiny_model_dir, tmp_path):
    """The policy's vocabulary was checked, the reference's not: a reference embedding fewer tokens
    than the tokenizer failed at step 1 inside the reference forward with a bare IndexError."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_covrl.regularizers import ReferenceKL

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.vocab_size = 10
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "small")
    module = make_module(tiny_model_dir, reference_model=str(tmp_path / "small"))
    with pytest.raises(ValueError, match=r"model.reference_model='.*small' embeds only 10 tokens, but the policy's "
                                         r"tokenizer has \d+: the reference must share the policy's vocabulary"):
        fit(module, make_data(), steps=1, callbacks=[ReferenceKL(beta=0.1)], limit_val_batches=0)


def test_skips_that_are_not_consecutive_do_not_stop_the_run(tiny_model_dir):
    """2 updates per RL step, the first of each of 3 steps non-finite, the second finite, and
    max_consecutive_skips 2: never 2 in a row, so the run finishes with 3 skipped (a finite update
    restarts the count; review mutation20)."""
    module = make_module(tiny_model_dir, update=dict(mini_batch_size=2, max_consecutive_skips=2))
    fit(module, make_data(), steps=3, callbacks=[NaNAt({(0, 0), (1, 0), (2, 0)})], limit_val_batches=0)
    assert module.skipped_steps == 3



def test_a_qwen2_folder_whose_tokenizer_has_no_pad_token_loads_as_saved(tmp_path):
    """A Qwen2 model folder made with save_pretrained from a byte-level BPE tokenizer without a pad
    token: transformers' Qwen2Tokenizer (what AutoTokenizer builds for model_type qwen2) adds
    <|endoftext|> as the pad token, a 265th token the 264-row embedding lacks, and start-up refused
    the folder as 'tokenizer and weights do not belong together' (review byo21). The tokenizer is
    now the folder's own (264 tokens, pad := eos) and the folder passes the vocabulary check."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from lit_covrl.policy import load_tokenizer
    from lit_covrl.vocab_check import check_vocab

    specials = ["<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert len(loaded) == len(vocab) == 259 and loaded.pad_token == loaded.eos_token == "<eos>"
    check_vocab(loaded, model, str(tmp_path))  # raised before
    assert loaded("ab+1")["input_ids"] == tok("ab+1")["input_ids"]


def test_a_tokenizer_without_eos_takes_the_generation_configs(tiny_model_dir, tmp_path):
    """A tokenizer without eos_token was refused ("responses could never stop") although the model's
    generation_config.json names the eos id the sampler stops at (review byo25 F13): it is that
    token now; without either, the error says how to set one."""
    import json
    import shutil

    from lit_covrl.policy import load_tokenizer

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = tmp_path / "m" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eos_token": None}))
    (tmp_path / "m" / "special_tokens_map.json").unlink(missing_ok=True)
    eos = json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"]
    tok = load_tokenizer(str(tmp_path / "m"))
    assert tok.eos_token_id == eos == load_tokenizer(tiny_model_dir).eos_token_id
    (tmp_path / "m" / "generation_config.json").unlink()
    with pytest.raises(ValueError, match=r"has no eos token, nor does a generation config name one: responses could "
                                         r"never stop; set eos_token in its tokenizer_config.json"):
        load_tokenizer(str(tmp_path / "m"))


CUSTOM_CODE = """from transformers import Qwen2Config, Qwen2ForCausalLM


class TinyCustomConfig(Qwen2Config):
    model_type = "tinycustom"


class TinyCustomForCausalLM(Qwen2ForCausalLM):
    config_class = TinyCustomConfig
"""


def test_a_model_with_its_own_code_loads_only_with_trust_remote_code(tiny_model_dir, tmp_path):
    """A model folder whose config.json maps its classes to its own modeling file stopped start-up
    with transformers' "pass the argument trust_remote_code=True", which no setting passed (and in a
    terminal, a question on stdin; review byo25 F8). model.trust_remote_code (default false) now
    passes it to every load; off, the error names the setting."""
    import json
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "modeling_tinycustom.py").write_text(CUSTOM_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_tinycustom.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.model='.*custom' has its own modeling code \(auto_map in its "
                                         r"config.json\), which runs only with model.trust_remote_code: true"):
        fit(make_module(str(folder)), make_data(), steps=1, limit_val_batches=0)
    module = make_module(str(folder), trust_remote_code=True)
    fit(module, make_data(), steps=1, limit_val_batches=0)
    assert type(module.policy).__name__ == "TinyCustomForCausalLM" and module.global_step == 1
    from lit_covrl.export import export  # the checkpoint's model.trust_remote_code

    state = {"policy." + k: v for k, v in module.policy.state_dict().items()}
    for trusted in (False, True):
        torch.save({"state_dict": state, "hyper_parameters": {"model": str(folder), "trust_remote_code": trusted}},
                   tmp_path / "last.ckpt")
        if not trusted:
            with pytest.raises(ValueError, match="has its own modeling code, which the checkpoint's fit did not trust"):
                export(tmp_path / "last.ckpt", tmp_path / "hf")
    assert json.loads((export(tmp_path / "last.ckpt", tmp_path / "hf") / "config.json").read_text())["auto_map"]

