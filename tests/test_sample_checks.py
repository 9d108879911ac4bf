"""The sample flags' checks: max_new_tokens, temperature and the prompts file, each a one-line
error naming the flag and its allowed range."""

import pytest

from dynmoe_jax import sample_checks
from dynmoe_jax.sample_checks import MAX_NEW_TOKENS
from dynmoe_jax.validation import ConfigError


@pytest.mark.parametrize("value", [0, -3, MAX_NEW_TOKENS + 1, 2.5, True])
def test_max_new_tokens_out_of_range_is_one_line(value):
    sample_checks.check_max_new_tokens(MAX_NEW_TOKENS)
    with pytest.raises(ConfigError) as err:
        sample_checks.check_max_new_tokens(value)
    assert str(err.value) == (
        f"max_new_tokens={value!r} is invalid: allowed an integer in 1..{MAX_NEW_TOKENS}"
    )


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "hot"])
def test_bad_temperature_is_one_line(value):
    sample_checks.check_temperature(0.0)
    with pytest.raises(ConfigError) as err:
        sample_checks.check_temperature(value)
    assert str(err.value) == f"temperature={value!r} is invalid: allowed a number >= 0 (0 = greedy)"


def test_prompts_file_is_checked(tmp_path):
    (tmp_path / "ok.txt").write_text("In the beginning\n\n  \nAnd God said\n")
    assert sample_checks.read_prompts(tmp_path / "ok.txt") == ["In the beginning", "And God said"]
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    cases = {
        tmp_path / "absent.txt": "a text file with one prompt per line",
        tmp_path: "a text file with one prompt per line",
        tmp_path / "blank.txt": "a file with at least one non-blank line",
        tmp_path / "latin1.txt": "a readable UTF-8 text file (UnicodeDecodeError)",
    }
    for path, allowed in cases.items():
        with pytest.raises(ConfigError) as err:
            sample_checks.read_prompts(path)
        assert str(err.value) == f"--prompts_file={str(path)!r} is invalid: allowed {allowed}"


def test_prompts_file_in_json_lines(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "In the beginning"}\n\n{"prompt": "a\\nb"}\n')
    assert sample_checks.read_prompt_file(tmp_path / "p.jsonl") == (
        ["In the beginning", "a\nb"], sample_checks.JSONL
    )  # fmt: skip
    (tmp_path / "p.txt").write_text("In the beginning\n")
    assert sample_checks.read_prompt_file(tmp_path / "p.txt") == (
        ["In the beginning"], sample_checks.PLAIN
    )  # fmt: skip
    for n, bad in enumerate(['{"prompt": "x"}\n{"text": "y"}\n', '{"prompt": "x"}\nplain\n',
                             '{"prompt": ""}\n']):  # fmt: skip
        (tmp_path / f"bad{n}.jsonl").write_text(bad)
        with pytest.raises(ConfigError) as err:
            sample_checks.read_prompts(tmp_path / f"bad{n}.jsonl")
        line = 1 if n == 2 else 2
        assert str(err.value) == (
            f"--prompts_file={str(tmp_path / f'bad{n}.jsonl')!r} is invalid: allowed JSON Lines "
            f'of {{"prompt": "non-empty text"}} (line {line} is not)'
        )
