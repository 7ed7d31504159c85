"""Model cards: the stub ``brainbag train`` writes beside its weights, and the card ``brainbag
weights info`` shows for a file (the one beside it, else the stub made from its metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from brainbag.image.bias import training_range
from brainbag.image.io import sha256_file
from brainbag.weights.file import SUFFIX, WeightsMeta, read_meta


def rf_text(meta: WeightsMeta) -> str:
    """The receptive field as the card states it: "9 voxels = 18 mm at the network's 2 mm
    voxels" (the metadata's ``rf`` is in voxels; ``rf_mm`` is that at ``voxel_mm``)."""
    return f"{meta.rf} voxels = {meta.rf_mm:g} mm at the network's {meta.voxel_mm:g} mm voxels"


def _bias_text(training: dict[str, Any]) -> str:
    bias = (training.get("statistics") or {}).get("bias_field")
    if not bias:
        return "not measured (no usable brain masks)"
    low, high = training_range(bias)
    return (f"{100 * low:.1f}-{100 * high:.1f} % over {bias['n']} images (5th-95th percentile "
            f"{100 * bias['p5']:.1f}-{100 * bias['p95']:.1f} %, median {100 * bias['p50']:.1f} "
            "%); `brainbag check` judges new scans against this range")


def model_card(meta: WeightsMeta) -> str:
    """A model-card stub with the measured validation figures."""
    t = meta.training
    val = t.get("validation", {})

    def fig(key: str, fmt: str, unit: str = "") -> str:
        v = val.get(key)
        return "not measured" if v is None else f"{v:{fmt}}{unit}"

    validation = (f"best epoch {t.get('best_epoch')}, selected by {t.get('selected_by')}, "
                  f"{t.get('val_view')} view")
    init = t.get("init") or {}
    start = (f"fine-tuned from weights {init.get('id')} (sha256 {init.get('sha256')}); frozen: "
             f"{', '.join(init.get('frozen') or []) or 'nothing'}" if init
             else "random initialisation (seed " + str(t.get("seed")) + ")")
    return f"""# Model card: {meta.id}

*Written by brainbag {meta.code_version}. A stub: complete the sections marked TODO.*

## Model
- Architecture: BagNet-3D (half-width 3D ResNet-50 body), receptive field {rf_text(meta)},
  padding {meta.arch_kwargs.get('padding')}, width {meta.arch_kwargs.get('width')}
- Heads: {', '.join(meta.heads)}; task `{t.get('task')}`; loss {t.get('loss')}
- Age target scaling: {meta.age_scaling}

## Training data
- Data: {t.get('data')}; licence: {t.get('licence')}
- Read from: {t.get('data_path')} (layout {t.get('layout')})
{datasets_text(t.get('datasets') or [])}
- Split: {t.get('split')}
- Images: {t.get('images')}; subjects: {t.get('subjects')}
- Bias field of the training images: {_bias_text(t)}
- Recipe: {t.get('recipe')}; epochs trained: {t.get('epochs')} of {t.get('epochs_planned')};
  seed {t.get('seed')}; precision {t.get('precision')}
- Start: {start}
- Training views: {t.get('augmentation', 'not recorded')}
- Local loss weight (every map cell trained on the subject's age and sex):
  {t.get('local_weight', 0)}; intensity augmentation strength: {t.get('augment', 0)}

## Validation ({validation})
- Age MAE: {fig('val_mae', '.2f', ' years')}
- Sex accuracy: {fig('val_accuracy', '.3f')}
- Loss: {fig('val_loss', '.4f')}

Test-set figures: run `brainbag evaluate DATA --weights weights.safetensors --split test`;
cross-validated ones, per site and next to the baselines: `brainbag crossval`.

## Intended use and limitations
Research use only; not a medical device. TODO: populations and scanners the training data
covers, known failure modes.

## Use on your own scanner
Predictions carry a bias that depends on the scanner, the protocol and the age range. Fit a
site calibration on healthy controls from your scanner (`brainbag calibrate`, then
`brainbag predict --calibration`), or fine-tune on many (`brainbag train --init`): see
"Use on your own scanner" in the brainbag README.
"""


@dataclass(frozen=True)
class FileCard:
    """What ``brainbag weights info FILE`` shows: a weights file's metadata and model card."""

    path: Path
    sha256: str
    size: int
    meta: WeightsMeta
    card: str
    card_path: Path | None  # the model card file beside the weights; None: made from the meta

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "size": self.size,
                "meta": asdict(self.meta), "model_card_path": str(self.card_path)
                if self.card_path else None, "model_card": self.card}


def file_card(path: Path) -> FileCard:
    """The metadata of a weights file (no tensors loaded) and its model card: ``MODEL_CARD.md``
    beside a run's ``weights.safetensors``, ``<stem>.md`` beside any other file, else the card
    written from the file's own metadata."""
    path = Path(path).expanduser()
    meta = read_meta(path)
    for candidate in (path.with_suffix(".md"), path.parent / "MODEL_CARD.md"):
        if candidate.is_file() and (candidate.name != "MODEL_CARD.md"
                                    or path.name == f"weights{SUFFIX}"):
            return FileCard(path, sha256_file(path), path.stat().st_size, meta,
                            candidate.read_text(encoding="utf-8"), candidate)
    return FileCard(path, sha256_file(path), path.stat().st_size, meta, model_card(meta), None)


# --- the card of shipped weights ---------------------------------------------------------------


def datasets_text(datasets: list[dict[str, Any]]) -> str:
    """Markdown bullets, one per training data set: title, licence, citation, subjects, sites,
    groups, ages and sexes (``training.datasets`` of the metadata); "" when none is recorded."""
    lines = []
    for d in datasets:
        sites = ", ".join(f"{s} ({n})" for s, n in (d.get("sites") or {}).items())
        groups = ", ".join(f"{g} {n}" for g, n in (d.get("groups") or {}).items())
        ages = d.get("age_range")
        sexes = d.get("sexes") or {}
        parts = [f"{d.get('images')} images of {d.get('subjects')} subjects"]
        if ages:
            parts.append(f"ages {ages[0]:.0f}-{ages[1]:.0f}")
        parts.append(f"{sexes.get('F', 0)} F / {sexes.get('M', 0)} M images")
        if sites:
            parts.append(f"sites (subjects): {sites}")
        parts.append(f"groups (subjects): {groups}" if groups else "no group recorded")
        cite = f" Cite: {d['citation']}." if d.get("citation") else ""
        url = f" <{d['url']}>" if d.get("url") else ""
        lines.append(f"- **{d.get('title') or d.get('name')}** (`{d.get('name')}`): "
                     f"{'; '.join(parts)}. Licence: {d.get('licence') or 'not stated'}.{cite}"
                     f"{url}")
    return "\n".join(lines)


def calibration_text(cal: dict[str, Any]) -> str:
    """The model card's bullet list of a calibration (brainbag.person.clinical.fit_calibration)."""
    if not cal:
        return "- nothing: these weights carry no calibration (raw gap only)."
    lines = []
    bias = cal.get("bias_correction")
    if bias:
        lines.append(
            f"- **bias correction** (de Lange & Cole 2020): predicted = {bias['slope']:.3f} x age "
            f"+ {bias['intercept']:.2f} on the held-out scans; corrected gap = (predicted - "
            f"{bias['intercept']:.2f}) / {bias['slope']:.3f} - age. Because the slope is small, "
            f"the correction multiplies every error by {1 / bias['slope']:.1f}: on the held-out "
            f"scans the corrected gap has a standard deviation of {bias['corrected_gap_sd']:.1f} "
            f"y (the raw gap {bias['raw_gap_sd']:.1f} y) among these healthy adults: a "
            "corrected gap of that size is what healthy adults showed, not evidence of "
            "anything.")
    interval = cal.get("age_interval")
    if interval:
        lines.append(
            f"- **{interval['level']:.0%} age interval**: predicted age +/- "
            f"{interval['half_width_years']:.1f} y (split conformal on the held-out absolute "
            "errors; holds on average over ages, not at every age).")
    spread = cal.get("map_spread")
    if spread:
        lines.append(
            f"- **map spread** (brain-weighted SD of the local age map): {spread['p5']:.1f}-"
            f"{spread['p95']:.1f} y on the held-out scans (5th-95th percentile, median "
            f"{spread['median']:.1f}); a scan below {spread['warn_below']:.1f} or above "
            f"{spread['warn_above']:.1f} y is flagged.")
    sex = cal.get("sex")
    if sex:
        lo, hi = sex["undetermined"]
        lines.append(
            f"- **sex call**: F above P(female) {hi:g}, M below {lo:g}, else undetermined; a "
            f"recorded F with P < {sex['mismatch_recorded_female_below']:g} or M with P > "
            f"{sex['mismatch_recorded_male_above']:g} is flagged as a possible mix-up.")
    return "\n".join(lines)


def _f(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _get(summary: dict[str, Any], who: str, head: str, key: str) -> Any:
    return ((summary.get(who) or {}).get(head) or {}).get(key)


def figures_table(subsets: list[tuple[str, dict[str, Any]]]) -> str:
    """A markdown table of cross-validated subsets: the network next to both baselines."""
    head = ("| subset | n | age MAE (y) | site-mean MAE | morph. MAE | ratio to site mean | "
            "ratio to morph. | r | bias slope | sex acc. | site-mean acc. | morph. acc. | "
            "AUC | morph. AUC |\n|" + "---|" * 14)
    rows = [head]
    for name, s in subsets:
        ratio = s.get("mae_ratio") or {}
        rows.append(
            f"| {name} | {s.get('n')} | {_f(_get(s, 'model', 'age', 'mae'))} | "
            f"{_f(_get(s, 'site_mean', 'age', 'mae'))} | "
            f"{_f(_get(s, 'morphometric', 'age', 'mae'))} | {_f(ratio.get('site_mean'))} | "
            f"{_f(ratio.get('morphometric'))} | {_f(_get(s, 'model', 'age', 'r'), '.3f')} | "
            f"{_f(_get(s, 'model', 'age', 'bias_slope'), '.3f')} | "
            f"{_f(_get(s, 'model', 'sex', 'accuracy'), '.1%')} | "
            f"{_f(_get(s, 'site_mean', 'sex', 'accuracy'), '.1%')} | "
            f"{_f(_get(s, 'morphometric', 'sex', 'accuracy'), '.1%')} | "
            f"{_f(_get(s, 'model', 'sex', 'auc'), '.3f')} | "
            f"{_f(_get(s, 'morphometric', 'sex', 'auc'), '.3f')} |")
    return "\n".join(rows)


def crossval_subsets(cv: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """All, each data set (when several), each site, each group of a crossval record."""
    out = [("all", cv["overall"])]
    if len(cv.get("by_dataset") or {}) > 1:
        out += list(cv["by_dataset"].items())
    out += [(k, v) for k, v in (cv.get("by_site") or {}).items()
            if k not in (cv.get("by_dataset") or {})]
    out += list((cv.get("by_group") or {}).items())
    return out


def unseen_site_text(lodo: dict[str, Any] | None) -> str:
    """What leave-one-dataset-out says about a site never seen, one sentence per held-out data
    set; says so loudly where the model is worse than the training mean."""
    if not lodo or not lodo.get("by_dataset"):
        return ("**Not measured on a site left out of training** (no leave-one-dataset-out "
                "figures): on a new scanner expect larger errors, possibly worse than "
                "predicting the training data's mean age.")
    lines = []
    for name, s in lodo["by_dataset"].items():
        model = _get(s, "model", "age", "mae")
        mean = _get(s, "site_mean", "age", "mae")
        morph = _get(s, "morphometric", "age", "mae")
        if model is None or mean is None:
            continue
        versus = (f"{_f(model)} y against {_f(mean)} y for the training mean and {_f(morph)} y "
                  "for the morphometric baseline fitted on the same training data")
        if model > mean:
            lines.append(
                f"- **Worse than the training mean on {name}, a site it never saw**: age MAE "
                f"{versus}. Do not read its ages on a scanner it was not trained on without "
                "checking them first (e.g. a site calibration on that scanner's controls).")
        else:
            lines.append(f"- On {name}, never seen in training: age MAE {versus} "
                         f"({model / mean:.2f}x the training mean).")
    return "\n".join(lines)


def release_card(meta: WeightsMeta, weights_id: str, licence: str, notes: str = "") -> str:
    """The model card of shipped weights: what they are, every training data set (licence,
    citation, subjects, patients, sites, ages), the cross-validated figures pooled and per data
    set, site and group next to both baselines, leave-one-dataset-out, how to read a
    prediction, limits and licence. Everything comes from the metadata (``training.datasets``,
    ``training.crossval``, ``training.lodo``, ``calibration``); ``notes`` (markdown) is added
    as written."""
    t = meta.training
    cv = t.get("crossval") or {}
    lodo = t.get("lodo")
    datasets = t.get("datasets") or []
    ages = t.get("age_range") or [None, None]
    command = t.get("train_command") or (
        f"brainbag train {t.get('data_path')} --recipe {t.get('recipe')}")
    view = meta.view
    if cv:
        cv_text = (
            f"{cv.get('scheme')} ({cv.get('folds')} folds, `{Path(str(cv.get('folds_file'))).name}`"
            f") on {cv.get('subjects')} subjects ({cv.get('images')} images), the same recipe "
            "per fold, each image predicted once, through the predict pipeline, by the model "
            "that never saw its subject"
            + (f"; trained on the groups {', '.join(cv['train_groups'])} only (the others "
               "predicted)" if cv.get("train_groups") else "")
            + f". Command: `{cv.get('command')}`.\n\nBaselines on the same folds, fitted on the "
            f"training folds only:\n\n- {(cv.get('baselines') or {}).get('site_mean')}\n"
            f"- {(cv.get('baselines') or {}).get('morphometric')}\n\n"
            + figures_table(crossval_subsets(cv)))
    else:
        cv_text = "Not cross-validated: no figures on held-out subjects."
    if lodo:
        lodo_text = (
            "Each data set held out in turn: trained on the others with the same recipe, "
            "tested on it; both baselines fitted on the same training data (the site mean of a "
            f"site never trained on is the training mean). Command: `{lodo.get('command')}`.\n\n"
            + figures_table(list(lodo["by_dataset"].items())) + "\n\n"
            + unseen_site_text(lodo))
    else:
        lodo_text = unseen_site_text(None)
    view_text = (f"; the network sees a {'x'.join(map(str, view))}-voxel box centred on the "
                 "brain" if view else "")
    derived = ", ".join(f"{d.get('title')} ({d.get('licence') or 'licence not stated'})"
                        for d in datasets) or "the training data"
    notes_text = f"\n## Notes\n\n{notes.strip()}\n" if notes.strip() else ""
    return f"""# Model card: {weights_id}

BagNet-3D, receptive field {meta.rf} voxels = **{meta.rf_mm:g} mm** at the network's
**{meta.voxel_mm:g} mm** voxels (local maps on a {8 * meta.voxel_mm:g} mm grid), width
{meta.arch_kwargs.get('width')}, heads {', '.join(meta.heads)}; global prediction pooled over
{'the brain (masked pooling)' if meta.pooling == 'brain' else 'all map cells'}.
Trained with brainbag {meta.code_version} by `{command}` (recipe {t.get('recipe')},
epochs: {t.get('epochs')}, seed {t.get('seed')}, {t.get('precision')}).
Loss: {t.get('loss')}. Training views: {t.get('augmentation', 'not recorded')}.

## What it was trained on

{datasets_text(datasets) or '- ' + str(t.get('data'))}

{t.get('patients') or ''}
All together {(t.get('images') or {}).get('train')} images of
{(t.get('subjects') or {}).get('train')} subjects, ages {_f(ages[0], '.1f')}-{_f(ages[1], '.1f')}
years. Preprocessing as `brainbag predict` does it: RAS+, skull-stripped (mask), resampled to
{meta.voxel_mm:g} mm, whitened within the brain{view_text}. Bias fields of the training images:
{_bias_text(t)}.

## How well it predicts (cross-validated)

{cv_text}

## On a site it never saw (leave-one-dataset-out)

{lodo_text}

## Reading a prediction for a person

Fitted on the held-out predictions and stored in the weights (`calibration`), so `brainbag
predict --age YEARS` reports:

{calibration_text(meta.calibration or {})}

## Limits

- Trained on ages {_f(ages[0], '.0f')}-{_f(ages[1], '.0f')} from the sites above: expect larger
  errors on other scanners, protocols, populations and ages; `brainbag predict` warns when a
  predicted age lies outside the training range.
- Like every brain-age model it regresses to the mean (bias slope above): young subjects are
  predicted older and old subjects younger; correct for it before reading a brain-age gap.
- A P(female) near 0.5 means "undetermined".
- Research use only; not a medical device.
{notes_text}
## Licence

The weights are derived from {derived} and are shared under **{licence}**.
"""
