"""The checks' verdicts and the shipped weights' predictions on every scan we have, recorded once
and compared after any change that makes the checks or the preprocessing faster (issue 26).

    python tests/verdicts.py [--data ../shared/data] [--out tests/data/check_verdicts.json]

records, for every real scan in ``../shared/data`` (``samples/``, ``ixi/native``, ``ixi/2mm`` with
and without its mask, ``openneuro/``), every input of the bad-input corpus (``tests/corpus.py``)
and a set of synthetic heads that make each check warn or fail (``tests/phantom.py``):

* the status (pass/warn/fail/skip) of every check, judged for the shipped weights (2 mm, brain
  view), of the checks that depend on the options judged for the defaults (1 mm, sliding), and of
  the bias check with ``--n4`` on a few inputs; all with ``--strip never`` (a head without a mask
  is judged, not handed to the skull stripper: whether deepbet is installed does not matter);
* the age and P(female) the shipped weights predict after ``conform`` (the error's type where
  it cannot be conformed), whatever the checks say (as ``--force`` does);
* the statistics behind the heuristic checks, for reading margins (not compared).

``tests/test_check_verdicts.py`` runs the same measurements and compares them with the file
recorded from main before the change: the same status for every check, ages within 0.01 y.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from conftest import make_affine, rotation, save
from corpus import build_corpus
from phantom import head, world_bias

from brainbag.errors import BrainbagError
from brainbag.image.checks import CheckOptions, CheckReport, run_checks
from brainbag.image.io import load_image
from brainbag.image.preprocess import conform, load_mask
from brainbag.network.inference import InferenceSettings
from brainbag.run.discover import discover_folder
from brainbag.run.scan import interpret, run_weights
from brainbag.weights.file import LoadedWeights
from brainbag.weights.resolve import open_weights, training_statistic

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "check_verdicts.json"
AGE_TOLERANCE_Y = 0.01
P_FEMALE_TOLERANCE = 0.001
#: checks whose verdict depends on the options, judged again for the defaults (1 mm, sliding)
OPTION_DEPENDENT = ("voxel_size", "field_of_view")


@dataclass(frozen=True)
class Case:
    """One input: the image, its mask, whether to judge the bias check with --n4 as well."""

    path: Path
    mask: Path | None = None
    n4: bool = False


def real_cases(data: Path) -> dict[str, Case]:
    """Every real scan under ``data`` (keys: paths relative to it; ``+mask``: with its mask)."""
    cases: dict[str, Case] = {}

    def add(path: Path, mask: Path | None = None, n4: bool = False) -> None:
        key = path.relative_to(data).as_posix() + ("+mask" if mask is not None else "")
        cases[key] = Case(path, mask, n4)

    for path in sorted((data / "samples").glob("*")):
        if path.name.endswith((".nii.gz", ".mgz")):
            add(path, n4=path.name.startswith("beijing"))
    for path in sorted((data / "ixi" / "native").glob("*_T1w.nii.gz")):
        add(path)
    for path in sorted((data / "ixi" / "2mm").glob("*_T1w.nii.gz")):
        add(path, path.with_name(path.name.replace("_T1w", "_mask")),
            n4="IXI296" in path.name)
        add(path)
    for path in sorted((data / "openneuro").glob("ds*/sub-*/anat/*_T1w.nii.gz")):
        add(path)
    return cases


def synthetic_cases(tmp: Path) -> dict[str, Case]:
    """The bad-input corpus and synthetic heads made to warn or fail each check, in ``tmp``."""
    cases: dict[str, Case] = {}
    corpus = tmp / "corpus"
    corpus.mkdir()
    for name, args in build_corpus(corpus).items():
        if name == "mixed batch":
            for path in (item.path for item in discover_folder(Path(args[0])).items):
                cases[f"corpus/{name}/{path.name}"] = Case(path)
        else:
            cases[f"corpus/{name}"] = Case(Path(args[0]), Path(args[2]) if len(args) > 2
                                           else None)
    made = tmp / "phantom"
    made.mkdir()

    def add(name: str, data: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None,
            n4: bool = False) -> None:
        path = save(data, affine, made / f"{name}.nii.gz")
        mask_path = save(mask, affine, made / f"{name}_mask.nii.gz") if mask is not None \
            else None
        cases[f"phantom/{name}"] = Case(path, mask_path, n4)

    data, affine, brain = head()
    add("clean", data, affine, n4=True)
    add("biased", *head(bias=world_bias(0.5))[:2], n4=True)
    skull, skull_affine, skull_brain = head(skull=True)
    add("skull_on", skull, skull_affine)
    add("skull_on_masked", skull, skull_affine, skull_brain.astype(np.float32))
    pieces = brain.copy()
    pieces[:, 50:54, :] = False
    add("mask_in_pieces", data, affine, pieces.astype(np.float32))
    add("axes_swapped", np.ascontiguousarray(data.transpose(0, 2, 1)), affine)
    cut = data.copy()
    cut[:, :, 74] = np.where(data[:, :, 74] > 0, data[:, :, 74], 0)
    add("cut_at_the_top", cut[:, :, :75], affine)
    add("label_map", brain.astype(np.float32), affine)
    add("z_scored", np.where(brain, (data - data[brain].mean()) / data[brain].std(), 0.0)
        .astype(np.float32), affine)
    add("oblique_40deg", *head(affine=make_affine(zooms=(2.0, 2.0, 2.0), rot=rotation(0, 40),
                                                  origin=(-95.0, -80.0, -130.0)))[:2])
    add("lia_1mm", *head(shape=(150, 140, 190), affine=make_affine(
        flips=(-1, -1, 1), perm=(0, 2, 1), origin=(75.0, 95.0, -60.0)))[:2])
    add("anisotropic_1x1.33x1.33", *head(shape=(150, 150, 110), affine=make_affine(
        zooms=(1.0, 1.33, 1.33), origin=(-75.0, -100.0, -73.0)))[:2])
    add("coarse_4mm", *head(shape=(48, 58, 44), affine=make_affine(
        zooms=(4.0, 4.0, 4.0), origin=(-96.0, -116.0, -88.0)))[:2])
    return cases


def shipped_weights() -> LoadedWeights:
    """The default RF 9 weights brainbag ships (bundled: nothing is downloaded)."""
    return open_weights(None, 9)


def _statuses(report: CheckReport) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def measure(case: Case, weights: LoadedWeights) -> dict[str, Any]:
    """Verdicts, prediction and check statistics for one input."""
    meta = weights.meta
    fields = training_statistic(meta.training, "bias_field")  # judged as predict judges
    shipped = CheckOptions(mask=case.mask, voxel_mm=meta.voxel_mm, view_xyz=meta.view,
                           mode="auto", strip="never", bias_field=fields)
    report = run_checks(case.path, shipped)
    checks = {"shipped": _statuses(report),
              "default": _statuses(run_checks(case.path, CheckOptions(mask=case.mask,
                                                                      strip="never"),
                                              names=OPTION_DEPENDENT))}
    if case.n4:
        n4 = CheckOptions(mask=case.mask, n4=True, voxel_mm=meta.voxel_mm, view_xyz=meta.view,
                          mode="auto", strip="never", bias_field=fields)
        checks["n4"] = _statuses(run_checks(case.path, n4, names=("bias_field",)))
    wanted = {"skull_stripped": ("object_litres",), "brain_mask": ("litres",
              "main_component_fraction"), "anatomy": ("skewness_xyz",),
              "field_of_view": ("brain_extent_mm",), "bias_field": ("field_range",)}
    stats = {f"{r.name}.{k}": _round(r.values[k]) for r in report.results
             for k in wanted.get(r.name, ()) if k in r.values}
    record: dict[str, Any] = {"checks": checks, "stats": stats}
    try:
        loaded = load_image(case.path)
        mask = load_mask(case.mask, loaded) if case.mask is not None else None
        conformed = conform(loaded, mask, spacing=meta.voxel_mm)
        heads = interpret(run_weights(weights, conformed, InferenceSettings(device="cpu")),
                          weights)
        record.update(age=heads.age_global, p_female=heads.p_female)
    except BrainbagError as exc:
        record["error"] = type(exc).__name__
    return record


def compare(key: str, expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between a recorded measurement and a new one (empty: nothing that counts)."""
    problems = []
    for which, statuses in expected["checks"].items():
        new = got["checks"].get(which, {})
        for name, status in statuses.items():
            if new.get(name) != status:
                problems.append(f"{key}: check {name} ({which} options) was {status}, now "
                                f"{new.get(name)} (statistics then {expected['stats']}, now "
                                f"{got['stats']})")
    if "error" in expected or "error" in got:
        if expected.get("error") != got.get("error"):
            problems.append(f"{key}: conform/predict gave {expected.get('error', 'a result')}, "
                            f"now {got.get('error', 'a result')}")
        return problems
    if abs(got["age"] - expected["age"]) >= AGE_TOLERANCE_Y:
        problems.append(f"{key}: age {expected['age']:.4f} y, now {got['age']:.4f} y")
    if abs(got["p_female"] - expected["p_female"]) >= P_FEMALE_TOLERANCE:
        problems.append(f"{key}: P(female) {expected['p_female']:.5f}, now "
                        f"{got['p_female']:.5f}")
    return problems


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    weights = shipped_weights()
    commit = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {**synthetic_cases(Path(tmp)), **real_cases(args.data.resolve())}
        recorded = {}
        for i, (key, case) in enumerate(cases.items()):
            recorded[key] = measure(case, weights)
            print(f"{i + 1}/{len(cases)} {key}: {recorded[key]}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "recorded_from": commit, "weights": weights.id, "cases": recorded}, indent=1) + "\n")
    print(f"{len(recorded)} inputs -> {args.out}")


if __name__ == "__main__":
    main()
