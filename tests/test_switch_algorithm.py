"""``--config.algorithm=NAME`` switches a config written for another algorithm: the settings
that algorithm needs (``AlgorithmSpec.config_defaults``) first, the command line's own after."""

import json

import pytest

import fedjax_sim as fs
from fedjax_sim.cli import main as cli_main


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("fedadam", "server.learning_rate", 0.1),
        ("fedyogi", "server.learning_rate", 0.1),
        ("scaffold", "client.max_local_steps", 50),
        ("fedper", "model.name", "mlp"),
        ("fedrep", "model.name", "mlp"),
    ],
)
def test_switching_sets_what_the_algorithm_needs(name, field, value):
    config = fs.load_config("default:smoke")
    group, leaf = field.split(".")
    old = config[group][leaf]
    changed = fs.algorithms.switch_algorithm(config, name)
    assert config.algorithm == name and config[group][leaf] == value
    assert changed == {field: (old, value)}


def test_settings_already_made_are_kept():
    config = fs.load_config("default:smoke")
    config.client.max_local_steps = 7  # a cap chosen by the config: SCAFFOLD keeps it
    config.model.name = "cnn"  # a model with layers of its own: FedPer keeps it
    assert fs.algorithms.switch_algorithm(config, "scaffold") == {}
    assert fs.algorithms.switch_algorithm(config, "fedper") == {}
    assert config.client.max_local_steps == 7 and config.model.name == "cnn"
    # Algorithms without needs change only the name.
    before = fs.load_config("default:smoke").to_dict()
    config = fs.load_config("default:smoke")
    assert fs.algorithms.switch_algorithm(config, "fedavgm") == {}
    assert {**before, "algorithm": "fedavgm"} == config.to_dict()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: (.*, )?fedavg, (.*, )?scaffold"):
        fs.algorithms.switch_algorithm(fs.load_config("default:smoke"), "fedmagic")


def test_the_command_line_applies_the_switch_then_its_own_overrides(capsys):
    argv = ["show-config", "--config", "default:smoke", "--config.algorithm=fedadam"]
    assert cli_main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["server"]["learning_rate"] == 0.1
    assert "algorithm=fedadam sets server.learning_rate=0.1 (was 1.0" in out.err
    # An explicit value wins, wherever it stands on the command line.
    argv = ["show-config", "--config.server.learning_rate=0.3", "--config.algorithm=fedadam"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["server"]["learning_rate"] == 0.3
    assert cli_main(["show-config", "--config.algorithm=fedmagic"]) == 2
    assert "unknown algorithm 'fedmagic'; known:" in capsys.readouterr().err
