"""argv from the ToolSpec's entrypoint/command and the run's arguments."""

from __future__ import annotations

import pytest

from services.executor.command import build_argv, expand
from services.executor.errors import CommandError


def test_placeholder_element_is_replaced_by_string_argument():
    assert expand(["greet", "{name}"], {"name": "Ada Lovelace"}) == ["greet", "Ada Lovelace"]


def test_argument_with_shell_syntax_stays_one_literal_element():
    hostile = "$(rm -rf /); `id` && echo *"
    assert expand(["echo", "{text}"], {"text": hostile}) == ["echo", hostile]


def test_placeholder_inside_a_longer_element_is_not_interpolated():
    argv = expand(["--name={name}", "x{name}", "{name}"], {"name": "v"})
    assert argv == ["--name={name}", "x{name}", "v"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, ["true"]), (False, ["false"]), (0, ["0"]), (42, ["42"]), (1.5, ["1.5"])],
)
def test_scalar_arguments_become_their_json_spelling(value, expected):
    assert expand(["{v}"], {"v": value}) == expected


def test_list_argument_expands_into_several_elements():
    argv = expand(["tool", "{files}", "--end"], {"files": ["a.txt", 2, True]})
    assert argv == ["tool", "a.txt", "2", "true", "--end"]


def test_empty_list_argument_expands_to_nothing():
    assert expand(["tool", "{files}"], {"files": []}) == ["tool"]


def test_absent_or_null_argument_drops_the_element():
    assert expand(["tool", "{opt}", "{other}", "end"], {"other": None}) == ["tool", "end"]


@pytest.mark.parametrize(
    ("value", "kind"),
    [({"a": 1}, "object"), ([["nested"]], "nested list"), ([{"a": 1}], "object"), ([None], "null")],
)
def test_object_or_nested_value_is_refused(value, kind):
    with pytest.raises(CommandError, match=f"argument 'opts': an? {kind} value") as caught:
        expand(["tool", "{opts}"], {"opts": value})
    assert caught.value.argument == "opts"


def test_entrypoint_is_expanded_and_none_keeps_the_image_entrypoint(make_spec):
    spec = make_spec(["{mode}", "run"], entrypoint=["/bin/tool", "{level}"])
    argv = build_argv(spec, {"mode": "fast", "level": 3})
    assert argv.entrypoint == ["/bin/tool", "3"]
    assert argv.command == ["fast", "run"]

    assert build_argv(make_spec(["run"]), {}).entrypoint is None


@pytest.mark.parametrize("value", ["print(1)\x00", ["ok", "\x00"]])
def test_string_with_a_nul_character_is_refused_since_argv_cannot_carry_it(value):
    with pytest.raises(CommandError, match="argument 'code': contains a NUL character") as caught:
        expand(["python3", "-c", "{code}"], {"code": value})
    assert caught.value.argument == "code"
