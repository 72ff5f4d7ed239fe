import re

import pytest

from trb_exp.data import encode_prompts, encode_targets
from trb_exp.data.arithmetic import ArithmeticSpec, extract_answer, grade, make_splits, solve
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.data import CONF_DIR


def test_solution_follows_precedence():
    steps, ans = solve([23, 45, 2, 7], ["+", "*", "-"])
    assert steps == ["45*2=90", "23+90=113", "113-7=106"] and ans == 106
    steps, ans = solve([2, 9, 9, 0], ["-", "-", "*"])
    assert steps == ["9*0=0", "2-9=-7", "-7-0=-7"] and ans == -7


def test_generator_is_deterministic_and_splits_disjoint():
    spec = ArithmeticSpec(train_size=500, test_size=50)
    a, b = make_splits(spec), make_splits(spec)
    assert a["train"]["prompt"] == b["train"]["prompt"] and a["test"]["prompt"] == b["test"]["prompt"]
    assert not set(a["train"]["prompt"]) & set(a["test"]["prompt"])
    c = make_splits(ArithmeticSpec(train_size=500, test_size=50, seed=1))
    assert c["test"]["prompt"] != a["test"]["prompt"]
    # growing the train split leaves the test split unchanged
    assert make_splits(ArithmeticSpec(train_size=900, test_size=50))["test"]["prompt"] == a["test"]["prompt"]
    for row in a["test"]:
        assert row["solution"].endswith(f"A:{row['answer']}")
        assert eval(row["prompt"][:-1]) == int(row["answer"])  # python agrees with the worked solution


def test_grader_reads_last_answer():
    assert grade("4*2=8;3+8=11;A:11", "11")
    assert grade("A:3;A:-5", "-5")
    assert not grade("4*2=8;3+8=11", "11")  # no answer line
    assert not grade("A:12", "1")
    assert extract_answer("xx A:007") == "007" and grade("A:007", "7")


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match="dataset.ops"):
        ArithmeticSpec(ops="/")
    with pytest.raises(ValueError, match="min_operands"):
        ArithmeticSpec(min_operands=5, max_operands=3)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12*3-4=12*3=36;36-4=32;A:32"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and len(ids) == len(text) + 1
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.convert_ids_to_tokens(ids[1:4]) == ["1", "2", "*"]


def test_prompt_and_target_encoding_pads_on_the_right_sides():
    tok = build_char_tokenizer()
    ids, mask = encode_prompts(tok, ["1+2=", "12*3-4="])
    assert ids.shape == (2, 8) and mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert ids[0, 3] == tok.bos_token_id
    t_ids, t_mask = encode_targets(tok, ["A:3", "A:32"])
    assert t_ids[0].tolist()[-2:] == [tok.eos_token_id, tok.pad_token_id]
    assert t_mask.sum(1).tolist() == [4, 5]


def _task(**over):
    from omegaconf import OmegaConf

    from trb_exp.data import load_task

    return load_task(OmegaConf.merge(OmegaConf.load(CONF_DIR / "dataset" / "arithmetic.yaml"), over))


def test_validation_split_is_disjoint_and_leaves_train_and_test_alone():
    with_val, without = _task(), _task(val_size=0)
    assert len(with_val.val_prompts) == 200 and without.val_prompts == []
    # the train and test splits are those of make_splits, unchanged by the validation split
    ref = make_splits(ArithmeticSpec())
    for t in (with_val, without):
        assert t.train_prompts == list(ref["train"]["prompt"]) and t.test_prompts == list(ref["test"]["prompt"])
    val = set(with_val.val_prompts)
    assert len(val) == 200 and not val & set(with_val.train_prompts) and not val & set(with_val.test_prompts)
    assert all(grade(f"A:{a}", a) for a in with_val.val_answers)
    for p, a in zip(with_val.val_prompts, with_val.val_answers):  # each answer is its prompt's
        nums, ops = [int(x) for x in re.findall(r"\d+", p)], re.findall(r"[-+*]", p)
        assert str(solve(nums, ops)[1]) == a
    assert _task().val_prompts == with_val.val_prompts  # seeded: the same on every call
    assert _task(seed=1).val_prompts != with_val.val_prompts  # and follows the split seed


def test_validation_split_as_large_as_the_space_allows_and_bad_size():
    from trb_exp.config import ConfigError

    # 2 operands of 0..1 with '+': 4 expressions, all taken by train (2) and test (2)
    tiny = _task(min_operands=2, max_operands=2, max_operand=1, ops="+", train_size=2, test_size=2)
    assert tiny.val_prompts == []
    with pytest.raises(ConfigError, match=r"^dataset.val_size=-1: give an integer >= 0 \(0 = no validation split\)$"):
        _task(val_size=-1)
