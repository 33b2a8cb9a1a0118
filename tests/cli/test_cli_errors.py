"""Bad input on the command line: one readable line on stderr, exit status 1, nothing written."""

from __future__ import annotations

import pytest

from flexmoe.cli import ERROR_CHARS, main


def run(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


def test_a_huge_value_in_a_recipe_is_one_short_line(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: '{'x' * 1_000_000}'\nmodels: [a, b]\n")
    code, err = run(capsys, "merge", recipe, "--out", tmp_path / "out")
    assert code == 1 and err.startswith("flexmoe: error: ") and err.count("\n") == 1
    assert len(err) < ERROR_CHARS + 200 and "more characters" in err
    assert not (tmp_path / "out").exists()


def test_an_alias_bomb_recipe_is_one_line(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    recipe.write_text("\n".join([*lines, "method: average", "models: *i"]))
    code, err = run(capsys, "merge", recipe, "--out", tmp_path / "out")
    assert code == 1 and "expands to more than" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [recipe]
