"""Length-extrapolation and recall evaluation: the base model and its Memory Caching
variants, side by side on the same inputs.

    from mc_retrofit.eval import EvalOptions, evaluate, load_recipe, markdown
    results = evaluate(EvalOptions("builtin:mamba2-byte", load_recipe("smoke")))
    print(markdown(results))

Sections (each optional in a recipe): ``perplexity`` (bits/token by position and by
context length on long documents), ``passkey`` (lengths x needle depths),
``multikey`` (several keys, one asked for), ``variable_tracking`` (multi-hop).
"""
from .recipes import available as available_recipes
from .recipes import load_recipe
from .report import markdown, plots, validate_results, write_json
from .runner import EvalOptions, evaluate
from .variants import Variant, parse_variant, variant_from_file

__all__ = ["EvalOptions", "evaluate", "load_recipe", "available_recipes", "markdown", "plots", "write_json",
           "validate_results", "Variant", "parse_variant", "variant_from_file"]
