"""Evaluation suites ("recipes"): lengths, depths, samples and MC variants, by name.

A recipe is a JSON file in ``mc_retrofit/eval/suites/`` (``retrofit/eval/suites/``) (``smoke``, ``default``, ``long``, ...) or
any path. Lengths are token counts or multiples of the model's training context
written ``"4x"``; so one recipe fits checkpoints trained at different lengths.

    {"name": "default", "description": "...", "batch_size": 4,
     "perplexity": {"lengths": ["1x", "4x", "16x"], "windows": 4, "position_bucket": "0.25x"},
     "passkey": {"lengths": ["1x", "4x"], "depths": [0, 0.25, 0.5, 0.75, 1], "samples": 4},
     "multikey": {"lengths": ["1x", "4x"], "samples": 8, "n_keys": 4},
     "variable_tracking": {"lengths": ["1x", "4x"], "samples": 8, "hops": 2, "n_chains": 2},
     "variants": [{"name": "mc-gated", "mc": {"segment_size": "0.5x", "aggregation": "gated"}}]}

Every section is optional; a missing section is not run.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from mc_retrofit.errors import MCError

# The evaluation suites ship inside the package (package data of mc_retrofit.eval), so an
# installed wheel has them; recipes/ at the top holds only the training scripts and studies.
RECIPE_DIR = Path(__file__).resolve().parent / "suites"
TASKS = ("passkey", "multikey", "variable_tracking", "mqar")
SECTIONS = ("perplexity",) + TASKS
TOP_KEYS = {"name", "description", "batch_size", "variants", "seed"} | set(SECTIONS)
SECTION_KEYS = {
    "perplexity": {"lengths", "windows", "position_bucket"},
    "passkey": {"lengths", "depths", "samples", "digits"},
    "multikey": {"lengths", "depths", "samples", "n_keys", "digits"},
    "variable_tracking": {"lengths", "samples", "hops", "n_chains", "digits"},
    # synthetic token task (mc_retrofit.tasks.mqar): no text, the model's own vocabulary
    "mqar": {"lengths", "pairs", "samples", "noise"},
}


def available() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.json")) if RECIPE_DIR.is_dir() else []


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (``eval/suites/NAME.json``) or by path, validated."""
    p = Path(name_or_path)
    if not (p.suffix == ".json" and p.is_file()):
        p = RECIPE_DIR / f"{name_or_path}.json"
        if not p.is_file():
            names = ", ".join(available()) or "none found"
            raise MCError(f"no evaluation recipe {name_or_path!r} (available: {names}; or give a .json path)")
    try:  # bytes first: a binary file is "not a recipe", not a UnicodeDecodeError
        recipe = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise MCError(f"{p} is not a text file (not UTF-8): a recipe is a JSON object") from None
    except json.JSONDecodeError as e:
        raise MCError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(recipe, dict):
        raise MCError(f"{p}: a recipe is a JSON object, not a {type(recipe).__name__}")
    recipe.setdefault("name", p.stem)
    validate(recipe, str(p))
    return recipe


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Per-section integer knobs -> smallest value that makes a sample (the generators' own
# limits, checked here so a bad recipe fails before any model loads).
SECTION_INTS = {"windows": 1, "samples": 1, "digits": 1, "n_keys": 1, "hops": 1, "n_chains": 1}
VARIANT_KEYS = {"name", "mc", "description"}


def validate(recipe: dict, where: str = "recipe") -> None:
    """Every key and value of a recipe, variants' MC configs included: everything that can
    be checked without the model, so a bad recipe fails in a second, not after loading."""
    if not isinstance(recipe, dict):
        raise MCError(f"{where}: a recipe is a JSON object")
    unknown = sorted(set(recipe) - TOP_KEYS)
    if unknown:
        raise MCError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(TOP_KEYS))})")
    name = recipe.get("name", "recipe")
    if not (isinstance(name, str) and name.strip()):
        raise MCError(f"{where}: name must be a non-empty string, not {name!r}")
    if not isinstance(recipe.get("description", ""), str):
        raise MCError(f"{where}: description must be a string")
    if "batch_size" in recipe and not (_is_int(recipe["batch_size"]) and recipe["batch_size"] >= 1):
        raise MCError(f"{where}: batch_size must be a positive integer, not {recipe['batch_size']!r}")
    if "seed" in recipe and not (_is_int(recipe["seed"]) and recipe["seed"] >= 0):
        raise MCError(f"{where}: seed must be a non-negative integer, not {recipe['seed']!r}")
    for sec in SECTIONS:
        if sec not in recipe:
            continue
        body = recipe[sec]
        if not isinstance(body, dict):
            raise MCError(f"{where}: {sec} must be an object")
        bad = sorted(set(body) - SECTION_KEYS[sec])
        if bad:
            raise MCError(f"{where}: unknown key(s) in {sec}: {', '.join(bad)}")
        if not (isinstance(body.get("lengths"), list) and body["lengths"]):
            raise MCError(f"{where}: {sec} needs a non-empty list of lengths")
        for length in body["lengths"]:
            parse_length(length, None, check_only=True, where=f"{where}: {sec}")
        if "position_bucket" in body:
            parse_length(body["position_bucket"], None, check_only=True, where=f"{where}: {sec}.position_bucket")
        for key, low in SECTION_INTS.items():
            if key in body and not (_is_int(body[key]) and body[key] >= low):
                raise MCError(f"{where}: {sec}.{key} must be a positive integer, not {body[key]!r}")
        if "n_keys" in body:
            from mc_retrofit.tasks import KEY_NAMES

            if body["n_keys"] > len(KEY_NAMES):
                raise MCError(f"{where}: {sec}.n_keys must be at most {len(KEY_NAMES)} (the distinct key names)")
        pairs = body.get("pairs", [8])
        if sec == "mqar" and not (isinstance(pairs, list) and pairs and all(_is_int(p) and p >= 1 for p in pairs)):
            raise MCError(f"{where}: mqar.pairs must be a non-empty list of positive integers")
        if "noise" in body and not isinstance(body["noise"], bool):
            raise MCError(f"{where}: mqar.noise must be true or false, not {body['noise']!r}")
        depths = body.get("depths", [])
        if not isinstance(depths, list):
            raise MCError(f"{where}: {sec}.depths must be a list of numbers in [0, 1]")
        for d in depths:
            if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1):
                raise MCError(f"{where}: {sec}.depths must lie in [0, 1], not {d!r}")
    variants = recipe.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, dict) and "name" in v for v in variants):
        raise MCError(f"{where}: variants must be a list of objects with a name")
    for v in variants:
        _validate_variant(v, where)
    names = [v["name"] for v in variants]
    if len(set(names)) != len(names) or "base" in names:
        raise MCError(f"{where}: variant names must be unique and not 'base'")


def _validate_variant(v: dict, where: str) -> None:
    """A recipe variant's keys and its whole MC config (a misspelt key would otherwise run
    the default configuration under the variant's name)."""
    from mc_retrofit.config import MCConfig

    if not (isinstance(v["name"], str) and v["name"].strip()):
        raise MCError(f"{where}: a variant's name must be a non-empty string, not {v['name']!r}")
    label = f"{where}: variant {v['name']!r}"
    unknown = sorted(set(v) - VARIANT_KEYS)
    if unknown:
        raise MCError(f"{label}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(VARIANT_KEYS))})")
    mc = v.get("mc", {})
    if not isinstance(mc, dict):
        raise MCError(f"{label}: mc must be an object of MCConfig fields like {{\"segment_size\": 128}}, not {mc!r}")
    fields = dict(mc)
    if isinstance(fields.get("segment_size"), str):  # "0.5x": resolved against the context later
        parse_length(fields["segment_size"], None, check_only=True, where=f"{label}: segment_size")
        fields["segment_size"] = 256
    try:
        config = MCConfig.from_dict(fields)
    except MCError as e:
        raise MCError(f"{label}: {e}") from None
    ignored = config.ignored(mc)
    if ignored:
        raise MCError(f"{label}: {ignored[0][0]} {ignored[0][1]}; drop it")


def parse_length(value, train_context: int | None, check_only: bool = False, where: str = "recipe") -> int | None:
    """``512`` -> 512; ``"4x"`` -> 4 * train_context."""
    if isinstance(value, bool):
        raise MCError(f"{where}: {value!r} is not a length")
    if isinstance(value, int):
        if value < 2:
            raise MCError(f"{where}: lengths must be at least 2 tokens, not {value}")
        return value
    if isinstance(value, str) and value.endswith("x"):
        try:
            mult = float(value[:-1])
        except ValueError:
            mult = -1.0
        if mult <= 0:
            raise MCError(f"{where}: {value!r} is not a multiple of the training context like '4x'")
        if check_only:
            return None
        if train_context is None:
            raise MCError(
                f"{where}: {value!r} is relative to the training context, which this checkpoint does not "
                "record; pass --train-context N"
            )
        return max(2, int(round(mult * train_context)))
    raise MCError(f"{where}: {value!r} is not a length (an integer, or a multiple like '4x')")


def resolve(recipe: dict, train_context: int | None) -> dict:
    """A copy with every relative length (and relative segment size) made absolute."""
    r = copy.deepcopy(recipe)
    for sec in SECTIONS:
        if sec in r:
            body = r[sec]
            body["lengths"] = sorted({parse_length(x, train_context, where=sec) for x in body["lengths"]})
            if "position_bucket" in body:
                body["position_bucket"] = parse_length(body["position_bucket"], train_context, where=sec)
    for v in r.get("variants", []):
        mc = v.get("mc", {})
        if isinstance(mc.get("segment_size"), str):
            mc["segment_size"] = parse_length(mc["segment_size"], train_context, where=f"variant {v['name']}")
    return r
