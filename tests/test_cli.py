"""The ``btcv-unetr`` command line: every sub-command's help is printed, whatever its help strings hold."""

import pytest

from btcv_unetr.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_its_help(command, capsys):
    # argparse expands "%" in help strings: a bare "75% of" once made `btcv-unetr serve --help` a traceback.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: btcv-unetr {command} [-h]") and "show this help message and exit" in out


def test_serve_help_states_the_memory_default_as_a_percentage(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default 0: 75% of this machine's memory)" in " ".join(capsys.readouterr().out.split())
