"""The profile schema: what every key of a profile may hold, checked before any work starts.

A profile's values are checked in two layers, both before the first notebook runs
(:func:`crossmoda_lib.runs.run_profile`):

* **Types** come from where each value is declared, so that no type is written twice: a notebook key
  must have the type of its default in the notebook's ``parameters`` cell (an ``int`` where the
  default is an int, a number where it is a float, a list whose items have the type of the
  default's items); a ``common`` key the type in :data:`COMMON`.
* **Ranges, allowed values and lengths** are this module's :data:`RULES`, one entry per key that has
  any (a key without one is checked for its type only).

A violation is a :class:`crossmoda_lib.config.ProfileError` naming the profile file, the section and
the key, the value given and what is allowed; all violations of a profile are reported together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from crossmoda_lib import io as cio

CENTRE_NAMES = tuple(cio.CENTRES.values())


@dataclass(frozen=True)
class Rule:
    """What a value (or, with ``items``, each item of a list) may be."""

    lo: float | None = None  # smallest allowed (inclusive unless lo_open)
    hi: float | None = None  # largest allowed (inclusive unless hi_open)
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    length: int | None = None  # a list of exactly this many items
    min_items: int = 0
    items: Rule | None = None  # the rule for each item of a list
    item_type: type | None = None  # for lists whose default is empty

    def problems(self, value: Any) -> list[str]:
        out = []
        if isinstance(value, list):
            if self.length is not None and len(value) != self.length:
                out.append(f"must have {self.length} items, not {len(value)}")
            if len(value) < self.min_items:
                out.append(f"must have at least {self.min_items} item(s)")
            if self.items is not None:
                for i, item in enumerate(value):
                    out += [f"item {i} ({item!r}) {p}" for p in self.items.problems(item)]
            return out
        if self.choices is not None and value not in self.choices:
            out.append(f"must be one of {list(self.choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                out.append("must be a finite number")
            if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
                out.append(f"must be {'>' if self.lo_open else '>='} {self.lo}")
            if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
                out.append(f"must be {'<' if self.hi_open else '<='} {self.hi}")
        return out


POSITIVE = Rule(lo=0, lo_open=True)
AT_LEAST_1 = Rule(lo=1)
NON_NEGATIVE = Rule(lo=0)
FRACTION = Rule(lo=0, hi=1)
PERCENTILE = Rule(lo=0, hi=100)
BETA = Rule(lo=0, hi=1, hi_open=True)


def choice(*values: Any) -> Rule:
    return Rule(choices=values)


def vector(n: int, each: Rule) -> Rule:
    return Rule(length=n, items=each)


def items(each: Rule, min_items: int = 0) -> Rule:
    return Rule(items=each, min_items=min_items)


#: The ``common`` section: type and rule of each key.
COMMON: dict[str, tuple[type | tuple[type, ...], Rule | None]] = {
    "profile": (str, None),
    "seed": (int, Rule(lo=0, hi=2**32 - 1)),
    "data_source": (str, None),  # checked against crossmoda_lib.config.DATA_SOURCES
    "data_dir": (str, None),
    "output_dir": (str, None),
    "synth_cases_per_centre": (int, Rule(lo=3)),
    "synth_test_cases_per_centre": (int, NON_NEGATIVE),
    "synth_fov": (str, choice("roi", "head")),
    "device": (str, None),  # checked by crossmoda_lib.devices.parse
    "cpu_kernels": (str, None),  # checked against crossmoda_lib.devices.CPU_KERNEL_CHOICES
}

#: Ranges, allowed values and lengths of notebook keys, by notebook.
RULES: dict[str, dict[str, Rule]] = {
    "01_preprocess": {
        "spacing": vector(3, POSITIVE),
        "crop_size": vector(2, Rule(lo=16)),
        "centre_percentile": PERCENTILE,
        "intensity_percentiles": vector(2, PERCENTILE),
    },
    "02_cyclegan": {
        "centres": items(choice(*CENTRE_NAMES), min_items=1),
        "image_size": vector(2, Rule(lo=16)),
        "min_anatomy_fraction": FRACTION,
        "ngf": AT_LEAST_1,
        "ndf": AT_LEAST_1,
        "n_blocks": NON_NEGATIVE,
        "n_layers_d": AT_LEAST_1,
        "lambda_cycle": NON_NEGATIVE,
        "lambda_identity": NON_NEGATIVE,
        "pool_size": NON_NEGATIVE,
        "lr": POSITIVE,
        "beta1": BETA,
        "n_epochs": NON_NEGATIVE,
        "n_epochs_decay": NON_NEGATIVE,
        "batch_size": AT_LEAST_1,
        "random_crop": NON_NEGATIVE,
        "whole_epochs": NON_NEGATIVE,
        "log_every": AT_LEAST_1,
        "checkpoint_every": AT_LEAST_1,
        "draws": AT_LEAST_1,
        "draw_epochs": NON_NEGATIVE,
    },
    "03_translate": {
        "batch_size": AT_LEAST_1,
        "vc_psf_mm": vector(3, NON_NEGATIVE),
        "vc_psf_is": choice("sigma", "fwhm"),
        "vc_iterations": NON_NEGATIVE,
        "vc_beta": POSITIVE,
    },
    "04_singan": {
        "singan_centre": choice(*CENTRE_NAMES),
        "singan_slice": Rule(lo=-1),
        "scale_factor": Rule(lo=0, hi=1, lo_open=True, hi_open=True),
        "min_size": Rule(lo=4),
        "max_size": Rule(lo=4),
        "num_scales": Rule(lo=0),
        "ker_size": AT_LEAST_1,
        "num_layer": AT_LEAST_1,
        "nfc": AT_LEAST_1,
        "max_nfc": AT_LEAST_1,
        "niter": NON_NEGATIVE,
        "lr": POSITIVE,
        "beta1": BETA,
        "lr_drop_fraction": FRACTION,
        "gamma": Rule(lo=0, hi=1, lo_open=True),
        "lambda_grad": NON_NEGATIVE,
        "alpha": NON_NEGATIVE,
        "noise_amp": NON_NEGATIVE,
        "g_steps": AT_LEAST_1,
        "d_steps": AT_LEAST_1,
    },
    "05_tumor_blending": {
        "vs_large_centres": items(choice(*CENTRE_NAMES)),
        "vs_large_min_volume_mm3": NON_NEGATIVE,
        "vs_large_min_std": NON_NEGATIVE,
        "vs_large_lambdas": items(POSITIVE),
        "vs_small_max_volume_mm3": NON_NEGATIVE,
        "vs_small_lambdas": items(POSITIVE),
        "vs_start_scales": items(NON_NEGATIVE),
        "cochlea_lambdas": items(POSITIVE),
        "cochlea_start_scales": items(NON_NEGATIVE),
        "dilation_px": NON_NEGATIVE,
        "blur_sigma_px": NON_NEGATIVE,
        "vs_source": choice("pseudo_hrT2", "pseudo_hrT2_vc"),
        "cochlea_source": choice("pseudo_hrT2", "pseudo_hrT2_vc"),
    },
    "06_segmentation": {
        "vs_sets": items(choice("pseudo_hrT2", "pseudo_hrT2_vc", "augmented", "ceT1"), min_items=1),
        "cochlea_sets": items(choice("pseudo_hrT2", "pseudo_hrT2_vc", "augmented", "ceT1"), min_items=1),
        "folds": AT_LEAST_1,
        "patch_size": vector(3, Rule(lo=8)),
        "base_filters": AT_LEAST_1,
        "max_filters": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "epochs": AT_LEAST_1,
        "iterations_per_epoch": AT_LEAST_1,
        "optimizer": choice("sgd", "adam"),
        "lr": POSITIVE,
        "momentum": Rule(lo=0, hi=1, hi_open=True),
        "weight_decay": NON_NEGATIVE,
        "fg_fraction": FRACTION,
        "vs_fg_jitter": FRACTION,
        "cochlea_fg_jitter": FRACTION,
        "val_every": AT_LEAST_1,
        "overlap": Rule(lo=0, hi=1, hi_open=True),
        "workers": AT_LEAST_1,
    },
    "07_self_training": {
        "rounds": NON_NEGATIVE,
        "round_epochs": AT_LEAST_1,
        "final_epochs": AT_LEAST_1,
        "final_spacing": vector(3, POSITIVE),
        "final_patch_size": Rule(items=Rule(lo=8), item_type=int),
        "folds": AT_LEAST_1,
        "cochlea_clip_percentile": PERCENTILE,
        "cochlea_components": NON_NEGATIVE,
        "warm_start": items(choice("vs", "cochlea")),
        "workers": AT_LEAST_1,
    },
    "08_inference": {
        "splits": items(choice("validation", "test"), min_items=1),
        "sharpen_psf_mm": vector(3, NON_NEGATIVE),
        "sharpen_psf_is": choice("sigma", "fwhm"),
        "sharpen_iterations": NON_NEGATIVE,
        "cochlea_components": NON_NEGATIVE,
    },
    "09_evaluation": {
        "split": choice("validation", "test"),
        "choice_split": choice("", "validation", "test"),
        "ablation_dirs": Rule(item_type=str),
        "bootstrap": NON_NEGATIVE,
    },
}


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def type_problem(value: Any, expected: type | tuple[type, ...]) -> str | None:
    """Why ``value`` is not of ``expected`` (a float key takes an integer; bool is not a number)."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if float in kinds:
        kinds = (*kinds, int)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    return None if ok else f"must be {_type_name(expected)}, not {value!r}"


def declared_type(default: Any) -> tuple[type, type | None]:
    """(type, item type) of a notebook's default value; item type None for an empty list."""
    if isinstance(default, list):
        first = next((type(v) for v in default), None)
        return list, (float if first is int and any(isinstance(v, float) for v in default) else first)
    return type(default), None


def check_value(where: str, key: str, value: Any, expected: type, item_type: type | None, rule: Rule | None) -> list[str]:
    """Problems of one value, each as ``<where>.<key>: ...``."""
    problem = type_problem(value, expected)
    if problem:
        return [f"{where}.{key} {problem}"]
    problems = []
    if isinstance(value, list):
        item_type = item_type or (rule.item_type if rule else None)
        if item_type is not None:
            problems += [f"{where}.{key} item {i} {p}" for i, v in enumerate(value) if (p := type_problem(v, item_type))]
    if rule is not None and not problems:
        problems += [f"{where}.{key}={value!r} {p}" for p in rule.problems(value)]
    return problems


def check_common(common: dict[str, Any]) -> list[str]:
    """Problems of a ``common`` section (its keys are known: :func:`crossmoda_lib.config.load_profile`)."""
    problems = []
    for key, value in common.items():
        if key in COMMON:
            kind, rule = COMMON[key]
            problems += check_value("common", key, value, kind, None, rule)
    return problems


def check_notebook(notebook: str, section: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    """Problems of a notebook's section against its declared defaults and :data:`RULES`."""
    problems = []
    rules = RULES.get(notebook, {})
    for key, value in section.items():
        if key not in declared:
            continue  # unknown keys: crossmoda_lib.config.notebook_parameters names them
        kind, item_type = declared_type(declared[key])
        problems += check_value(f"notebooks.{notebook}", key, value, kind, item_type, rules.get(key))
    return problems
