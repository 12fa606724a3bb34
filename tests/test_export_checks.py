"""`lit-covrl export` refuses what it cannot export faithfully, and exports the base as it is:
weights that do not fit the architecture, an occupied output path, the base's generation config
and tokenizer, GGUF bases loaded directly, one-line errors. Tiny local models only (seconds)."""
from __future__ import annotations

import os

import shutil
from pathlib import Path

import pytest
import torch

from lit_covrl.export import export, main


def _model(base: str, layers: int | None = None, **changes):
    """A random model of `base`'s architecture, optionally with another layer count or width."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(base)
    if layers is not None:
        cfg.num_hidden_layers, cfg.layer_types = layers, ["full_attention"] * layers
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(cfg)


def _checkpoint(path: Path, model, model_spec: str) -> Path:
    state = {"policy." + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": model_spec, "dtype": "float32"}}, path)
    return path


@pytest.fixture
def ckpt(tmp_path, tiny_model_dir):
    return _checkpoint(tmp_path / "last.ckpt", _model(tiny_model_dir), tiny_model_dir)


@pytest.fixture
def base(tmp_path, tiny_model_dir):
    """The tiny model with a generation config of its own (two EOS ids, sampling defaults) and a
    tokenizer that pads on the right and has no pad token: training changes both."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    GenerationConfig(eos_token_id=[3, 5], do_sample=True, temperature=0.7, top_p=0.9).save_pretrained(folder)
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    tok.padding_side, tok.pad_token = "right", None
    tok.save_pretrained(folder)
    return str(folder)


def _error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-covrl: error: ") and "\n" not in err and "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- weights


def test_weights_the_base_architecture_lacks_are_refused(tmp_path, tiny_model_dir):
    """A 3-layer checkpoint exported with a 2-layer --base used to 'succeed' with 2 layers."""
    ckpt = _checkpoint(tmp_path / "big.ckpt", _model(tiny_model_dir, layers=3), tiny_model_dir)
    with pytest.raises(ValueError, match=r"lacks.*model\.layers\.2\."):
        export(ckpt, tmp_path / "hf", base=tiny_model_dir)
    assert not (tmp_path / "hf").exists()


def test_missing_and_misshapen_weights_are_still_refused(tmp_path, tiny_model_dir):
    small = _checkpoint(tmp_path / "small.ckpt", _model(tiny_model_dir, layers=1), tiny_model_dir)
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\."):
        export(small, tmp_path / "hf")
    wide = _checkpoint(tmp_path / "wide.ckpt", _model(tiny_model_dir, intermediate_size=128), tiny_model_dir)
    with pytest.raises(ValueError, match="do not fit"):
        export(wide, tmp_path / "hf")


# ----------------------------------------------------------------------------- the base as it is


def test_the_base_generation_config_is_kept(tmp_path, base):
    from transformers import GenerationConfig

    ckpt = _checkpoint(tmp_path / "last.ckpt", _model(base), base)
    gen = GenerationConfig.from_pretrained(export(ckpt, tmp_path / "hf"))
    assert gen.eos_token_id == [3, 5] and gen.do_sample and gen.temperature == 0.7 and gen.top_p == 0.9


def test_the_tokenizer_is_saved_as_the_base_has_it(tmp_path, base):
    from transformers import AutoTokenizer

    ckpt = _checkpoint(tmp_path / "last.ckpt", _model(base), base)
    tok = AutoTokenizer.from_pretrained(export(ckpt, tmp_path / "hf"))
    assert tok.padding_side == "right" and tok.pad_token is None  # not training's left padding, pad = eos
    assert tok("12+3").input_ids == AutoTokenizer.from_pretrained(base)("12+3").input_ids


def test_a_gguf_base_is_read_directly_when_the_cache_is_off(tmp_path, monkeypatch):
    """LIT_COVRL_GGUF_CACHE=0: the config and tokenizer come from the .gguf file (gguf_file=...),
    as training loaded them; export used to pass the raw .gguf path to AutoConfig."""
    from transformers import AutoModelForCausalLM

    from lit_covrl.policy import load_policy

    monkeypatch.setenv("LIT_COVRL_GGUF_CACHE", "0")
    path = tmp_path / "gg" / "tiny.gguf"
    path.parent.mkdir()
    _write_tiny_gguf(path)
    trained = load_policy(str(path))
    out = export(_checkpoint(tmp_path / "last.ckpt", trained, str(path)), tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(exported[k].equal(v) for k, v in trained.state_dict().items())
    assert (out / "tokenizer.json").is_file() and "gguf" not in (out / "config.json").read_text()


def _write_tiny_gguf(path: Path, hidden: int = 16, layers: int = 2, heads: int = 2, ffn: int = 32) -> None:
    """A float32 llama-architecture GGUF file of a few kB (byte-level BPE vocabulary of 20 tokens)."""
    import gguf
    import numpy as np

    vocab = ["<s>", "</s>", *"abcdefgh 0123456789"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64), w.add_embedding_length(hidden), w.add_block_count(layers)
    w.add_feed_forward_length(ffn), w.add_head_count(heads), w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // heads), w.add_layer_norm_rms_eps(1e-6), w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2"), w.add_token_list(vocab), w.add_token_types([1] * len(vocab))
    w.add_token_scores([0.0] * len(vocab)), w.add_token_merges([]), w.add_bos_token_id(0), w.add_eos_token_id(1)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    kv, ones = hidden // heads, np.ones(hidden, np.float32)
    w.add_tensor("token_embd.weight", rand(len(vocab), hidden))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(len(vocab), hidden))
    for i in range(layers):
        for name, t in [("attn_q", rand(hidden, hidden)), ("attn_k", rand(kv, hidden)), ("attn_v", rand(kv, hidden)),
                        ("attn_output", rand(hidden, hidden)), ("ffn_gate", rand(ffn, hidden)),
                        ("ffn_up", rand(ffn, hidden)), ("ffn_down", rand(hidden, ffn)),
                        ("attn_norm", ones), ("ffn_norm", ones)]:
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- the output path


def test_an_occupied_output_path_is_refused_without_force(tmp_path, ckpt, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "not a folder" in _error(capsys, [str(ckpt), str(a_file)])
    assert a_file.read_text() == "keep me"

    other = tmp_path / "other"
    other.mkdir()
    (other / "chat_template.jinja").write_text("{{ stale }}")
    assert "not empty" in _error(capsys, [str(ckpt), str(other)])
    assert sorted(p.name for p in other.iterdir()) == ["chat_template.jinja"]


def test_force_replaces_the_output_folder_and_an_empty_folder_is_fine(tmp_path, ckpt, capsys):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    other.mkdir()
    (other / "chat_template.jinja").write_text("{{ stale }}")
    (other / "model.safetensors.index.json").write_text("{}")
    main([str(ckpt), str(other), "--force"])
    assert capsys.readouterr().out.strip() == str(other)
    names = {p.name for p in other.iterdir()}
    assert "config.json" in names and not names & {"chat_template.jinja", "model.safetensors.index.json"}
    AutoModelForCausalLM.from_pretrained(other)

    (tmp_path / "empty").mkdir()
    assert (export(ckpt, tmp_path / "empty") / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "last.ckpt", "other"]  # no temporary left


def test_the_export_is_readable_as_any_folder_made_by_hand(tmp_path, ckpt):
    """safetensors writes the weights owner-only (0600): another user of a shared cluster (a vLLM
    server, a teammate) could not load an export whose other files were 0644."""
    umask = os.umask(0o022)
    try:
        out = export(ckpt, tmp_path / "out")
    finally:
        os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_a_failed_export_leaves_the_output_path_as_it_was(tmp_path, ckpt, monkeypatch):
    """The tokenizer is written after the weights: its failure used to leave a folder of weights."""
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    def broken(self, folder, *args, **kwargs):
        raise OSError("disk full")

    for cls in (PreTrainedTokenizerBase, TokenizersBackend):
        monkeypatch.setattr(cls, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, old, force=True)
    assert (old / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "old"]  # nothing half-written


def test_the_checkpoint_itself_is_never_the_output(tmp_path, ckpt):
    with pytest.raises(ValueError, match="checkpoint being exported"):
        export(ckpt, ckpt, force=True)
    assert ckpt.is_file()


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line_with_status_2(tmp_path, ckpt, capsys):
    assert "no such checkpoint" in _error(capsys, [str(tmp_path / "missing.ckpt"), str(tmp_path / "hf")])
    (tmp_path / "a_folder").mkdir()
    assert "not a sharded checkpoint" in _error(capsys, [str(tmp_path / "a_folder"), str(tmp_path / "hf")])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "not a checkpoint file" in _error(capsys, [str(tmp_path / "notes.txt"), str(tmp_path / "hf")])
    assert "int8" in _error(capsys, [str(ckpt), str(tmp_path / "hf"), "--dtype", "int8"])
    assert not (tmp_path / "hf").exists()


def test_an_output_symlink_is_written_through(tmp_path):
    """OUT a link to an empty folder (e.g. on a bigger disk): the export lands in the link's target
    and the link stays (it was replaced by a folder)."""
    from lit_covrl.export import check_out

    target = tmp_path / "disk" / "target"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert check_out(link, tmp_path / "x.ckpt", force=False) == target.resolve()


def test_the_export_stops_at_every_end_of_sequence_id_training_stopped_at(tmp_path, tiny_model_dir):
    """model.tokenizer with another EOS than the base's generation config (a base model trained with
    its Instruct tokenizer): rollouts stopped at both, the export's generate() only at the base's."""
    from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    from lit_covrl.policy import load_policy, load_tokenizer
    from lit_covrl.stopping import eos_token_ids

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    tok.eos_token = tok.bos_token  # another id than the generation config's EOS
    tok.save_pretrained(tmp_path / "tok")
    trained = eos_token_ids(load_policy(tiny_model_dir), load_tokenizer(str(tmp_path / "tok")))
    assert len(trained) == 2
    ckpt = tmp_path / "last.ckpt"
    state = {"policy." + k: v for k, v in _model(tiny_model_dir).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": tiny_model_dir, "tokenizer": str(tmp_path / "tok"),
                                                          "dtype": "float32"}}, ckpt)
    out = export(ckpt, tmp_path / "hf")
    assert GenerationConfig.from_pretrained(out).eos_token_id == trained
    assert AutoTokenizer.from_pretrained(out).eos_token_id == trained[1]


def test_a_relative_model_folder_is_kept_by_its_absolute_path(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`--model.model models/chat` (a folder under the run's directory) was kept as given, so an
    export (or evaluation) run from another directory took it for a hub name (review byo21):
    the module's hparams now hold the absolute path, and an export whose base cannot be loaded
    says which base and to pass --base."""
    from lit_covrl.module import GRPOModule

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    module = GRPOModule(model="models/mine", tokenizer="models/mine", reference_model="models/mine")
    assert {module.hparams[k] for k in ("model", "tokenizer", "reference_model")} == {str(tmp_path / "models" / "mine")}
    assert GRPOModule(model="lit_covrl:tiny-arith").hparams["model"] == "lit_covrl:tiny-arith"
    ckpt = _checkpoint(tmp_path / "rel.ckpt", _model(tiny_model_dir), "./models/gone")
    err = _error(capsys, [str(ckpt), str(tmp_path / "out")])
    assert "the base model './models/gone' (the checkpoint's model.model) could not be loaded: no such model folder" in err
    assert err.endswith("pass --base <hub name or folder> (LIT_COVRL_DEBUG=1 shows the traceback)"), err


def test_a_relative_model_folder_given_to_lit_covrl_fit_is_saved_by_its_absolute_path(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    """Under `lit-covrl fit` the module's hparams are the CLI's values, not the constructor's
    rewritten locals: the checkpoint and hparams.yaml kept 'models/mine' (review byo25 F3), so an
    export from another directory took it for a hub name."""
    import torch

    from tests.helpers import cli_fit_tags

    shutil.copytree(tiny_model_dir, tmp_path / "models" / "mine")
    monkeypatch.chdir(tmp_path)
    cli_fit_tags(tmp_path / "run", "configs/cpu/grpo.yaml", "--model.model", "models/mine", "--model.tokenizer",
                 "models/mine", steps=1)
    ckpt = torch.load(tmp_path / "run" / "ck" / "last.ckpt", map_location="cpu", weights_only=False)
    absolute = str(tmp_path / "models" / "mine")
    assert ckpt["hyper_parameters"]["model"] == absolute and ckpt["hyper_parameters"]["tokenizer"] == absolute
    (hparams,) = (tmp_path / "run").rglob("hparams.yaml")
    assert f"model: {absolute}\n" in hparams.read_text()
