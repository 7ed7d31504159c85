"""Model cards: the stub ``brainbag train`` writes beside its weights, and the card ``brainbag
weights info`` shows for a file (the one beside it, else the stub made from its metadata)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from brainbag.image.io import sha256_file
from brainbag.weights.file import SUFFIX, WeightsMeta, read_meta


def model_card(meta: WeightsMeta) -> str:
    """A model-card stub with the measured validation figures."""
    t = meta.training
    val = t.get("validation", {})

    def fig(key: str, fmt: str, unit: str = "") -> str:
        v = val.get(key)
        return "not measured" if v is None else f"{v:{fmt}}{unit}"

    validation = (f"best epoch {t.get('best_epoch')}, selected by {t.get('selected_by')}, "
                  f"{t.get('val_view')} view")
    return f"""# Model card: {meta.id}

*Written by brainbag {meta.code_version}. A stub: complete the sections marked TODO.*

## Model
- Architecture: BagNet-3D (half-width 3D ResNet-50 body), receptive field {meta.rf} mm,
  padding {meta.arch_kwargs.get('padding')}, width {meta.arch_kwargs.get('width')}
- Heads: {', '.join(meta.heads)}; task `{t.get('task')}`; loss {t.get('loss')}
- Age target scaling: {meta.age_scaling}

## Training data
- Data: {t.get('data')} (layout {t.get('layout')}), licence: {t.get('licence')}
- Split: {t.get('split')}
- Images: {t.get('images')}; subjects: {t.get('subjects')}
- Recipe: {t.get('recipe')}; epochs trained: {t.get('epochs')} of {t.get('epochs_planned')};
  seed {t.get('seed')}; precision {t.get('precision')}
- Training views: {t.get('augmentation', 'not recorded')}
- Local loss weight (every map cell trained on the subject's age and sex):
  {t.get('local_weight', 0)}; intensity augmentation strength: {t.get('augment', 0)}

## Validation ({validation})
- Age MAE: {fig('val_mae', '.2f', ' years')}
- Sex accuracy: {fig('val_accuracy', '.3f')}
- Loss: {fig('val_loss', '.4f')}

Test-set figures: run `brainbag evaluate DATA --weights weights.safetensors --split test`.

## Intended use and limitations
Research use only; not a medical device. TODO: populations and scanners the training data
covers, known failure modes.
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
