"""Record in a weights file what its training images looked like, for weights trained before
brainbag recorded it itself (``brainbag train`` now does).

    python training/record_statistics.py WEIGHTS DATA [--workers N]

measures the bias-field check's statistic (:mod:`brainbag.image.bias`) on every image of DATA (a
participants table, BIDS folder or anything ``brainbag train`` reads: give the data the weights
were trained on; all its images are used) and writes its summary to ``training.statistics`` in
the metadata of WEIGHTS; the tensors are unchanged. When WEIGHTS is bundled in the shipped
manifest (``weights_manifest/``), its entry gets the new sha256 and size and the same record.
The model card is not rewritten: say there what changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from brainbag.files import write_json_atomic
from brainbag.train.datasets import discover
from brainbag.train.statistics import training_statistics
from brainbag.weights.file import load_weights, save_weights
from brainbag.weights.manifest import manifest_document, read_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "weights_manifest" / "manifest.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    records = discover(args.data).records
    t0 = time.perf_counter()

    def done(i: int, record: object, value: float | None) -> None:
        shown = "-" if value is None else f"{100 * value:.1f} %"
        print(f"{i + 1}/{len(records)} {getattr(record, 't1w', '')}: {shown}", flush=True)

    statistics = training_statistics(records, args.workers, done)
    print(f"measured {len(records)} images in {time.perf_counter() - t0:.0f} s: "
          f"{json.dumps(statistics)}")
    loaded = load_weights(args.weights)
    loaded.meta.training["statistics"] = statistics
    sha = save_weights(args.weights, loaded.model, loaded.meta)
    print(f"{args.weights}: sha256 {sha}")
    entries = read_manifest(MANIFEST)
    bundled = [e for e in entries if e.bundled and (MANIFEST.parent / e.bundled).resolve()
               == args.weights.resolve()]
    if bundled:
        entries = [dataclasses.replace(e, sha256=sha, size=args.weights.stat().st_size,
                                       training={**e.training, "statistics": statistics})
                   if e in bundled else e for e in entries]
        write_json_atomic(MANIFEST, manifest_document(entries, description=json.loads(
            MANIFEST.read_text())["description"]))
        print(f"{MANIFEST}: entry {bundled[0].id} updated")


if __name__ == "__main__":
    main()
