"""RewardSet: item-level and batched rewards, row columns as keyword arguments, weights, fault
containment; rewards given through the CLI by dotted path, with and without annotations."""
from __future__ import annotations

import math
import time

import pytest

from lit_covrl import rewards
from lit_covrl.reward_set import RewardSet, is_batched, reward_name
from lit_covrl.rewards import ExactMatchReward


@pytest.fixture(autouse=True)
def fresh_warning_budget(monkeypatch):
    monkeypatch.setattr(rewards, "_item_warnings_emitted", 0)


def plain(completion, answer):
    return float(completion == answer)


class NoAnnotations:
    def __init__(self, bonus=2.0):
        self.bonus = bonus

    def __call__(self, completion, answer):
        return self.bonus if completion == answer else 0.0


def with_columns(completion, answer, prompt, difficulty):
    return difficulty if completion == answer else -1.0


def batched(completions, answers, prompts, difficulty):
    return [d * (c == a) for c, a, d in zip(completions, answers, difficulty)]


def test_forms_and_names():
    assert not is_batched(plain) and not is_batched(NoAnnotations())
    assert is_batched(batched)
    flagged = NoAnnotations()
    flagged.batched = True
    assert is_batched(flagged)
    named = NoAnnotations()
    named.name = "mine"
    assert [reward_name(f) for f in (plain, NoAnnotations(), ExactMatchReward(), named)] == [
        "plain", "no_annotations", "exact_match", "mine"]
    assert RewardSet([plain, plain, plain]).names == ["plain", "plain_2", "plain_3"]


def test_item_level_gets_prompt_and_columns_it_names():
    seen = []

    def spy(completion, answer, prompt, source, **rest):
        seen.append((completion, answer, prompt, source, rest))
        return 1.0

    cols = [{"source": "a", "difficulty": 3, "answer": "shadowed"}, {"source": "b", "difficulty": 5}]
    RewardSet([spy, with_columns]).score(["x", "y"], ["x", "z"], ["p1", "p2"], cols, timeout_s=None)
    # `answer` from a column never shadows the reference answer; other columns go to **rest
    assert seen == [("x", "x", "p1", "a", {"difficulty": 3}), ("y", "z", "p2", "b", {"difficulty": 5})]
    total, per, res = RewardSet([with_columns]).score(["x", "y"], ["x", "z"], ["p1", "p2"], cols, timeout_s=None)
    assert per["with_columns"] == [3.0, -1.0] and res.failures == 0  # difficulty of row 1; miss = -1


def test_columns_named_like_the_passed_arguments_are_warned_and_dropped_in_both_forms(caplog):
    """Data columns named answer / prompt / completion(s) never reach a reward (its arguments of
    those names get the answer, prompt and completion): start-up names them, and the batched form
    drops a `prompt` column as the item-level form does (it passed it beside `prompts`; review
    byo21)."""
    seen = {}

    def item(completion, answer, **rest):
        seen["item"] = rest
        return 1.0

    def batch(completions, answers, prompts, **rest):
        seen["batch"] = rest
        return [1.0] * len(completions)

    cols = [{"prompt": "source text", "answer": "alt", "level": 2}]
    rs = RewardSet([item, batch])
    with caplog.at_level("WARNING"):
        rs.check_calls(["1"], ["2+1="], cols)
    assert "data column(s) ['answer', 'prompt'] are not passed to the rewards" in caplog.text
    rs.score(["3"], ["1"], ["2+1="], cols, timeout_s=None)
    assert seen == {"item": {"prompt": "2+1=", "level": 2}, "batch": {"level": [2]}}
    caplog.clear()
    with caplog.at_level("WARNING"):
        rs.check_calls(["1"], ["2+1="], [{"level": 2}])
    assert "not passed to the rewards" not in caplog.text


def test_weighted_sum_of_item_and_batched_rewards():
    cols = [{"difficulty": 2}, {"difficulty": 4}, {"difficulty": 8}]
    rs = RewardSet([plain, NoAnnotations(bonus=3.0), batched], weights=[1.0, 0.5, 0.25])
    total, per, res = rs.score(["a", "b", "c"], ["a", "x", "c"], ["p"] * 3, cols, timeout_s=5.0)
    assert per == {"plain": [1.0, 0.0, 1.0], "no_annotations": [3.0, 0.0, 3.0], "batched": [2.0, 0.0, 8.0]}
    # row 0: 1 + 0.5*3 + 0.25*2 = 3.0; row 1: 0; row 2: 1 + 1.5 + 0.25*8 = 4.5
    assert total == [3.0, 0.0, 4.5] and res.failures == 0


def test_batched_faults_are_contained(caplog):
    def raises(completions):
        raise RuntimeError("boom")

    def short(completions):
        return [1.0]

    def some_bad(completions):
        return [1.0, float("nan"), "x"]

    def hangs(completions):
        time.sleep(30)

    def iter_raises(completions):  # an iterator that fails while the values are collected
        yield 1.0
        raise RuntimeError("mid-iteration")

    def too_big(completions):  # 10**400 overflows float(); 1e39 is inf in float32; repr(10**5000) raises
        return [10**400, 1e39, 10**5000]

    def huge_int(completions):  # not a list, and its repr raises
        return 10**5000

    for fn, failures, values in [(raises, (3, 0, 0), [0.0] * 3), (short, (0, 0, 3), [0.0] * 3),
                                 (some_bad, (0, 0, 2), [1.0, 0.0, 0.0]), (hangs, (0, 3, 0), [0.0] * 3),
                                 (iter_raises, (0, 0, 3), [0.0] * 3), (too_big, (0, 0, 3), [0.0] * 3),
                                 (huge_int, (0, 0, 3), [0.0] * 3)]:
        t0 = time.perf_counter()
        total, _, res = RewardSet([fn]).score(["a", "b", "c"], ["a"] * 3, timeout_s=0.1)
        assert (res.errors, res.timeouts, res.invalid) == failures, fn.__name__
        assert total == values and all(math.isfinite(v) for v in total)
        assert time.perf_counter() - t0 < 5  # 0.1 s x 3 items for the hang
    assert "whole batch of 3" in caplog.text


def test_a_whole_batch_failure_is_summed_as_its_items(monkeypatch, caplog):
    """With the per-item messages used up, a batched reward returning one value too many was logged
    as "1 of 3 items scored 0.0 (... invalid=3)": its one failure entry counted (review byo25 F14)."""
    monkeypatch.setattr(rewards, "_item_warnings_emitted", rewards._MAX_ITEM_WARNINGS)

    def one_too_many(completions):
        return [1.0] * (len(completions) + 1)

    RewardSet([one_too_many]).score(["a", "b", "c"], ["a"] * 3, timeout_s=None)
    assert "reward one_too_many: 3 of 3 items scored 0.0 (errors=0, timeouts=0, invalid=3); per-item messages " \
        "are no longer shown" in caplog.text


def test_a_batched_reward_returning_a_mapping_or_text_is_an_invalid_batch(caplog):
    """`list(value)` read a dict as its keys: {row: reward} scored each row its index, unnoticed."""
    def by_index(completions, answers):
        return {i: float(c == a) for i, (c, a) in enumerate(zip(completions, answers))}

    def text(completions):
        return "1001"

    def raw(completions):
        return b"\x01\x00\x00\x01"

    for fn in (by_index, text, raw):
        total, _, res = RewardSet([fn]).score(["7", "5", "9", "1"], ["5"] * 4, timeout_s=None)
        assert total == [0.0] * 4 and res.invalid == 4, fn.__name__
        assert f"reward {fn.__name__}, item 0: invalid: whole batch of 4: returned" in caplog.text
    assert "(type dict), expected a list of 4 numbers" in caplog.text


def accuracy_reward(completions, solution, **kwargs):  # the shape of TRL's documented examples
    return [float(c.strip() == s.strip()) for c, s in zip(completions, solution)]


def test_answers_under_the_answer_fields_name():
    """The reader takes the answer field out of the columns: a reward naming it (TRL's
    `solution`) gets the answers under that name."""
    seen = []

    def item(completion, answer, ground_truth):
        seen.append(ground_truth)
        return float(completion == ground_truth)

    def only_kwargs(completions, **kwargs):  # names no answer field: gets only the columns
        seen.append(sorted(kwargs))
        return [0.0] * len(completions)

    total, _, res = RewardSet([accuracy_reward], answer_field="solution").score(
        ["2", "5"], ["2", "4"], ["1+1=", "2+2="], [{"level": 1}, {"level": 2}], timeout_s=None)
    assert total == [1.0, 0.0] and res.failures == 0
    rs = RewardSet([item, only_kwargs], answer_field="reward_model.ground_truth")  # verl's layout
    total, _, res = rs.score(["a", "b"], ["a", "c"], None, [{"reward_model": {}}] * 2, timeout_s=None)
    assert total == [1.0, 0.0] and res.failures == 0
    assert seen == ["a", "c", ["answers", "prompts", "reward_model"]]


def test_answer_field_alias_yields_to_columns_and_passed_names():
    def seen_solution(completions, solution):
        return [float(s) for s in solution]

    # a real column of that name wins (here: a nested answer field whose last name is a column)
    rs = RewardSet([seen_solution], answer_field="meta.solution")
    assert rs.score(["x"], ["1"], None, [{"solution": 7}], timeout_s=None)[0] == [7.0]
    # without the answer field's name a TRL reward cannot be called: the start-up check on rows of
    # the data says so, naming the argument; a batch scored anyway keeps it an item-level fault
    with pytest.raises(TypeError, match="'accuracy_reward' cannot be called .*'solution'"):
        RewardSet([accuracy_reward]).check_calls(["2"], ["p"])
    _, _, res = RewardSet([accuracy_reward]).score(["2"], ["2"], timeout_s=None)
    assert res.errors == 1

    def prompts_are_prompts(completions, prompts):
        return [float(p == "q") for p in prompts]

    # the name of an argument RewardSet passes itself is never aliased
    rs = RewardSet([prompts_are_prompts], answer_field="prompts")
    assert rs.score(["x"], ["a"], ["q"], timeout_s=None)[0] == [1.0]


def test_verl_compute_score_gets_the_completion_and_the_reference_by_name():
    """verl's compute_score(data_source, solution_str, ground_truth, extra_info=None): bound by
    position, it got the completion as data_source and the reference as solution_str and
    ground_truth, so it compared the reference with itself and scored every completion 1.0."""
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.append((data_source, solution_str, ground_truth, extra_info))
        return float(solution_str.strip() == ground_truth)

    rs = RewardSet([compute_score], answer_field="reward_model.ground_truth")  # verl's layout
    cols = [{"data_source": "gsm8k", "extra_info": {"index": 0}}, {"data_source": "math", "extra_info": {"index": 1}}]
    rs.check_calls(["42", "7"], ["q", "r"], cols)
    total, _, res = rs.score(["wrong answer 7", " 7"], ["42", "7"], ["q", "r"], cols, timeout_s=None)
    assert total == [0.0, 1.0] and res.failures == 0
    assert seen == [("gsm8k", "wrong answer 7", "42", {"index": 0}), ("math", " 7", "7", {"index": 1})]
    # without an extra_info column: the row's columns; on the worker thread too
    seen.clear()
    total, _, res = rs.score(["42"], ["42"], ["q"], [{"data_source": "gsm8k", "level": 3}], timeout_s=5.0)
    assert total == [1.0] and res.failures == 0
    assert seen == [("gsm8k", "42", "42", {"data_source": "gsm8k", "level": 3})]
    # a row without data_source: the start-up check names the argument
    with pytest.raises(TypeError, match=r"'compute_score' cannot be called as fn\(solution_str=completion, "
                                        r"ground_truth=answer, \*\*columns\) \(missing a required argument: 'data_source'"):
        rs.check_calls(["42"], ["q"], [{"level": 3}])


@pytest.mark.parametrize(
    "params,answer_field,refused",
    [
        ("data_source, solution", None, "'data_source' gets the completion"),
        ("completion, extra_info", None, "'extra_info' gets the reference answer"),
        ("completion, level", None, "'level' gets the reference answer .* names a column of the data"),
        ("level, answer", None, "'level' gets the completion"),
        ("completion, prompt", None, "'prompt' gets the reference answer .* names the prompt"),
        ("answer, completion", None, "'answer' gets the completion .* names the reference answer"),
        ("solution, completion", "solution", "'solution' gets the completion .* names the reference answer"),
        ("ground_truth, x", None, "'ground_truth' gets the completion"),
        ("completion, answer", None, None),
        ("completion, ground_truth", None, None),  # verl's name in its place
        ("c, solution", "solution", None),  # the answer field's name in its place
        ("text, ref, level", None, None),
    ],
)
def test_item_level_parameters_named_as_if_they_got_something_else_fail_at_start_up(params, answer_field, refused):
    """The first two parameters of an item-level reward get the completion and the answer whatever
    their names: one named like a column, the answer field or a verl argument was silently given
    the wrong value."""
    namespace: dict = {}
    exec(f"def reward({params}):\n    return 1.0", namespace)
    rs = RewardSet([namespace["reward"]], answer_field=answer_field)
    rows = [{"level": 1, "data_source": "x", "extra_info": {}}]
    if refused is None:
        rs.check_calls(["1"], ["p"], rows)
    else:
        with pytest.raises(TypeError, match=f"^model.reward 'reward': its parameter {refused}"):
            rs.check_calls(["1"], ["p"], rows)


def test_weights_must_match_rewards():
    with pytest.raises(ValueError, match="reward_weights has 1 weights for 2 rewards"):
        RewardSet([plain, plain], [1.0])
    with pytest.raises(ValueError, match=r"model.reward\[1\].*not callable"):
        RewardSet([plain, 3])
    # a NaN weight made every total NaN, an infinite one a reward of 0 NaN
    with pytest.raises(ValueError, match=r"^model.reward_weights\[0\] must be a finite number, got nan$"):
        RewardSet([ExactMatchReward()], [float("nan")])
    with pytest.raises(ValueError, match=r"^model.reward_weights\[1\] must be a finite number, got inf$"):
        RewardSet([plain, plain], [1.0, float("inf")])


@pytest.mark.parametrize("value,kind,name", [
    ("tests.test_reward_set.plain", "function", "plain"),
    ("tests.test_reward_set.NoAnnotations", NoAnnotations, "no_annotations"),
    ('{"class_path": "tests.test_reward_set.NoAnnotations", "init_args": {"bonus": 5}}', NoAnnotations,
     "no_annotations"),
    ('[tests.test_reward_set.plain, tests.test_reward_set.batched]', list, None),
])
def test_cli_takes_functions_and_unannotated_classes(value, kind, name, tmp_path):
    """The reward field's type is `Callable | list[Callable]`: jsonargparse's protocol check (which
    compares annotations) rejected unannotated classes when it was the RewardFunction Protocol."""
    from lit_covrl.cli import LitCovRLCLI
    from lit_covrl.data import PromptDataModule
    from lit_covrl.module import GRPOModule
    from tests.test_configs import QUICK

    cli = LitCovRLCLI(GRPOModule, PromptDataModule, parser_kwargs={"parser_mode": "omegaconf"}, run=False, args=[
        "--config", str(QUICK), "--model.reward", value, "--trainer.logger.init_args.save_dir", str(tmp_path)])
    reward = cli.model.reward
    if kind == "function":
        assert reward is plain
    elif kind is list:
        assert reward == [plain, batched] and cli.model.rewards.names == ["plain", "batched"]
    else:
        assert isinstance(reward, kind) and reward.bonus == (5 if "init_args" in value else 2.0)
    if name:
        assert cli.model.rewards.names == [name]


def test_a_reward_that_cannot_take_its_arguments_fails_naming_itself_and_the_columns():
    """Wrong arity, or a required parameter the data has no column for: each call raised TypeError,
    contained per item, so every completion scored 0 for the whole run and the run ended with rc 0."""
    def one_arg(completion):
        return 1.0

    def needs_column(completion, answer, tolerance):
        return 1.0

    def batched_needs(completions, answers, level):
        return [1.0] * len(completions)

    rows = [{"foo": 1}, {"foo": 2}]
    for fn, why in ((one_arg, "too many positional arguments"), (needs_column, "missing a required argument: 'tolerance'"),
                    (batched_needs, "missing a required argument: 'level'")):
        with pytest.raises(TypeError, match=rf"model.reward '{fn.__name__}' cannot be called as .*\({why}\); the data's columns: foo"):
            RewardSet([fn]).check_calls(["1", "2"], ["p", "q"], rows)  # at start-up, on rows of the data
    # while scoring, only what no column could mend (the arity) stops the run
    with pytest.raises(TypeError, match="'one_arg' cannot be called .*too many positional arguments"):
        RewardSet([one_arg]).score(["x", "y"], ["1", "2"], columns=rows)
    # a batch whose rows lack a column (others have it) stays an item-level fault: scored 0, counted
    totals, _, res = RewardSet([needs_column]).score(["x", "y"], ["1", "2"], columns=[{}, {}])
    assert totals == [0.0, 0.0] and res.errors == 2
    # a column that only some rows lack passes the start-up check
    RewardSet([needs_column]).check_calls(["1", "2"], ["p", "q"], [{"tolerance": 0.1}, {}])

    # the callable's own signature: a functools.wraps decorator that supplies an argument works
    import functools

    def supplies_scale(f):
        @functools.wraps(f)
        def wrapper(completion, answer):
            return f(completion, answer, scale=2.0)
        return wrapper

    @supplies_scale
    def scaled(completion, answer, scale):
        return scale * float(completion == answer)

    RewardSet([scaled]).check_calls(["1"], ["p"])
    assert RewardSet([scaled]).score(["1", "x"], ["1", "1"], timeout_s=None)[0] == [2.0, 0.0]


def test_a_reward_that_cannot_take_the_datas_arguments_fails_at_start_up(tiny_model_dir, tmp_path):
    """Checked on rows of the data in the module's setup, before any rollout (a file's rows, or a
    synthetic task's held-out sample)."""
    import json

    from lit_covrl.data import PromptDataModule
    from tests.helpers import fit
    from tests.test_module import make_module

    def needs_tolerance(completion, answer, tolerance):
        return 1.0

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "level": i}) + "\n" for i in range(4)))
    for data in (PromptDataModule(task=None, train_files=[str(path)], batch_size=2),
                 PromptDataModule(task="arithmetic", batch_size=2, val_size=4)):
        module = make_module(tiny_model_dir, reward=needs_tolerance)
        module.generate = None  # a rollout would fail with another error: none may happen
        with pytest.raises(TypeError, match="'needs_tolerance' cannot be called .*'tolerance'"):
            fit(module, data, steps=1, limit_val_batches=0)


def test_a_solution_str_parameter_alone_is_an_ordinary_item_level_reward():
    """`r(solution_str, answer)` filled by position before verl's form was supported; it became a
    start-up error (no ground_truth to pass the answer to). verl's form needs both names."""
    from lit_covrl.reward_set import is_verl

    def r(solution_str, answer):
        return float(solution_str == answer)

    def verl_gsm8k(solution_str, ground_truth, method="strict"):
        return float(solution_str == ground_truth)

    assert not is_verl(r) and is_verl(verl_gsm8k)
    for fn in (r, verl_gsm8k):
        rs = RewardSet([fn])
        rs.check_calls(["7"], ["q"], [{}])
        assert rs.score(["7", "8"], ["7", "7"], ["q", "q"], timeout_s=None)[0] == [1.0, 0.0]


def test_a_verl_reward_may_return_a_dict_with_its_score():
    """verl takes a number or {"score": ..., ...} (its DAPO-style scorers return the dict): every
    such result counted as invalid and scored 0, and the run trained on all-zero rewards."""
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        ok = float(solution_str == ground_truth)
        return {"score": ok, "acc": bool(ok)}

    rs = RewardSet([compute_score])
    total, _, res = rs.score(["5", "6"], ["5", "5"], ["q", "q"], [{"data_source": "x"}] * 2, timeout_s=None)
    assert total == [1.0, 0.0] and res.failures == 0


def test_a_reward_that_edits_its_arguments_changes_neither_the_data_nor_the_other_calls():
    """Rewards got the data rows' own objects: one that appended to a conversation prompt (building a
    judge prompt) or popped a column changed the row for the step's other calls and for every later
    epoch, so the policy's own prompt grew (review byo25 F16). Each call now gets copies."""
    seen = []

    def judge(completion, answer, prompt, meta):
        seen.append((len(prompt), sorted(meta)))
        prompt.append({"role": "assistant", "content": completion})
        meta.pop("tol")
        return 1.0

    def batched_judge(completions, answers, prompts, meta):
        for p, m in zip(prompts, meta):
            p.append({"role": "assistant", "content": "x"})
            m.clear()
        return [0.0] * len(completions)

    conversation = [{"role": "user", "content": "1+1="}]
    cols = [{"meta": {"tol": 0.1, "unit": "m"}}] * 3  # a group: three calls on one data row
    rewards = RewardSet([judge, batched_judge])
    for _ in range(2):  # two steps (epochs) on the same row
        total, _, res = rewards.score(["2", "3", "2"], ["2"] * 3, [conversation] * 3, cols, timeout_s=None)
        assert res.failures == 0 and total == [1.0, 1.0, 1.0]
    assert seen == [(1, ["tol", "unit"])] * 6
    assert conversation == [{"role": "user", "content": "1+1="}] and cols[0] == {"meta": {"tol": 0.1, "unit": "m"}}
