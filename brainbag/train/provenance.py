"""What a training run's data was, as its weights record it: every data set with its licence and
citation, subjects, sites, groups (and whether patients were in), ages and sexes, counted from the
images the run actually trained on, never from a recipe's text.

Data sets brainbag knows (:data:`KNOWN_DATASETS`) get their licence and citation from here; any
other gets the licence its BIDS ``dataset_description.json`` states (or ``--data-licence``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from brainbag.train.datasets import ImageRecord

KNOWN_DATASETS: dict[str, dict[str, str]] = {
    "ixi": {
        "title": "IXI",
        "licence": "CC BY-SA 3.0",
        "citation": "IXI dataset, brain-development.org (Hajnal et al.)",
        "url": "https://brain-development.org/ixi-dataset/",
        "population": "healthy adults scanned at London hospitals (HH: Hammersmith, Guys: "
                      "Guy's)",
    },
    "ds002748": {
        "title": "OpenNeuro ds002748",
        "licence": "CC0",
        "citation": "Bezmaternykh, Melnikov, Savelov, Petrovskii: Resting state with closed "
                    "eyes for patients with depression and healthy participants. "
                    "Neural Plasticity 2021, doi:10.1155/2021/8846097; dataset "
                    "doi:10.18112/openneuro.ds002748.v1.0.5",
        "url": "https://openneuro.org/datasets/ds002748",
        "population": "adults with mild to moderate depression and healthy controls, one "
                      "site",
    },
}
#: values of a 'group' column that mean healthy controls (compared lower-case)
CONTROL_GROUPS = {"control", "controls", "hc", "healthy", "healthy control", "healthy_control",
                  "healthy controls", "cn", "nc", "normal"}


def known_dataset(name: str, sites: Sequence[str] = ()) -> tuple[str, dict[str, str]] | None:
    """The :data:`KNOWN_DATASETS` entry a data set is: by its name (``ixi``, ``IXI-2mm``) or by
    one of its sites (the shared OpenNeuro table is data set ``openneuro``, site
    ``ds002748``)."""
    for candidate in (name, *sites):
        text = candidate.lower()
        for key, entry in KNOWN_DATASETS.items():
            if text == key or text.startswith(key + "-") or text.startswith(key + "_"):
                return key, entry
    return None


def is_patient_group(cohort: str) -> bool:
    """A group that is not healthy controls."""
    return cohort.strip().lower() not in CONTROL_GROUPS


def describe_datasets(records: Sequence[ImageRecord], licence: str | None = None
                      ) -> list[dict[str, Any]]:
    """One entry per data set of the images trained on (``records``): name, title, licence,
    citation and URL (known data sets; ``licence`` stands in for the others), images, subjects,
    sites and groups (subjects each), patients, age range and sexes (images)."""
    out = []
    for name in sorted({r.dataset or "data" for r in records}):
        mine = [r for r in records if (r.dataset or "data") == name]
        sites = sorted({r.site for r in mine if r.site})
        known = known_dataset(name, sites)
        entry = known[1] if known else {}
        ages = [r.age for r in mine if r.age is not None]
        cohorts = sorted({r.cohort for r in mine if r.cohort})
        groups = {c: len({r.group for r in mine if r.cohort == c}) for c in cohorts}
        out.append({
            "name": name,
            "title": entry.get("title", name),
            "licence": entry.get("licence") or licence,
            "citation": entry.get("citation"),
            "url": entry.get("url"),
            "population": entry.get("population"),
            "images": len(mine),
            "subjects": len({r.group for r in mine}),
            "sites": {s: len({r.group for r in mine if r.site == s}) for s in sites},
            "groups": groups,
            "patients": sum(n for c, n in groups.items() if is_patient_group(c))
            if groups else None,
            "age_range": [min(ages), max(ages)] if ages else None,
            "sexes": {s: sum(r.sex == s for r in mine) for s in ("F", "M")},
        })
    return out


def patients_sentence(datasets: Sequence[dict[str, Any]]) -> str:
    """Whether patients were trained on, in one sentence for a model card."""
    grouped = [d for d in datasets if d.get("groups")]
    if not grouped:
        return ("No group was recorded for the training images (no 'group' column): patients "
                "are not known to be in or out.")
    patients = {g: n for d in grouped for g, n in d["groups"].items() if is_patient_group(g)}
    ungrouped = [d["title"] for d in datasets if not d.get("groups")]
    tail = (f"; {', '.join(ungrouped)} recorded no group" if ungrouped else "")
    if patients:
        listed = ", ".join(f"{n} {g}" for g, n in sorted(patients.items()))
        return f"**Patients were in the training data**: {listed} subjects{tail}."
    controls = sum(n for d in grouped for n in d["groups"].values())
    return f"No patients: the {controls} grouped training subjects are all controls{tail}."


def datasets_line(datasets: Sequence[dict[str, Any]]) -> str:
    """The data trained on in one line, from :func:`describe_datasets`: "ixi: 10 images of 10
    subjects, ages 23-74, 6 F / 4 M images, sites HH 8, Guys 2" (one part per data set, sites
    counted in subjects)."""
    parts = []
    for d in datasets:
        text = f"{d['name']}: {d['images']} images of {d['subjects']} subjects"
        if d.get("age_range"):
            lo, hi = d["age_range"]
            text += f", ages {lo:.0f}-{hi:.0f}"
        sexes = d.get("sexes") or {}
        text += f", {sexes.get('F', 0)} F / {sexes.get('M', 0)} M images"
        if d.get("sites"):
            text += ", sites " + ", ".join(f"{k} {v}" for k, v in d["sites"].items())
        parts.append(text)
    return "; ".join(parts) or "no images"
