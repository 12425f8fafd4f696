"""The --to grammar, the registry, and group-count choice (opacus#567, #390, #580)."""
from __future__ import annotations

import pytest

from normsurgeon.errors import RecipeError
from normsurgeon.recipes import all_recipes, get_entry, parse_recipe, register
from normsurgeon.recipes.groups import MIN_GROUP_VALUES, choose_groups, spatial_size
from normsurgeon.recipes.registry import RecipeEntry


@pytest.mark.parametrize("channels", list(range(1, 97)) + [128, 144, 192, 1280])
@pytest.mark.parametrize("spatial", [1, 2, 49, None])
def test_choose_groups_is_the_nearest_usable_divisor(channels, spatial):
    for wanted in (1, 4, 8, 32, 64):
        g, note = choose_groups(channels, wanted, spatial)
        usable = [d for d in range(1, channels + 1) if channels % d == 0
                  and (spatial is None or (channels // d) * spatial >= MIN_GROUP_VALUES)] or [1]
        assert g in usable
        assert abs(g - wanted) == min(abs(d - wanted) for d in usable)
        assert (note == "") == (g == wanted)
        if note:
            assert note.startswith(f"groups {wanted} -> {g}")


def test_one_value_groups_are_never_chosen_for_linear_input():
    """BatchNorm1d(4) on (N, 4): GroupNorm(4, 4) would output zeros (opacus#567)."""
    g, note = choose_groups(4, 4, spatial=1)
    assert g == 1 and "1 value(s)" in note
    assert choose_groups(72, 32, spatial=49) == (36, "groups 32 -> 36: 72 channels not divisible by 32")


def test_spatial_size():
    assert spatial_size((2, 8)) == 1
    assert spatial_size((2, 8, 10)) == 10
    assert spatial_size((2, 8, 3, 4, 5)) == 60
    assert spatial_size(None) is None


def test_parse_recipe_grammar():
    assert parse_recipe("gn").arg == 32 and str(parse_recipe("gn")) == "gn:32"
    assert parse_recipe("GN+WS:8") .name == "gn+ws" and parse_recipe("gn+ws:8").arg == 8
    assert parse_recipe(" frozen ").arg is None
    assert parse_recipe("gn+ws", ws_form="std").option("ws_form") == "std"
    core = {"gn", "ln", "in", "gn+ws", "frozen"}
    assert core <= {e.name for e in all_recipes()}
    assert get_entry("gn").usage() == "gn[:GROUPS]" and get_entry("frozen").usage() == "frozen"


@pytest.mark.parametrize("text,msg", [
    ("bogus", "valid recipes: gn[:GROUPS], ln, in, gn+ws[:GROUPS], frozen"),
    ("", "unknown recipe"),
    ("gn:x", "bad argument 'x'"),
    ("gn:0", "positive"),
    ("gn+ws:-2", "positive"),
    ("frozen:3", "takes no argument"),
    ("ln:2", "takes no argument"),
])
def test_parse_recipe_errors(text, msg):
    with pytest.raises(RecipeError, match=msg.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        parse_recipe(text)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="twice"):
        register(RecipeEntry("gn", "dup", lambda ctx: None))
