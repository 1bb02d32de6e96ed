"""`check CONFIG` (precompute/check.py): every problem a run would hit, found without running it.

Each bad config of tests/test_precompute_errors.py (which `run` refuses) is a problem `check`
reports too, with the same message; a config with several problems gets all of them in one
report; a good config passes; nothing is written."""

from __future__ import annotations

import pytest

from precompute.__main__ import main
from tests.test_precompute_errors import CASES, _base, setup  # noqa: F401 - the fixture

# refused by the command line before any config is read, or only when a run directory exists
NOT_CONFIG_PROBLEMS = {"bad run id"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in NOT_CONFIG_PROBLEMS])
def test_check_finds_what_run_would_refuse(setup, case, tmp_path, capsys):  # noqa: F811
    mutate, message = CASES[case]
    cfg = tmp_path / "bad.toml"
    cfg.write_text(mutate(setup, _base(setup)))
    assert main(["check", str(cfg)]) == 2
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem  ")]
    assert problems and any(message in line for line in problems), out
    assert "Traceback" not in out


def test_several_problems_are_reported_together(setup, tmp_path, capsys):  # noqa: F811
    s = setup
    text = (
        _base(s)
        .replace(f'"{s["demo"]}/saes/finetuned_sae"', f'"{s["narrow"]}"')  # d_in 16 vs width 32
        .replace(f'"{s["demo"]}/finetuned"', f'"{s["other"]}"')  # renumbered tokenizer
        .replace(str(s["corpus"]), "/nonexistent/corpus.parquet")  # no corpus
    )
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["check", str(cfg)]) == 2
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem  ")]
    for message in ("has d_in=16 but the model's activation", "tokenizers do not match", "/nonexistent/corpus.parquet does not exist"):
        assert any(message in line for line in problems), (message, out)
    assert out.strip().splitlines()[-1].endswith(f"{len(problems)} problems")


def test_a_good_config_passes_and_nothing_is_written(setup, tmp_path, capsys):  # noqa: F811
    cfg = tmp_path / "ok.toml"
    cfg.write_text(_base(setup))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "problem  " not in out and out.strip().endswith("no problems found")
    assert "ok       token sample" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sae_transfer_check_is_the_same_command(setup, tmp_path, capsys):  # noqa: F811
    from sae_transfer.cli import main as cli

    cfg = tmp_path / "ok.toml"
    cfg.write_text(_base(setup))
    assert cli(["check", str(cfg)]) == 0
    assert capsys.readouterr().out.strip().endswith("no problems found")
