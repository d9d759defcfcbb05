"""The one configuration of a comparison: every option defined once, with its help, default and check.

A :class:`CompareConfig` is made of one frozen options dataclass per stage. Each option is a
:func:`option` field that carries its help text and its check; the ``compare`` command line's flags
(:func:`add_arguments`) and the study TOML's ``[compare]`` table (:meth:`CompareConfig.from_options`)
are both generated from these fields, so a name, a default or a check lives in one place::

    CompareConfig
      ├─ scan    ScanOptions     which scan points      (n_test_groups, n_test_subsample, subsample_seed)
      ├─ group   GroupOptions    neighbour groups       (group_seed, neighbours)
      ├─ infer   InferOptions    model inputs per task  (stitch_crop_size, block_groups, batch_size, …)
      ├─ stitch  StitchOptions   the object's canvas    (tile, canvas)
      ├─ score   ScoreOptions    alignment and metrics  (phase_align_method, …)
      ├─ output  OutputOptions   files written          (save_npz, save_npz_aligned, p_min, p_max, …)
      └─ run     RunOptions      where and how it runs  (scheduler, n_workers, memory_budget, quiet, force)

Options are checked on their own when the config is built (:class:`~ptychozarr.errors.InvalidParameterError`
naming the flag); what depends on the scan (the crop against N, the models' N and gridsize, the iterative
NPZ's header) is checked once, before any work, by :func:`ptychozarr.validate.validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dask.utils import parse_bytes

from ptychozarr.errors import InvalidParameterError

__all__ = [
    "COMPATIBILITY",
    "CompareConfig",
    "GroupOptions",
    "InferOptions",
    "OutputOptions",
    "RunOptions",
    "ScanOptions",
    "ScoreOptions",
    "StitchOptions",
    "add_arguments",
    "check_crop",
    "check_positive",
    "parse_budget",
    "flag",
    "option_names",
    "sha256",
    "suggest",
]


# -- the shared checks -----------------------------------------------------------------------------


def flag(name: str) -> str:
    """The command-line flag of an option name (``stitch_crop_size`` → ``--stitch-crop-size``)."""
    return "--" + name.replace("_", "-")


def check_positive(name: str, value: Any, *, optional: bool = False) -> int | None:
    """``value`` as a positive int, or :class:`InvalidParameterError` naming the flag."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a positive integer")
    return int(value)


def check_crop(crop: int, n_pix: int | None = None) -> int:
    """The stitch crop M: even and positive, and at most the pattern side N when N is known."""
    crop = check_positive("stitch_crop_size", crop)
    if crop % 2:
        raise InvalidParameterError(f"--stitch-crop-size {crop}: must be even (the centre M×M of a patch)")
    if n_pix is not None and crop > n_pix:
        raise InvalidParameterError(
            f"--stitch-crop-size {crop}: larger than the scan's {n_pix}×{n_pix} patterns; give M ≤ {n_pix}"
        )
    return crop


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (:func:`ptychozarr.io.store.sha256`)."""
    from ptychozarr.io.store import sha256 as file_sha256

    return file_sha256(path)


def parse_budget(value: str | int | None, *, flag: str = "--memory-budget") -> int | None:
    """Bytes from a budget such as ``"2GB"``, ``"1.5GiB"`` or an int; None stays None.

    Uses :func:`dask.utils.parse_bytes`: ``GB`` is 10⁹ bytes, ``GiB`` 2³⁰.
    """
    if value is None:
        return None
    try:
        n = int(value) if isinstance(value, int) else parse_bytes(value)
    except (ValueError, TypeError) as e:
        raise InvalidParameterError(f"{flag} {value!r} is not a size; give e.g. '2GB' or '1.5GiB'") from e
    if n <= 0:
        raise InvalidParameterError(f"{flag} {value!r} is not positive; give e.g. '2GB' or '1.5GiB'")
    return n


def suggest(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the valid name closest to ``name``, or a list of the valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


# -- option fields ---------------------------------------------------------------------------------


def _int(name: str, value: Any) -> int:
    return check_positive(name, value)


def _opt_int(name: str, value: Any) -> int | None:
    return check_positive(name, value, optional=True)


def _seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{flag(name)} {value!r}: give an integer seed") from None


def _float(name: str, value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a number") from None
    if not np.isfinite(number) or number < 0:
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a finite number ≥ 0")
    return number


def _opt_length(name: str, value: Any) -> float | None:
    if value is None:
        return None
    number = _float(name, value)
    if number == 0:
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a length > 0 in metres, e.g. 5e-9")
    return number


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameterError(f"{flag(name)} {value!r}: give true or false")
    return value


def _crop(name: str, value: Any) -> int:
    return check_crop(value)


def _blocks(name: str, value: Any) -> int | str:
    return "auto" if value == "auto" else check_positive(name, value)


def _budget(name: str, value: Any) -> int | None:
    return parse_budget(value, flag=flag(name))


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a non-empty string")
    return value


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise InvalidParameterError(
                f"{flag(name)} {value!r}: use one of {', '.join(map(repr, choices))}"
                + suggest(str(value), choices)
            )
        return value

    check.choices = choices  # type: ignore[attr-defined]
    return check


def option(
    default: Any, help: str, check: Callable[[str, Any], Any], *, aliases: tuple[str, ...] = ()
) -> Any:
    """A dataclass field that is also a command-line flag and a TOML key.

    Parameters
    ----------
    default
        The default value (shown in ``--help``).
    help : str
        One line for ``--help`` and the docs.
    check : callable
        ``check(name, value) -> value``: converts a command-line string or a TOML value and raises
        :class:`InvalidParameterError` naming the flag when it is not valid.
    aliases : tuple of str
        More flags accepted for the option (compare_models' names).
    """
    return field(default=default, metadata={"help": help, "check": check, "aliases": aliases})


@dataclass(frozen=True)
class _Options:
    """Base of the per-stage options: every field is checked (and converted) when built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))


@dataclass(frozen=True)
class ScanOptions(_Options):
    """Which scan points a run uses (compare_models' --n-test-subsample and --n-test-groups)."""

    # n_test_subsample draws that many scan points at random (seeded by subsample_seed) before grouping;
    # n_test_groups is the number of groups, one per drawn point. As in compare_models, n_test_groups
    # alone also draws that many points, and n_test_subsample alone forms one group per drawn point
    # (n_test_groups is set to it). Given both, fewer groups than points seeds the groups at that many
    # of the drawn points, chosen at random, their members found among all the drawn points. More
    # groups than points depends on the gridsize, known from the models: preflight.check_groups refuses
    # it at gridsize > 1 and the group stage caps it at gridsize 1.

    n_test_groups: int | None = option(
        None,
        "groups to form, one per drawn scan point; given alone, it also draws this many points at random",
        _opt_int,
        aliases=("--n-test-images",),
    )
    n_test_subsample: int | None = option(
        None,
        "scan points drawn at random before grouping (None: --n-test-groups, else every point)",
        _opt_int,
        aliases=("--n-subsample",),
    )
    subsample_seed: int | None = option(
        None,
        "seed of the random draw of scan points (None: unseeded)",
        _seed,
        aliases=("--test-subsample-seed",),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        points, groups = self.n_test_subsample, self.n_test_groups
        if points is None:
            return
        if groups is None:  # compare_models forms one group per drawn point
            object.__setattr__(self, "n_test_groups", points)

    @property
    def points(self) -> int | None:
        """Scan points drawn before grouping (None: all)."""
        return self.n_test_subsample if self.n_test_subsample is not None else self.n_test_groups


@dataclass(frozen=True)
class GroupOptions(_Options):
    """The neighbour grouping (global, seeded, stored)."""

    group_seed: int = option(0, "seed of the neighbour groups", _seed)
    neighbours: int = option(7, "K: nearest neighbours each group is drawn from", _int)


COMPATIBILITY: dict[str, dict[str, Any]] = {
    "none": {},
    # compare_models' defaults (scripts/compare_models.py parse_args; --max-registration-shift: it applies
    # any shift); its unscaled Baseline input is the infer stage's (stages/infer.py)
    "compare_models": {
        "alignment": "coordinates",
        "canvas": "ptychopinn",
        "stitch_crop_size": 20,
        "ms_ssim_sigma": 1.0,
        "frc_sigma": 0.0,
        "phase_align_method": "plane",
        "max_registration_shift": 1000.0,
    },
}
"""Each ``--compatibility`` mode's option defaults (options given explicitly win over them)."""


@dataclass(frozen=True)
class InferOptions(_Options):
    """Blockwise inference."""

    compatibility: str = option(
        "none",
        "compare_models: its defaults (--alignment coordinates --canvas ptychopinn "
        "--max-registration-shift 1000, and its crop, MS-SSIM, FRC and phase defaults) and its Baseline "
        "fed the normalised diffraction without intensity_scale; options given explicitly win",
        _choice(*COMPATIBILITY),
    )
    stitch_crop_size: int = option(20, "M: side of the kept centre of each patch (even, 0 < M ≤ N)", _crop)
    block_groups: int | str = option("auto", "model inputs per task, or 'auto' (largest that fits)", _blocks)
    batch_size: int = option(32, "fixed batch of each model call", _int)
    trust_bundle: bool = option(
        False,
        "load PtychoPINN wts.h5.zip bundles, which are unpickled (runs code from the file): only your own",
        _bool,
    )


@dataclass(frozen=True)
class StitchOptions(_Options):
    """Stitching into object tiles."""

    tile: int = option(1024, "side of the stitched object's tiles (Zarr chunks)", _int)
    canvas: str = option(
        "object",
        "object: on the object's own pixel grid (whole-pixel origin, exact placement); ptychopinn: "
        "reassemble_position's square canvas centred on the positions' mean (a sub-pixel origin)",
        _choice("object", "ptychopinn"),
    )


@dataclass(frozen=True)
class ScoreOptions(_Options):
    """Alignment, registration and metrics (compare_models' flags)."""

    phase_align_method: str = option(
        "plane", "phase alignment before the phase metrics", _choice("plane", "mean")
    )
    register_ptychi_only: bool = option(False, "register only the iterative arm", _bool)
    skip_registration: bool = option(False, "register no arm", _bool)
    fixed_canvas: bool = option(False, "align on the bounding box of all scan coordinates", _bool)
    alignment: str = option(
        "placement",
        "placement: exact, from the canvas frame; coordinates: compare_models' centre-crop",
        _choice("placement", "coordinates"),
    )
    max_registration_shift: float = option(
        10.0, "larger registration shifts (px) count as failed: the arm is scored unregistered", _float
    )
    min_registration_confidence: float = option(
        0.6,
        "smallest accepted registration confidence (1 − second / main correlation peak); a weaker "
        "measurement is refused and the arm scored unregistered",
        _float,
    )
    ms_ssim_sigma: float = option(1.0, "Gaussian pre-filter of the amplitude MS-SSIM", _float)
    frc_sigma: float = option(0.0, "smoothing of the FRC curves", _float)


def _percentile(name: str, value: Any) -> float:
    number = _float(name, value)
    if number > 100:
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a percentile in [0, 100]")
    return number


def _opt_real(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a number") from None
    if not np.isfinite(number):
        raise InvalidParameterError(f"{flag(name)} {value!r}: give a finite number")
    return number


@dataclass(frozen=True)
class OutputOptions(_Options):
    """Files written beside the store."""

    save_npz: bool = option(True, "write reconstructions.npz", _bool)
    save_npz_aligned: bool = option(True, "write reconstructions_aligned.npz", _bool)
    pixel_size: float | None = option(
        None,
        "object pixel size in metres, for resolutions in nm in the plot; default: the scan's "
        "pixel_size_m attribute when it has one",
        _opt_length,
    )
    p_min: float = option(
        10.0, "lower colour limit of each amplitude and phase panel of the plot: this percentile of the "
        "panel's own image (compare_models)", _percentile, aliases=("--p_min",),
    )  # fmt: skip
    p_max: float = option(
        90.0, "upper colour limit of each amplitude and phase panel of the plot: this percentile of the "
        "panel's own image (compare_models)", _percentile, aliases=("--p_max",),
    )  # fmt: skip
    pinn_phase_vmin: float | None = option(
        None,
        "PINN phase panel's colour minimum in rad, with --pinn-phase-vmax (compare_models); "
        "default: the --p-min percentile",
        _opt_real,
        aliases=("--pinn_phase_vmin",),
    )
    pinn_phase_vmax: float | None = option(
        None,
        "PINN phase panel's colour maximum in rad, with --pinn-phase-vmin (compare_models); "
        "default: the --p-max percentile",
        _opt_real,
        aliases=("--pinn_phase_vmax",),
    )
    baseline_phase_vmin: float | None = option(
        None,
        "Baseline phase panel's colour minimum in rad, with --baseline-phase-vmax (compare_models); "
        "default: the --p-min percentile",
        _opt_real,
        aliases=("--baseline_phase_vmin",),
    )
    baseline_phase_vmax: float | None = option(
        None,
        "Baseline phase panel's colour maximum in rad, with --baseline-phase-vmin (compare_models); "
        "default: the --p-max percentile",
        _opt_real,
        aliases=("--baseline_phase_vmax",),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p_min >= self.p_max:
            raise InvalidParameterError(
                f"--p-min {self.p_min:g} ≥ --p-max {self.p_max:g}: give p_min < p_max"
            )
        for arm in ("pinn", "baseline"):
            lo, hi = getattr(self, f"{arm}_phase_vmin"), getattr(self, f"{arm}_phase_vmax")
            if (lo is None) != (hi is None):
                raise InvalidParameterError(
                    f"--{arm}-phase-vmin and --{arm}-phase-vmax are used together (as compare_models): "
                    "give both or neither"
                )
            if lo is not None and hi is not None and lo >= hi:
                raise InvalidParameterError(
                    f"--{arm}-phase-vmin {lo:g} ≥ --{arm}-phase-vmax {hi:g}: give vmin < vmax"
                )


@dataclass(frozen=True)
class RunOptions(_Options):
    """Where and how the run executes."""

    scheduler: str = option("threads", "threads | processes | cuda | tcp://host:port", _text)
    n_workers: int | None = option(None, "workers of a processes or cuda cluster", _opt_int)
    memory_budget: int | None = option(None, "host budget, e.g. 4GB; a plan over it is refused", _budget)
    quiet: bool = option(False, "print only errors", _bool)
    force: bool = option(False, "redo every stage", _bool)


def _with_compatibility(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the defaults of the ``compatibility`` mode they name (an unknown mode adds none:
    the option's own check refuses it)."""
    mode = options.get("compatibility")
    return {**(COMPATIBILITY.get(mode, {}) if isinstance(mode, str) else {}), **options}


_SECTIONS: dict[str, type[_Options]] = {
    "scan": ScanOptions,
    "group": GroupOptions,
    "infer": InferOptions,
    "stitch": StitchOptions,
    "score": ScoreOptions,
    "output": OutputOptions,
    "run": RunOptions,
}
_OWNER = {f.name: section for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


def option_names() -> list[str]:
    """Every option name (a TOML key of ``[compare]``, a keyword of :func:`ptychozarr.compare`)."""
    return list(_OWNER)


@dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison needs: its inputs and one options object per stage.

    Attributes
    ----------
    test_data : Path
        Scan NPZ or ingested ``.zarr`` store.
    models : tuple of (str, Path)
        Model arms, label and path, in report order.
    output_dir : Path
    ptychi_recon : Path or None
        An iterative reconstruction NPZ, imported as one more arm.
    scan, group, infer, stitch, score, output, run
        The per-stage options.
    """

    test_data: Path
    models: tuple[tuple[str, Path], ...]
    output_dir: Path
    ptychi_recon: Path | None = None
    scan: ScanOptions = field(default_factory=ScanOptions)
    group: GroupOptions = field(default_factory=GroupOptions)
    infer: InferOptions = field(default_factory=InferOptions)
    stitch: StitchOptions = field(default_factory=StitchOptions)
    score: ScoreOptions = field(default_factory=ScoreOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_options(
        cls,
        test_data: str | os.PathLike,
        models: Mapping[str, str | os.PathLike],
        output_dir: str | os.PathLike,
        ptychi_recon: str | os.PathLike | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        where: str = "option",
    ) -> CompareConfig:
        """Build a config from flat options (keywords of ``compare``, keys of a TOML ``[compare]``).

        An unknown key raises :class:`InvalidParameterError` naming it and the nearest valid one
        (``where`` says what held it, e.g. ``"[compare] key"``). A ``compatibility`` mode fills in its
        defaults (:data:`COMPATIBILITY`) for the options not given.
        """
        options = _with_compatibility(options or {})
        sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        for key, value in options.items():
            if key not in _OWNER:
                raise InvalidParameterError(f"unknown {where} {key!r}" + suggest(key, _OWNER))
            sections[_OWNER[key]][key] = value
        # absolute paths: the workers of a cluster resolve a relative path against their own folder
        absolute = lambda path: Path(os.path.abspath(path))  # noqa: E731
        return cls(
            test_data=absolute(test_data),
            models=tuple((str(label), absolute(path)) for label, path in models.items()),
            output_dir=absolute(output_dir),
            ptychi_recon=None if ptychi_recon is None else absolute(ptychi_recon),
            **{name: _SECTIONS[name](**values) for name, values in sections.items()},
        )

    def options(self, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """Every option as a flat ``{name: value}`` (the inverse of :meth:`from_options`)."""
        flat = {}
        for section in _SECTIONS:
            flat |= dataclasses.asdict(getattr(self, section))
        return {k: v for k, v in flat.items() if k not in set(exclude)}

    @property
    def model_paths(self) -> dict[str, Path]:
        """The model arms as ``{label: path}``."""
        return dict(self.models)


# -- the command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option to ``parser``, grouped by stage, with help and default.

    Flags left out of a command line are None in the namespace (:func:`given_options` drops them), so
    the field's default applies; a boolean ``--x`` has its ``--no-x``.
    """
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"{section} options", cls.__doc__.strip())
        for f in dataclasses.fields(cls):
            help_text = f"{f.metadata['help']} (default: {f.default})"
            choices = getattr(f.metadata["check"], "choices", None)
            if f.metadata["check"] is _bool:
                group.add_argument(
                    flag(f.name),
                    dest=f.name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=help_text,
                )
            else:
                group.add_argument(
                    flag(f.name),
                    *f.metadata["aliases"],
                    dest=f.name,
                    default=None,
                    metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
                    help=help_text,
                )


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on a command line (those of :func:`add_arguments` that are not None)."""
    return {name: getattr(args, name) for name in _OWNER if getattr(args, name, None) is not None}
