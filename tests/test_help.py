"""--help a person can scan: options in groups, every option explained, command summaries whole, the
PISTREAM_* variables and where a secret goes named."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from pistream.cli import main

GROUPS = ["PI Web API source:", "Authentication and TLS:", "Table and Unity Catalog:", "Commits:", "Resilience:",
          "Monitoring:", "Configuration and logs:"]


def help_text(*args: str, width: int = 80) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_main_help_groups_its_options_in_order():
    text = help_text()
    positions = [text.index(title) for title in GROUPS]
    assert positions == sorted(positions)
    assert text.index("--url") < text.index("Authentication and TLS:") < text.index("--ca-bundle")
    assert text.index("Table and Unity Catalog:") < text.index("--app-id") < text.index("Commits:")
    assert text.index("Resilience:") < text.index("--stop-timeout") < text.index("Monitoring:")
    assert text.index("Configuration and logs:") < text.index("--config")


def test_the_main_help_names_the_variables_and_where_secrets_go():
    text = " ".join(help_text().split())
    assert "PISTREAM_<OPTION>" in text and "PISTREAM_PASSWORD" in text and "PISTREAM_TOKEN" in text
    assert "pistream check" in text


@pytest.mark.parametrize("command", [[], ["backfill"], ["check"], ["optimize"], ["vacuum"], ["stats"],
                                     ["simulate"], ["maintenance", "status"]])
def test_every_option_has_help(command):
    node: click.Command = main
    for name in command:
        assert isinstance(node, click.Group)
        node = node.commands[name]
    missing = [p.opts[0] for p in node.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert missing == []


def test_command_summaries_are_not_cut_off_at_80_columns():
    text = help_text(width=80)
    commands = text[text.index("Commands:"):].split("\n\n")[0]
    assert "..." not in commands
    assert {"backfill", "check", "maintenance", "optimize", "simulate", "stats", "vacuum"} <= set(
        re.findall(r"^  (\w+)", commands, re.M))


def test_simulate_counts_tags_with_tag_count_and_the_old_name_still_works():
    text = help_text("simulate")
    assert "--tag-count" in text and "--tags " not in text
    runner = CliRunner()
    both = runner.invoke(main, ["simulate", "--tag-count", "2", "--tags-file", __file__])
    assert both.exit_code == 2 and "--tag-count or --tags-file" in both.output
