"""Problems: the synthetic generator's format, and GSM8K loading with errors that name the file, line and reason."""

import json

import pytest

from looper.answers import is_correct
from looper.config import DataConfig
from looper.data import DataError, gsm8k_splits, pretraining_text, read_gsm8k_jsonl, synthetic_splits
from looper.equations import find_equations
from tests.conftest import shared_file


def test_synthetic_problems_are_in_gsm8k_format_and_their_annotations_hold():
    splits = synthetic_splits(DataConfig())
    for problem in splits["train"][:300]:
        lines = problem["answer"].splitlines()
        assert lines[-1] == f"#### {problem['gold']}"
        assert 1 <= len(lines) - 1 <= 3
        equations = find_equations(problem["answer"])
        assert len(equations) == len(lines) - 1 and all(e.holds for e in equations)
        assert is_correct(problem["answer"], problem["gold"], "strict")


def test_synthetic_splits_are_seeded_sized_and_disjoint():
    cfg = DataConfig(synthetic_train=50, synthetic_dev=10, synthetic_test=10)
    first, second = synthetic_splits(cfg), synthetic_splits(cfg)
    assert first == second
    assert [len(first[s]) for s in ("train", "dev", "test")] == [50, 10, 10]
    questions = [{p["question"] for p in first[s]} for s in ("train", "dev", "test")]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    assert synthetic_splits(DataConfig(synthetic_seed=99, synthetic_train=50))["train"] != first["train"]


def test_pretraining_text_has_the_arithmetic_but_not_the_answer_format():
    problem = synthetic_splits(DataConfig())["train"][0]
    text = pretraining_text(problem)
    assert "####" not in text and "<<" not in text and problem["gold"] in text


def _write(tmp_path, lines):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "Q?", "answer": "1+1=<<1+1=2>>2\n#### 2"})


@pytest.mark.parametrize(
    "bad,reason",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"question": "Q?"}), "missing or empty field 'answer'"),
        (json.dumps({"question": "Q?", "answer": "it is 4"}), "no '#### N'"),
        (json.dumps(["a", "list"]), "expected a JSON object"),
    ],
)
def test_a_malformed_line_names_its_file_line_and_reason(tmp_path, bad, reason):
    path = _write(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as error:
        read_gsm8k_jsonl(path, "x")
    assert f"{path}:3" in str(error.value) and reason in str(error.value)


def test_gold_answers_with_separators_and_signs_parse(tmp_path):
    path = _write(
        tmp_path,
        [json.dumps({"question": "Q", "answer": "#### 114,200"}), json.dumps({"question": "Q", "answer": "#### -10"})],
    )
    assert [r["gold"] for r in read_gsm8k_jsonl(path, "x")] == ["114200", "-10"]


def test_gsm8k_from_a_directory_gets_a_seeded_dev_split(tmp_path):
    rows = [json.dumps({"question": f"Q{i}", "answer": f"#### {i}"}) for i in range(50)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    tests = [json.dumps({"question": f"T{i}", "answer": f"#### {i}"}) for i in range(5)]
    (tmp_path / "test.jsonl").write_text("\n".join(tests) + "\n")
    splits = gsm8k_splits(DataConfig(name="gsm8k", path=str(tmp_path), dev_fraction=0.2, split_seed=3))
    assert (len(splits["train"]), len(splits["dev"]), len(splits["test"])) == (40, 10, 5)
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["dev"]}
    again = gsm8k_splits(DataConfig(name="gsm8k", path=str(tmp_path), dev_fraction=0.2, split_seed=3))
    assert again["dev"] == splits["dev"]


def test_test_questions_that_are_also_training_questions_are_refused_unless_allowed(tmp_path):
    rows = [json.dumps({"question": f"How many is {i}?", "answer": f"#### {i}"}) for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    leaked = json.dumps({"question": "How many  is 3?\n", "answer": "#### 3"})  # the same question, spaced otherwise
    (tmp_path / "test.jsonl").write_text(leaked + "\n" + json.dumps({"question": "New?", "answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match=r"1 questions of the GSM8K test split also appear in the training data"):
        gsm8k_splits(DataConfig(name="gsm8k", path=str(tmp_path)))
    assert len(gsm8k_splits(DataConfig(name="gsm8k", path=str(tmp_path), allow_overlap=True))["test"]) == 2


def test_a_lone_surrogate_is_refused_naming_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD + "\n" + '{"question": "Q\\ud800?", "answer": "#### 1"}' + "\n")
    with pytest.raises(DataError, match=f"{path}:2:16: field 'question' holds a lone UTF-16 surrogate"):
        read_gsm8k_jsonl(path, "x")
    path.write_text('{"question": "Q \\ud83d\\ude00?", "answer": "#### 1"}\n')  # a pair is an emoji: fine
    assert read_gsm8k_jsonl(path, "x")[0]["question"] == "Q \U0001f600?"


@pytest.mark.data
def test_the_real_gsm8k_files_load():
    root = shared_file("gsm8k", "train.jsonl").parent
    splits = gsm8k_splits(DataConfig(name="gsm8k", path=str(root)))
    assert len(splits["train"]) + len(splits["dev"]) == 7473 and len(splits["test"]) == 1319


def test_an_empty_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=f"{path}: holds no problems"):
        read_gsm8k_jsonl(path, "x")


def test_a_byte_that_is_not_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes((GOOD + "\n").encode() + b'{"question": "Q\xff?", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=f"{path}:2:16: not UTF-8 \\(byte 0xff\\)"):
        read_gsm8k_jsonl(path, "x")


def test_platinum_questions_in_the_training_file_are_refused_at_start(tmp_path):
    from looper import preflight
    from tests.conftest import compose

    rows = [json.dumps({"question": f"How many is {i}?", "answer": f"#### {i}"}) for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "New?", "answer": "#### 1"}) + "\n")
    (tmp_path / "platinum.jsonl").write_text(rows[7] + "\n")
    settings = ["data=gsm8k", f"data.path={tmp_path}", f"eval.platinum_path={tmp_path / 'platinum.jsonl'}"]
    settings += ["eval.datasets=[gsm8k_platinum]", "logger=none", "rollout.num_questions=4"]
    with pytest.raises(DataError, match=r"1 questions of GSM8K-Platinum also appear in the training data"):
        preflight.check(compose(*settings))
    preflight.check(compose(*settings, "data.allow_overlap=true"))
