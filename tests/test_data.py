"""PromptDataModule: row validation, file formats, stream determinism and exact resume."""
from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import lit_covrl.tasks
from lit_covrl.data import TASK_CHECK_SAMPLES, PromptDataModule
from lit_covrl.types import Example, PromptBatch


class FakeTask:
    """a+b with a, b in [0, 1000): enough variety that different seeds give different batches."""

    name = "fake"

    def __init__(self, high: int = 1000) -> None:
        self.high = high

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randrange(self.high), rng.randrange(self.high)
        return Example(f"{a}+{b}=", str(a + b))


@pytest.fixture
def fake_task(monkeypatch):
    monkeypatch.setattr(lit_covrl.tasks, "_registry", lambda: {"fake": FakeTask})
    return "fake"


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def rows(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- construction


def test_source_rules(tmp_path, fake_task):
    f = write_jsonl(tmp_path / "a.jsonl", rows(3))
    with pytest.raises(ValueError, match="exactly one.*task.*null"):
        PromptDataModule(train_files=[f])  # task still at its default
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataModule(task=None)
    with pytest.raises(ValueError, match="exactly one"):
        PromptDataModule(task=None, train_files=[f], hf_dataset="x")
    with pytest.raises(ValueError, match="batch_size"):
        PromptDataModule(task=fake_task, batch_size=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        PromptDataModule(task="nope")
    PromptDataModule(task=None, train_files=[f], val_files=[f])  # valid


def test_a_single_path_is_a_one_file_list(tmp_path):
    """Python API: train_files="x.jsonl" was read character by character ("data.train_files[0]: 't'
    has an unsupported extension")."""
    train, val = write_jsonl(tmp_path / "t.jsonl", rows(3)), write_jsonl(tmp_path / "v.jsonl", rows(2))
    dm = PromptDataModule(task=None, train_files=train, val_files=tmp_path / "v.jsonl")
    dm.setup("fit")
    assert (dm.hparams.train_files, dm.hparams.val_files) == ([train], [val])
    assert [ex.prompt for ex in dm.known_examples()] == ["q0", "q1", "q2", "q0", "q1"]
    dm = PromptDataModule(task=None, train_files=[tmp_path / "t.jsonl"])  # a Path in a list had no .endswith
    dm.setup("fit")
    assert dm.hparams.train_files == [train] and len(dm.known_examples()) == 3


def test_missing_file_named_at_construction(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", rows(3))
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=r"train_files\[1\].*missing\.jsonl"):
        PromptDataModule(task=None, train_files=[good, missing])
    with pytest.raises(FileNotFoundError, match=r"val_files\[0\].*missing\.jsonl"):
        PromptDataModule(task=None, train_files=[good], val_files=[missing])
    with pytest.raises(ValueError, match="extension"):
        PromptDataModule(task=None, train_files=[str(tmp_path / "a.csv")])


# ----------------------------------------------------------------------------- rows


def malformed_file(tmp_path) -> tuple[str, list[Example]]:
    """Valid rows interleaved with every kind of malformed row; returns (path, valid examples)."""
    huge = "x" * (1 << 20)
    odd = "emoji \U0001f600, RTL \u05e9\u05dc\u05d5\u05dd \u202e, NUL \x00 end"
    lines = [
        json.dumps({"prompt": "p1", "answer": "1"}),  # 1 valid
        "{not json",  # 2 invalid JSON
        "[1, 2]",  # 3 array instead of object
        json.dumps({"prompt": "p"}),  # 4 missing answer
        json.dumps({"prompt": None, "answer": "a"}),  # 5 null field
        json.dumps({"prompt": {"a": 1}, "answer": "a"}),  # 6 dict prompt
        json.dumps({"prompt": "p", "answer": [1]}),  # 7 list answer
        json.dumps({"prompt": "  ", "answer": "a"}),  # 8 empty prompt
        "",  # 9 blank: not a row
        "   ",  # 10 blank: not a row
        json.dumps({"prompt": huge, "answer": 7}),  # 11 valid, 1 MB, number answer
        json.dumps({"prompt": odd, "answer": "\u0661"}),  # 12 valid, \u escapes incl. NUL
        json.dumps({"prompt": odd, "answer": "x"}, ensure_ascii=False),  # 13 valid, raw UTF-8
        json.dumps({"prompt": "p", "answer": True}),  # 14 bool answer
        '{"prompt": "p", "answer": NaN}',  # 15 non-finite number
        json.dumps({"prompt": "p2", "answer": 2.5, "extra": None}),  # 16 valid, extra field
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    valid = [
        Example("p1", "1"),
        Example(huge, "7"),
        Example(odd, "\u0661"),
        Example(odd, "x"),
        Example("p2", "2.5", {"extra": None}),  # other columns travel with the row
    ]
    return path, valid


def test_malformed_rows_skipped_and_counted(tmp_path, caplog):
    path, valid = malformed_file(tmp_path)
    dm = PromptDataModule(task=None, train_files=[path], batch_size=len(valid))
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        dm.setup("fit")
    assert dm._train_rows == valid  # file order kept, nothing valid lost
    # 16 lines, 2 blank -> 14 rows: 5 valid, 9 malformed
    assert (dm.rows_seen, dm.rows_used, dm.skipped_rows) == (14, 5, 9)
    assert dm.rows_seen == dm.rows_used + dm.skipped_rows
    text = caplog.text
    # the first five individually, with file:line (blank lines still counted in numbering)
    for line in (2, 3, 4, 5, 6):
        assert f"mixed.jsonl:{line}:" in text
    assert "mixed.jsonl:7:" not in text  # rate limited ...
    assert "skipped 9 malformed rows in all (4 not shown)" in text  # ... then summarized
    assert sorted(dm.batch_at(0).prompts) == sorted(e.prompt for e in valid)  # one epoch = all valid rows


@pytest.mark.parametrize(
    "line,reason",
    [
        ("{bad", "invalid JSON"),
        ("[1]", "not a JSON object"),
        ('{"prompt": "p"}', "missing field 'answer'"),
        ('{"prompt": "p", "answer": null}', "null field 'answer'"),
        ('{"prompt": "p", "answer": {}}', "'answer' is dict"),
        ('{"prompt": 3, "answer": "a"}', "'prompt' is int, expected a string"),
        ('{"prompt": "", "answer": "a"}', "empty field 'prompt'"),
        # a lone surrogate (an emoji cut in half) cannot be encoded as UTF-8 for the tokenizer
        ('{"prompt": "2+2=\\ud83d", "answer": "4"}', r"'prompt' is not valid Unicode \(lone surrogate '\\ud83d' at character 4\)"),
        ('{"prompt": "p", "answer": "\\udc00"}', "'answer' is not valid Unicode"),
        ('{"prompt": [{"role": "user", "content": "\\ud83d"}], "answer": "a"}', "'prompt' message 0 is not valid Unicode"),
    ],
)
def test_strict_raises_at_first_malformed_row(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "s.jsonl", rows(2) + ["", line] + rows(1))
    dm = PromptDataModule(task=None, train_files=[path], strict=True)
    with pytest.raises(ValueError, match=rf"s\.jsonl:4: .*{reason}"):
        dm.setup("fit")


def test_field_mismatch_names_fields(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "q", "solution": "1"})] * 3)
    dm = PromptDataModule(task=None, train_files=[path])  # not strict: still an error
    with pytest.raises(ValueError, match=r"'prompt', 'answer'.*fields found: \['question', 'solution'\]"):
        dm.setup("fit")
    dm = PromptDataModule(task=None, train_files=[path], prompt_field="question", answer_field="solution")
    dm.setup("fit")
    assert dm.rows_used == 3


def test_json_array_file_and_answer_field(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"q": "a", "ans": 1}, {"q": "b", "ans": None}]))
    dm = PromptDataModule(task=None, train_files=[str(p)], prompt_field="q", answer_field="ans", batch_size=1)
    dm.setup("fit")
    assert dm._train_rows == [Example("a", "1")] and dm.skipped_rows == 1
    bom = tmp_path / "bom.json"  # a BOM (Windows editors) before the array
    bom.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    dm = PromptDataModule(task=None, train_files=[str(bom)], prompt_field="q", answer_field="ans", batch_size=1)
    dm.setup("fit")
    assert dm._train_rows == [Example("a", "1")] and dm.skipped_rows == 1


def test_json_array_with_a_syntax_error_names_the_position(tmp_path):
    """A .json array with one syntax error is one error with the JSON position, in either mode,
    not every line re-read (and skipped) as a JSON-lines row."""
    p = tmp_path / "a.json"
    p.write_text('[\n  {"prompt": "a", "answer": "1"},\n  {"prompt": "b", "answer": "2"},\n]\n')  # trailing comma
    with pytest.raises(ValueError, match=rf"^{p}: not a valid JSON array \(Expecting value: line 4 column 1 "):
        PromptDataModule(task=None, train_files=[str(p)]).setup("fit")


def test_whole_number_answers_are_written_as_integers(tmp_path):
    """ExactMatchReward compares text: a float64 column (Parquet, HF datasets, pandas) or JSON `1e3`
    must give "3" / "1000", not "3.0" / "1000.0"; other floats keep their repr."""
    path = write_jsonl(tmp_path / "n.jsonl", [
        '{"prompt": "a", "answer": 3.0}', '{"prompt": "b", "answer": 1e3}', '{"prompt": "c", "answer": 1e21}',
        '{"prompt": "d", "answer": -0.0}', '{"prompt": "e", "answer": 0.1}', '{"prompt": "f", "answer": -2.5}',
        '{"prompt": "g", "answer": 12345678901234567890}', '{"prompt": "h", "answer": 1e-7}',
        '{"prompt": "i", "answer": 1e23}', '{"prompt": "j", "answer": -1.5e30}', '{"prompt": "k", "answer": 9007199254740993.0}'])
    dm = PromptDataModule(task=None, train_files=[path])
    dm.setup("fit")
    # 1e23 and -1.5e30 are not floats exactly (1e23 is 99999999999999991611392): the digits written are kept;
    # 2**53 + 1 is read as the float 2**53, whose shortest repr is 9007199254740992
    assert [ex.answer for ex in dm._train_rows] == [
        "3", "1000", "1000000000000000000000", "0", "0.1", "-2.5", "12345678901234567890", "1e-07",
        "1" + "0" * 23, "-15" + "0" * 29, "9007199254740992"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["1+2=", "x"], "answer": pa.array([3.0, 4.5], pa.float64())}),
                   str(tmp_path / "f.parquet"))
    dm = PromptDataModule(task=None, train_files=[str(tmp_path / "f.parquet")])
    dm.setup("fit")
    assert [ex.answer for ex in dm._train_rows] == ["3", "4.5"]
    from decimal import Decimal

    # a decimal column is a number (it was skipped: "field 'answer' is Decimal"), exact at any precision
    exact = ["3.0000", "2.5000", "-0.0010", "0", "12345678901234567890123.0001"]
    pq.write_table(pa.table({"prompt": list("abcde"), "answer": pa.array(map(Decimal, exact), pa.decimal128(38, 4))}),
                   str(tmp_path / "d.parquet"))
    dm = PromptDataModule(task=None, train_files=[str(tmp_path / "d.parquet")])
    dm.setup("fit")
    assert [ex.answer for ex in dm._train_rows] == ["3", "2.5", "-0.001", "0", "12345678901234567890123.0001"]


def test_float32_and_float16_columns_give_the_decimal_written(tmp_path):
    """A float32 column widened to a Python float is 0.30000001192092896 for 0.3: ExactMatchReward
    would score "0.3" 0 on every such row. Narrow columns (and lists / structs of them) read as the
    shortest decimal that is the same float32 / float16; a float64 column keeps its exact value."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f32 = [0.3, 1.3, 2.0, 1e-8, -7.1, 3.4e38]
    pq.write_table(pa.table({
        "prompt": list("abcdef"),
        "answer": pa.array(f32, pa.float32()),
        "half": pa.array([0.3, 1.3, 2.0, 0.1, -7.1, 2047.0], pa.float16()),
        "vec": pa.array([[0.3, 1.3]] * 6, pa.list_(pa.float32())),
        "pair": pa.array([{"x": 0.3, "y": 0.7}] * 6, pa.struct([("x", pa.float32()), ("y", pa.float32())])),
        "wide": pa.array([0.30000001192092896] * 6, pa.float64()),
        "mixed": pa.array([{"x": 0.3, "w": 0.30000001192092896}] * 6,
                          pa.struct([("x", pa.float32()), ("w", pa.float64())])),
    }), str(tmp_path / "f.parquet"))
    dm = PromptDataModule(task=None, train_files=[str(tmp_path / "f.parquet")])
    dm.setup("fit")
    assert [ex.answer for ex in dm._train_rows] == ["0.3", "1.3", "2", "1e-08", "-7.1", "34" + "0" * 37]
    cols = dm._train_rows[0].columns
    assert cols["half"] == 0.3 and [ex.columns["half"] for ex in dm._train_rows][-1] == 2047.0
    assert cols["vec"] == [0.3, 1.3] and cols["pair"] == {"x": 0.3, "y": 0.7}
    assert cols["wide"] == 0.30000001192092896  # float64: the value stored is the value meant
    assert cols["mixed"] == {"x": 0.3, "w": 0.30000001192092896}  # each field by its own width
    # a struct's float32 field as the answer (verl's `reward_model.ground_truth` layout)
    pq.write_table(pa.table({"prompt": ["a"], "reward_model": pa.array(
        [{"ground_truth": 1.3, "weight": 0.1}], pa.struct([("ground_truth", pa.float32()), ("weight", pa.float64())]))}),
        str(tmp_path / "s.parquet"))
    nested = PromptDataModule(task=None, train_files=[str(tmp_path / "s.parquet")], answer_field="reward_model.ground_truth")
    nested.setup("fit")
    assert [ex.answer for ex in nested._train_rows] == ["1.3"]
    import numpy as np

    # the decimals read back to the stored float32 values exactly
    assert np.array([float(ex.answer) for ex in dm._train_rows], np.float32).tolist() == \
        pa.array(f32, pa.float32()).to_pylist()


def test_a_hf_dataset_float32_column_gives_the_decimal_written(tmp_path):
    datasets = pytest.importorskip("datasets")
    from lit_covrl.sources import RowReader

    feats = datasets.Features({"prompt": datasets.Value("string"), "answer": datasets.Value("float32")})
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "answer": [0.3, 1.3]}, features=feats).save_to_disk(
        str(tmp_path / "ds"))
    reader = RowReader("prompt", "answer")
    assert [ex.answer for ex in reader.read_hf(str(tmp_path / "ds"), None, "train")] == ["0.3", "1.3"]


def test_a_file_without_rows_is_named(tmp_path):
    empty = write_jsonl(tmp_path / "e.jsonl", [""])
    with pytest.raises(ValueError, match=rf"^{empty}: no rows$"):
        PromptDataModule(task=None, train_files=[empty]).setup("fit")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "e.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match=rf"^{path}: no rows$"):  # not "no row has the field(s)"
        PromptDataModule(task=None, train_files=[path]).setup("fit")


def test_parquet_round_trip_with_nulls(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": ["p0", None, "p2", "", "p4"],
            "answer": [10, 11, None, 13, 14],  # int column with a null
            "other": [1.0, 2.0, 3.0, 4.0, 5.0],
        }
    )
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path)
    dm = PromptDataModule(task=None, train_files=[path], val_files=[path], batch_size=2, val_batch_size=2)
    dm.setup("fit")
    assert dm._train_rows == [Example("p0", "10", {"other": 1.0}), Example("p4", "14", {"other": 5.0})]
    # train and val files are both counted
    assert (dm.rows_seen, dm.rows_used, dm.skipped_rows) == (10, 4, 6)
    val = list(dm.val_dataloader())
    assert [b.prompts for b in val] == [["p0", "p4"]] and val[0].index == -1

    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"question": ["q"], "solution": ["s"]}), bad)
    with pytest.raises(ValueError, match=r"fields found: \['question', 'solution'\]"):
        PromptDataModule(task=None, train_files=[bad]).setup("fit")


def test_no_valid_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", ['{"prompt": null, "answer": "a"}'])
    with pytest.raises(ValueError, match="no valid training rows"):
        PromptDataModule(task=None, train_files=[path]).setup("fit")
    # held-out files given, every row malformed: a whole fit ran with no validation, exit 0
    good = write_jsonl(tmp_path / "g.jsonl", rows(4))
    for source in (dict(task=None, train_files=[good]), dict(task="arithmetic")):
        with pytest.raises(ValueError, match=r"no valid held-out rows in \[.*e.jsonl'\] \(1 rows skipped in all"):
            PromptDataModule(val_files=[path], **source).setup("fit")


# ----------------------------------------------------------------------------- streams


def take(it, n):
    return [next(it) for _ in range(n)]


def test_task_stream_deterministic_and_ranks_differ(fake_task):
    a = PromptDataModule(task=fake_task, batch_size=4, seed=3)
    b = PromptDataModule(task=fake_task, batch_size=4, seed=3)
    sa, sb = take(a._stream(0, 1), 5), take(b._stream(0, 1), 5)
    assert sa == sb
    assert [x.index for x in sa] == [0, 1, 2, 3, 4]
    assert len({tuple(x.prompts) for x in sa}) == 5  # batches differ from each other
    other_seed = take(PromptDataModule(task=fake_task, batch_size=4, seed=4)._stream(0, 1), 5)
    assert other_seed != sa
    r0, r1 = take(a._stream(0, 2), 3), take(a._stream(1, 2), 3)
    assert all(x.prompts != y.prompts for x, y in zip(r0, r1))
    # W ranks x B see what one rank with W*B prompts per step sees (the task's generator is per
    # step, not per rank's batch; before, rank r's batch k was the single-rank stream's batch kW + r)
    wide = take(PromptDataModule(task=fake_task, batch_size=8, seed=3)._stream(0, 1), 3)
    assert [x.prompts + y.prompts for x, y in zip(r0, r1)] == [w.prompts for w in wide]
    # one rank's stream is what it always was: step k's generator drawn B times
    task = lit_covrl.tasks.get_task(fake_task)
    for k, batch in enumerate(sa):
        rng = random.Random(f"lit_covrl:train:3:{k}")
        assert batch.prompts == [task.sample(rng).prompt for _ in range(4)]
    # restart mid-stream is a pure function of the position
    assert take(a._stream(1, 2, start=2), 1)[0] == r1[2]
    # held-out prompts come from a different seed than any train batch
    val = [p for batch in a.val_dataloader() for p in batch.prompts]
    assert len(val) == 64 and all(b.index == -1 for b in a.val_dataloader())
    assert val != [p for batch in sa for p in batch.prompts][:64]


def test_file_stream_epochs_and_ranks(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", rows(10))
    dm = PromptDataModule(task=None, train_files=[path], batch_size=4, seed=1)
    single = [p for b in take(dm._stream(0, 1), 5) for p in b.prompts]  # 20 = two epochs
    first, second = single[:10], single[10:]
    assert sorted(first) == sorted(second) == sorted(f"q{i}" for i in range(10))  # each epoch a permutation
    assert first != second  # reshuffled per epoch
    assert first != [f"q{i}" for i in range(10)]  # shuffled at all
    again = PromptDataModule(task=None, train_files=[path], batch_size=4, seed=1)
    assert [p for b in take(again._stream(0, 1), 5) for p in b.prompts] == single
    r0, r1 = take(dm._stream(0, 2), 2), take(dm._stream(1, 2), 2)
    assert r0[0].prompts == single[0:4] and r1[0].prompts == single[4:8]
    assert r0[1].prompts == single[8:12] and r1[1].prompts == single[12:16]  # wraps into epoch 1


def test_no_val_files_means_no_validation(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", rows(3))
    assert PromptDataModule(task=None, train_files=[path]).val_dataloader() == []


def test_real_arithmetic_task():
    pytest.importorskip("lit_covrl.tasks.arithmetic")
    dm = PromptDataModule(task="arithmetic", batch_size=3, val_size=5, val_batch_size=2)
    b = next(iter(dm.train_dataloader()))
    assert isinstance(b, PromptBatch) and len(b) == 3 and b.index == 0
    assert all(isinstance(p, str) and p for p in b.prompts + b.answers)
    assert [len(v) for v in dm.val_dataloader()] == [2, 2, 1]


# ----------------------------------------------------------------------------- resume through Lightning


class Recorder(L.LightningModule):
    """Manual optimization; records what training_step receives and takes a real optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.seen.append((batch.index, list(batch.prompts)))
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward((self.w - 1.0).pow(2).sum())
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, max_steps, **kw) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )
    trainer.fit(model, datamodule=dm)
    return model


def test_resume_is_exact_via_state_dict(fake_task):
    ref = [(b.index, b.prompts) for b in take(PromptDataModule(task=fake_task, batch_size=2)._stream(0, 1), 6)]
    dm = PromptDataModule(task=fake_task, batch_size=2)
    first = fit(dm, 3, enable_checkpointing=False)
    assert first.seen == ref[:3]  # prefetching did not skip or repeat a batch
    state = dm.state_dict()
    assert state["next_index"] == 3

    dm2 = PromptDataModule(task=fake_task, batch_size=2)
    dm2.load_state_dict(state)
    second = fit(dm2, 3, enable_checkpointing=False)
    assert second.seen == ref[3:6]
    assert dm2.state_dict()["next_index"] == 6


def test_resume_is_exact_via_checkpoint(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", rows(7))
    make = lambda: PromptDataModule(task=None, train_files=[path], batch_size=3, seed=5)  # noqa: E731
    ref = [(b.index, b.prompts) for b in take(make()._stream(0, 1), 5)]

    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, datamodule=make())
    ckpt = str(tmp_path / "step3.ckpt")
    trainer.save_checkpoint(ckpt)
    assert model.seen == ref[:3]
    saved = torch.load(ckpt, weights_only=False)["PromptDataModule"]
    assert (saved["next_index"], saved["batch_size"]) == (3, 3)

    resumed = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(resumed, datamodule=make(), ckpt_path=ckpt)
    assert resumed.seen == ref[3:5]


def test_hf_local_dataset(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows(5) + [json.dumps({"prompt": None, "answer": "x"})])
    write_jsonl(d / "test.jsonl", rows(2, start=100))
    dm = PromptDataModule(task=None, hf_dataset=str(d), hf_val_split="test", batch_size=5)
    dm.setup("fit")
    assert sorted(next(dm._stream(0, 1)).prompts) == [f"q{i}" for i in range(5)]
    assert dm.skipped_rows == 1
    assert [b.prompts for b in dm.val_dataloader()] == [["q100", "q101"]]


class _FakeSplit(list):
    """What `datasets.load_dataset(..., split=...)` returns, as far as the reader uses it."""

    column_names = ["prompt", "answer"]

    class features:  # noqa: N801 (an attribute holding the split's arrow schema)
        arrow_schema = __import__("pyarrow").schema([("prompt", "string"), ("answer", "string")])


def test_hf_dataset_reader_without_the_datasets_package(monkeypatch):
    """The HF path (name, config and split passed through; rows labelled `name[split]:row n`;
    counts) with a stand-in `datasets` module, so it runs where the package is not installed."""
    import importlib.machinery
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        n = 4 if split == "train" else 2
        return _FakeSplit([{"prompt": f"{split}{i}", "answer": str(i)} for i in range(n)] + [{"prompt": "x"}])

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)  # found by importlib.util.find_spec
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    dm = PromptDataModule(task=None, hf_dataset="org/set", hf_config="main", hf_val_split="test", batch_size=4)
    dm.setup("fit")
    assert calls == [("org/set", "main", "train"), ("org/set", "main", "test")]
    assert sorted(next(dm._stream(0, 1)).prompts) == ["train0", "train1", "train2", "train3"]
    assert [b.prompts for b in dm.val_dataloader()] == [["test0", "test1"]]
    # 4 + 1 train rows and 2 + 1 test rows; the last of each has no answer: 2 skipped, by split and row
    assert (dm.rows_seen, dm.rows_used, dm.skipped_rows) == (8, 6, 2)
    assert dm.skipped == ["org/set[train]:row 5: missing field 'answer'", "org/set[test]:row 3: missing field 'answer'"]


def _fake_datasets(monkeypatch, saved: dict):
    """A stand-in `datasets` whose load_from_disk returns `saved[path]` (load_dataset refuses)."""
    import importlib.machinery
    import sys
    import types

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def load_dataset(*args, **kwargs):
        raise AssertionError("a save_to_disk folder must be read with load_from_disk")

    fake.load_dataset, fake.load_from_disk = load_dataset, lambda path: saved[path]
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_hf_dataset_saved_to_disk_is_read_with_load_from_disk(tmp_path, monkeypatch):
    """`Dataset.save_to_disk` / `DatasetDict.save_to_disk` folders were sent to load_dataset, which
    refuses them ("use load_from_disk"), and lit_covrl had no setting that calls it."""
    one, splits = tmp_path / "one", tmp_path / "splits"
    one.mkdir(), splits.mkdir()
    (one / "state.json").write_text("{}")
    (splits / "dataset_dict.json").write_text("{}")
    train = _FakeSplit([{"prompt": f"t{i}", "answer": str(i)} for i in range(4)])
    test = _FakeSplit([{"prompt": "v0", "answer": "0"}])
    _fake_datasets(monkeypatch, {str(one): train, str(splits): {"train": train, "test": test}})

    dm = PromptDataModule(task=None, hf_dataset=str(one), batch_size=4)
    dm.setup("fit")
    assert sorted(next(dm._stream(0, 1)).prompts) == ["t0", "t1", "t2", "t3"]
    dm = PromptDataModule(task=None, hf_dataset=str(splits), hf_val_split="test", batch_size=4)
    dm.setup("fit")
    assert [b.prompts for b in dm.val_dataloader()] == [["v0"]]
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits: \['test', 'train'\]"):
        PromptDataModule(task=None, hf_dataset=str(splits), hf_val_split="validation", batch_size=4).setup("fit")
    with pytest.raises(ValueError, match="data.hf_val_split='test', but data.hf_dataset=.* single Dataset"):
        PromptDataModule(task=None, hf_dataset=str(one), hf_val_split="test")
    with pytest.raises(FileNotFoundError, match="data.hf_dataset: no such folder: './hf_sngle'"):
        PromptDataModule(task=None, hf_dataset="./hf_sngle")


def test_hf_dataset_saved_to_disk_with_the_real_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows_ = [{"q": f"q{i}", "a": str(i)} for i in range(3)]
    datasets.Dataset.from_list(rows_).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows_),
                          "test": datasets.Dataset.from_list(rows_[:1])}).save_to_disk(str(tmp_path / "splits"))
    for folder, val in (("one", None), ("splits", "test")):
        dm = PromptDataModule(task=None, hf_dataset=str(tmp_path / folder), hf_val_split=val, batch_size=3,
                              prompt_field="q", answer_field="a")
        dm.setup("fit")
        assert sorted(next(dm._stream(0, 1)).prompts) == ["q0", "q1", "q2"]


class _Labels:
    """A stand-in for `datasets.ClassLabel`, as far as the reader uses it."""

    def __init__(self, names):
        self.names = names

    def int2str(self, i):
        return self.names[i]


class _Features(dict):
    arrow_schema = __import__("pyarrow").schema([("prompt", "string"), ("label", "int64")])


def test_class_label_columns_reach_the_reward_as_label_names(monkeypatch):
    """A HF dataset's ClassLabel answer column gave the reward the class index ("1"), never the
    label ("positive"): ExactMatchReward scored every completion 0 (review byo25 F10). Label names
    now, also for other columns and lists of labels; -1 (no label) is a missing answer, skipped."""
    sentiment, topics = _Labels(["negative", "positive"]), _Labels(["sports", "news", "art"])
    split = _FakeSplit([{"prompt": "good", "label": 1, "tags": [2, 0]}, {"prompt": "bad", "label": 0, "tags": []},
                        {"prompt": "unrated", "label": -1, "tags": [1]}])
    split.column_names = ["prompt", "label", "tags"]
    split.features = _Features(prompt=object(), label=sentiment, tags=type("Seq", (), {"feature": topics})())
    _fake_datasets(monkeypatch, {})
    sys_datasets = __import__("sys").modules["datasets"]
    monkeypatch.setattr(sys_datasets, "load_dataset", lambda *a, **k: split, raising=False)
    dm = PromptDataModule(task=None, hf_dataset="org/sentiment", answer_field="label", batch_size=2)
    dm.setup("fit")
    assert [(ex.prompt, ex.answer, ex.columns) for ex in dm.known_examples()] == [
        ("good", "positive", {"tags": ["art", "sports"]}), ("bad", "negative", {"tags": []})]
    assert dm.skipped_rows == 1


def test_class_label_columns_with_the_real_package(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"q": datasets.Value("string"), "label": datasets.ClassLabel(names=["no", "yes"])})
    datasets.Dataset.from_dict({"q": ["a", "b"], "label": [1, 0]}, features=features).save_to_disk(str(tmp_path / "d"))
    dm = PromptDataModule(task=None, hf_dataset=str(tmp_path / "d"), prompt_field="q", answer_field="label",
                          batch_size=2)
    dm.setup("fit")
    assert [(ex.prompt, ex.answer) for ex in dm.known_examples()] == [("a", "yes"), ("b", "no")]


class RecorderWithVal(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.val_seen: list[int] = []

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.val_seen.append(batch.index)


def test_validation_batches_do_not_move_the_stream(fake_task):
    ref = [(b.index, b.prompts) for b in take(PromptDataModule(task=fake_task, batch_size=2)._stream(0, 1), 4)]
    dm = PromptDataModule(task=fake_task, batch_size=2, val_size=5, val_batch_size=2)
    model = RecorderWithVal()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=2, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=dm)
    assert model.seen == ref
    assert model.val_seen == [-1] * 6  # 3 held-out batches (2+2+1), validated twice
    assert dm.next_index == 4


def test_hf_without_datasets_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install datasets \(or `pip install -e '\.\[datasets\]'`"):
        PromptDataModule(task=None, hf_dataset="some/dataset")


def test_describe(tmp_path, fake_task):
    path, _ = malformed_file(tmp_path)
    dm = PromptDataModule(task=None, train_files=[path])
    dm.setup("fit")
    assert dm.describe() == ("prompts: 1 train file(s), train 5/14 rows used (9 malformed), seed 0, 16/step/device, "
                             "0 held-out")
    # train and held-out rows counted apart; prompts the tokenizer cannot represent are not 'malformed'
    val = write_jsonl(tmp_path / "v.jsonl", rows(3) + ["{bad"])
    dm = PromptDataModule(task=None, train_files=[path], val_files=[val], unencodable_prompts="skip")
    dm.setup("fit")
    dm.reject_prompts([(dm._train_rows[0], "unknown"), (dm._val_examples[2], "unknown")])
    assert dm.describe() == ("prompts: 1 train file(s), train 4/14 rows used (9 malformed, 1 unencodable), "
                             "held-out 2/4 rows used (1 malformed, 1 unencodable), seed 0, 16/step/device, 2 held-out")
    dm = PromptDataModule(task=fake_task, val_size=3)
    dm.setup("fit")
    assert "task 'fake'" in dm.describe() and "3 held-out" in dm.describe()


def test_held_out_rows_among_the_train_rows_and_steps_larger_than_the_rows_are_warned_about(tmp_path, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", rows(3))
    val = write_jsonl(tmp_path / "v.jsonl", rows(2, start=1) + rows(1, start=7))  # q1, q2 are train rows, q7 not

    def warnings(batch_size, world=1, rank=0):
        caplog.clear()
        dm = PromptDataModule(task=None, train_files=[train], val_files=[val], batch_size=batch_size)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, log_dir=None, default_root_dir=None)
        with caplog.at_level(logging.WARNING, logger="lit_covrl"):
            dm.setup("fit")
        return [r.getMessage() for r in caplog.records]

    assert warnings(16) == [
        "2 of 3 held-out rows have the prompt of a train row: validation scores prompts the policy trains on",
        "data.batch_size=16 x 1 device(s) = 16 prompts per step, more than the 3 train rows: each step holds "
        "some rows several times"]
    assert len(warnings(3)) == 1  # 3 prompts a step: each row once
    assert warnings(2, world=2)[1].startswith("data.batch_size=2 x 2 device(s) = 4 prompts per step")
    assert warnings(2, world=2, rank=1) == []  # said once, by rank 0 (8 GPUs printed 8 copies)


def test_val_seed_fixes_the_held_out_set_across_training_seeds():
    """By default the held-out prompts follow `seed`; with `val_seed` runs of different seeds are
    scored on one set while their train streams still differ."""
    def held_out(**kw):
        dm = PromptDataModule(task="arithmetic", batch_size=4, val_size=32, val_batch_size=32, **kw)
        dm.setup("fit")
        return [p for b in dm.val_dataloader() for p in b.prompts], dm

    (v0, _), (v1, _) = held_out(seed=0), held_out(seed=1)
    assert v0 != v1
    (f0, d0), (f1, d1) = held_out(seed=0, val_seed=7), held_out(seed=1, val_seed=7)
    assert f0 == f1 and f0 != v0 and len(f0) == 32
    assert held_out(seed=7)[0] == f0  # val_seed=7 draws what seed=7 would
    assert d0.batch_at(0).prompts != d1.batch_at(0).prompts
    assert "seed 1 (held-out 7)" in d1.describe()


def test_validation_prompts_of_a_builtin_task_are_held_out():
    """Validation uses the task's held-out split: none of its prompts is ever trained on."""
    dm = PromptDataModule(task="arithmetic", batch_size=32, val_size=64, val_batch_size=64, seed=0)
    dm.setup("fit")
    val = {p for b in dm.val_dataloader() for p in b.prompts}
    assert len(val) == 64
    train = {p for k in range(100) for p in dm.batch_at(k).prompts}
    assert len(train) > 1000 and not (val & train)


@pytest.mark.parametrize("source", ["task", "rows"])
def test_ranks_updates_together_are_one_ranks_update(fake_task, tmp_path, source):
    """W = 2 ranks x B = 4 prompts with mini-batches of m = 2 (2 updates per rollout): update j of
    the two ranks together (each rank's j-th m prompts) is the j-th W*m = 4 prompts of one rank with
    W*B = 8 prompts per step. Before, each rank held a contiguous block of B, so update 0 of the
    ranks was prompts 0-1 and 4-5 of the single rank's step, not its update 0 (prompts 0-3)."""


    path = write_jsonl(tmp_path / "r.jsonl", rows(50))

    def make(batch_size, m):
        kw = dict(task=fake_task) if source == "task" else dict(task=None, train_files=[path])
        dm = PromptDataModule(batch_size=batch_size, seed=5, **kw)
        dm.minibatch_prompts = m
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1)
        return dm

    ranks, single = make(4, 2), make(8, 4)
    for k in range(3):
        one = single.batch_at(k).prompts
        mine = [ranks.batch_at(k, r, 2).prompts for r in range(2)]
        for j in range(2):
            assert mine[0][2 * j:2 * j + 2] + mine[1][2 * j:2 * j + 2] == one[4 * j:4 * j + 4], (k, j)
    ranks.minibatch_prompts = None  # one update per rollout: contiguous blocks
    assert [ranks.batch_at(0, r, 2).prompts for r in range(2)] == [single.batch_at(0).prompts[:4], single.batch_at(0).prompts[4:]]
    assert ranks.rank_offsets(1, 2) == [4, 5, 6, 7]
    ranks.minibatch_prompts = 3  # not dividing B: no update layout (the module refuses it anyway)
    assert ranks.rank_offsets(1, 2) == [4, 5, 6, 7]


@pytest.mark.parametrize("saved_world,world", [(2, 1), (2, 4), (1, 2), (2, 2)])
def test_resume_with_another_world_size_repeats_no_task_prompt(fake_task, saved_world, world):
    """A task's step k has its own generator whatever the world size: a run saved after 3 steps on
    saved_world ranks resumes at step 3 on any other (none repeated, none skipped). A checkpoint of
    older code, whose task stream used one generator per rank's batch (k * W + r), resumes past
    all next_index * W generators it used."""


    def make(w):
        dm = PromptDataModule(task=fake_task, batch_size=2)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=w)
        return dm

    saver = make(saved_world)
    saver.next_index = 3
    state = saver.state_dict()
    assert state["world_size"] == saved_world and state["task_stream_unit"] == "step"
    dm = make(world)
    dm.load_state_dict(state)
    assert dm.next_index == 3
    old = {k: v for k, v in state.items() if k != "task_stream_unit"}  # a checkpoint from before
    dm.load_state_dict(old)
    assert dm.next_index == 3 * saved_world


@pytest.mark.parametrize("saved_bs,saved_world,next_index,bs,world", [
    (8, 1, 10, 4, 1), (4, 1, 10, 8, 1), (3, 2, 7, 5, 1), (5, 1, 7, 3, 4), (4, 2, 3, 4, 2)])
def test_resume_with_another_batch_size_repeats_no_prompt(tmp_path, caplog, saved_bs, saved_world, next_index, bs,
                                                          world):
    """Rows: batch k of rank r takes stream positions [g * B, (g + 1) * B), g = k * W + r. A run saved
    after next_index batches per rank used the first next_index * W * B positions; resumed under
    another B (and W) it continues at the first batch at or after them, with a warning."""


    path = write_jsonl(tmp_path / "r.jsonl", rows(1000))  # one epoch: positions are distinct prompts

    def make(batch_size, w):
        dm = PromptDataModule(task=None, train_files=[path], batch_size=batch_size)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=w)
        return dm

    saver = make(saved_bs, saved_world)
    saver.next_index = next_index
    def prompts(dm, ks, w):
        return {p for k in ks for r in range(w) for p in dm.batch_at(k, r, w).prompts}

    trained = prompts(saver, range(next_index), saved_world)
    dm = make(bs, world)
    with caplog.at_level(logging.WARNING, logger="lit_covrl"):
        dm.load_state_dict(saver.state_dict())
    used, first = next_index * saved_world * saved_bs, dm.next_index * world * bs
    assert used <= first < used + world * bs  # nothing repeated, less than one global batch skipped
    assert not prompts(dm, range(dm.next_index, dm.next_index + 3), world) & trained
    changed = (saved_bs, saved_world) != (bs, world)
    assert any(f"continuing at stream position {first}" in r.getMessage() for r in caplog.records) == changed
    old = {k: v for k, v in saver.state_dict().items() if k not in ("batch_size", "world_size")}
    dm.load_state_dict(old)  # a checkpoint from before: kept as is
    assert dm.next_index == next_index


def test_resume_on_changed_train_rows_warns(tmp_path, caplog):
    """The epochs' shuffles are permutations of the row positions: resumed on other rows (a malformed
    line fixed, rows added or reordered) the stream does not continue the saved one, and it says so."""
    nine, ten = write_jsonl(tmp_path / "9.jsonl", rows(9)), write_jsonl(tmp_path / "10.jsonl", rows(10))
    moved = write_jsonl(tmp_path / "moved.jsonl", rows(9)[::-1])
    saver = PromptDataModule(task=None, train_files=[nine], batch_size=3)
    saver.setup("fit")
    saver.next_index = 2
    state = saver.state_dict()
    assert state["train_rows"] == 9

    def warnings(path, state, rank=0):
        caplog.clear()
        dm = PromptDataModule(task=None, train_files=[path], batch_size=3)
        if rank:
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, log_dir=None, default_root_dir=None)
        with caplog.at_level(logging.WARNING, logger="lit_covrl"):
            dm.load_state_dict(state)
        assert dm.next_index == 2
        return [r.getMessage() for r in caplog.records if "train rows changed" in r.getMessage()]

    assert warnings(nine, state) == []
    (w,) = warnings(ten, state)
    assert "(9 -> 10 rows)" in w and "shuffle differs" in w and "repeat or be missed" in w
    (w,) = warnings(moved, state)
    assert "the same 9 rows" in w and "another order" in w
    assert warnings(moved, {**state, "world_size": 2}, rank=1) == []  # said once, by rank 0
    old = {k: v for k, v in state.items() if k not in ("train_rows", "train_digest")}  # a checkpoint from before
    assert warnings(ten, old) == []


def test_a_task_stream_resumes_at_its_batch_under_another_batch_size(fake_task):
    """A task's global batch g has its own seeded RNG: its batch size moves no stream position."""
    saver = PromptDataModule(task=fake_task, batch_size=8)
    saver.next_index = 5
    dm = PromptDataModule(task=fake_task, batch_size=2)
    dm.load_state_dict(saver.state_dict())
    assert dm.next_index == 5


def test_a_task_with_val_files_checks_and_labels_the_files(tmp_path, fake_task):
    """task + val_files: the held-out prompts are rows of the files, so they are known examples
    (checked at start-up, with file:line), not repeated in the task's sample, which holds only
    prompts drawn from the task (what training sends; with val_files they were not checked at all)."""
    val = write_jsonl(tmp_path / "v.jsonl", rows(3))
    dm = PromptDataModule(task=fake_task, val_files=[val], val_batch_size=2)
    dm.setup("fit")
    assert [ex.source for ex in dm.known_examples()] == [f"{val}:{i}" for i in (1, 2, 3)]
    assert dm.known_prompts() == ["q0", "q1", "q2"]
    sample = dm.task_sample()
    assert len(sample) == TASK_CHECK_SAMPLES and {ex.source.split(", ")[1].rsplit(" ", 1)[0] for ex in sample} == {"sampled prompt"}
    assert "task 'fake' (synthetic), held-out 3/3 rows used (0 malformed)" in dm.describe()
    dm.hparams.unencodable_prompts = "skip"
    dm.reject_prompts([(dm.known_examples()[1], "unknown")])  # no train rows to filter: no crash
    assert [b.prompts for b in dm.val_dataloader()] == [["q0", "q2"]]
    assert dm.skipped_rows == 1 and len(dm.batch_at(0).prompts) == 16  # the task still streams
    plain = PromptDataModule(task=fake_task, val_size=2)
    plain.setup("fit")
    assert plain.known_examples() == [] and len(plain.task_sample()) == 2 + TASK_CHECK_SAMPLES
    assert plain.task_sample() is plain.task_sample()  # drawn once, for both start-up checks


def test_a_held_out_split_smaller_than_val_size_names_the_setting():
    """1-digit sums: 100 prompts, of which the CRC split holds out 11 at test_fraction 0.1 (counted
    over all 100 with is_heldout)."""
    dm = PromptDataModule(task="arithmetic", task_kwargs={"digits": 1}, val_size=64)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        "data.val_size=64 held-out prompts of task 'arithmetic' (data.task_kwargs={'digits': 1}): the held-out "
        "split has only 11 distinct prompts (test_fraction=0.1), fewer than n=64: ask for fewer or raise test_fraction")
    PromptDataModule(task="arithmetic", task_kwargs={"digits": 1}, val_size=11).setup("fit")


def test_a_task_kwargs_typo_names_the_setting():
    with pytest.raises(ValueError, match=r"^data\.task_kwargs=\{'max_operand': 5\} does not fit "
                                         r"data\.task='arithmetic'"):
        PromptDataModule(task="arithmetic", task_kwargs={"max_operand": 5})


def test_rank_offsets_and_resume_index_hand_worked():
    from lit_covrl.streams import rank_offsets, resume_index

    # 2 ranks x 4 prompts, 2 per update: rank 1 holds 2-3 (update 0) and 6-7 (update 1) of 8
    assert rank_offsets(1, 2, 4, 2) == [2, 3, 6, 7]
    assert rank_offsets(0, 3, 4, 1) == [0, 3, 6, 9]  # 3 ranks, one prompt per update
    assert rank_offsets(2, 3, 4, None) == [8, 9, 10, 11] == rank_offsets(2, 3, 4, 3)  # blocks of B
    assert rank_offsets(0, 1, 4, 2) == [0, 1, 2, 3]  # one rank: the stream in order
    with pytest.raises(ValueError, match="rank 2 out of range for world size 2"):
        rank_offsets(2, 2, 4)
    # rows: 10 steps of 2 x 4 = 80 positions used; 1 x 6 continues at step 14 (position 84: 4 skipped)
    step, warning = resume_index(10, task=False, world=1, batch_size=6, saved_world=2, saved_batch_size=4,
                                 saved_unit="step")
    assert step == 14 and "continuing at stream position 84 (4 skipped, none repeated)" in warning
    assert resume_index(10, task=True, world=1, batch_size=6, saved_world=2, saved_batch_size=4,
                        saved_unit="step") == (10, None)
    assert resume_index(10, task=True, world=1, batch_size=6, saved_world=2, saved_batch_size=4,
                        saved_unit=None)[0] == 20  # older code: 2 generators per step
