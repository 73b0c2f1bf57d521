"""The `inputs` stage: fingerprints of what the pipeline reads from outside the repository.

DVC sees the files of the repository; a dataset root and a checkpoint file named in params.yaml
lie outside its view, so an edit to them (a list line, a class name, an image's bytes, a
replaced checkpoint) left `dvc repro` saying "up to date". This stage runs on every `dvc repro`
(``always_changed`` in dvc.yaml) and writes two small files that stay byte-identical while
nothing they cover changes, so DVC skips every later stage; after a change, the stage that reads
it (prepare or weights) re-runs, and after it only what its changed outputs reach.

* ``data/inputs/dataset.json``: the dataset's name and options, the SHA-256 of each list,
  class-name or archive file, and per split the number of listed images and one SHA-256 over
  their paths and content hashes. The content hashes come from the per-user stat cache
  (:mod:`ltpipe.data.fingerprint`), shared with prepare: an image is read again only when its
  stat changed, ctime included, so bytes rewritten with size and mtime restored are read again.
* ``data/inputs/checkpoint.json``: ``model.pretrained``, and the SHA-256 of the file when it
  names a local file (through the same cache: a 1.7 GB checkpoint is not re-read on every run).

Nothing in them depends on the machine (no times, inodes, or paths params.yaml does not name),
so a teammate's clone records the same bytes. Problems with the data itself (a missing list, an
unparsable line, a missing image) are recorded, not raised: prepare re-runs because the
fingerprint changed, and says what is wrong with its usual message. On a machine without the
dataset root or the checkpoint file (training on features pulled from a DVC remote), the recorded
fingerprint is kept when params.yaml still names the same dataset and options (the same file),
and the stage says so: prepare or weights could not run there, and their pulled outputs stand.
"""

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from ltpipe.core import paths
from ltpipe.core.config import Params
from ltpipe.core.errors import DataError
from ltpipe.core.params_layout import check_layout
from ltpipe.data.checks import normalised_path
from ltpipe.data.fingerprint import FileHasher, HashStats, stat_cache_path
from ltpipe.data.formats import read_list_paths
from ltpipe.datasets.registry import DATASETS, DatasetInputs, dataset_inputs
from ltpipe.validate import check_once


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, record: dict) -> bool:
    """Write ``record`` unless ``path`` already holds it; whether it changed."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    try:
        if Path(path).read_text() == text:
            return False
    except OSError:
        pass
    with paths.atomic_target(path) as partial:
        partial.write_text(text)
    return True


def _file_hash(hasher: FileHasher, path: Path) -> str:
    path = Path(os.path.abspath(path))
    return hasher.hashes(path.parent, [path.name], missing_ok=True)[0][0]


def _listed_images(inputs: DatasetInputs, hasher: FileHasher, stats: HashStats) -> Dict[str, dict]:
    """Per split: how many images its list names, and one SHA-256 over their paths and content hashes."""
    out = {}
    for split, list_path in sorted(inputs.lists.items()):
        try:
            rels = [normalised_path(rel) for rel in read_list_paths(list_path)]
        except DataError as exc:  # prepare says it in full; the fingerprint changes with the list's bytes
            out[split] = {"unreadable_list": type(exc).__name__}
            continue
        digest, unreadable, split_stats = hasher.listing(inputs.root, rels)
        for name in ("files", "read", "bytes_read", "seconds"):
            setattr(stats, name, getattr(stats, name) + getattr(split_stats, name))
        out[split] = {"images": len(rels), "sha256": digest, "unreadable": unreadable}
    return out


def dataset_record(params: Params, recorded: Optional[dict], hasher: FileHasher, stats: HashStats,
                   notes: List[str]) -> dict:
    """The fingerprint of the dataset `dataset` names (see the module's docstring)."""
    name = params.str("dataset")
    options = DATASETS.options(name, params)
    record = {"dataset": name, "options": dataclasses.asdict(options)}
    root = getattr(options, "root", None)
    if root and not Path(root).expanduser().is_dir() and recorded and \
            {key: recorded.get(key) for key in record} == record:
        notes.append(f"the dataset root {root} (`datasets.{name}.root`) is not on this machine: kept the "
                     f"fingerprint recorded in {paths.DATASET_INPUTS}, for the same dataset and options. The "
                     "prepared data pulled from the DVC remote stands; edits to the dataset are seen where it is.")
        return recorded
    inputs = dataset_inputs(name, options)
    if inputs is None:
        record["generated"] = True  # drawn from its options alone: nothing outside the repository
        return record
    record["files"] = {role: _file_hash(hasher, path) for role, path in sorted(inputs.files.items())}
    record["listed_images"] = _listed_images(inputs, hasher, stats)
    return record


def checkpoint_record(params: Params, recorded: Optional[dict], hasher: FileHasher, notes: List[str]) -> dict:
    """`model.pretrained`, with the content hash of the file it names (a tag or null names none)."""
    pretrained = params.sub("model").optional_str("pretrained")
    record = {"pretrained": pretrained}
    if pretrained is not None and os.path.isfile(pretrained):
        record["sha256"] = _file_hash(hasher, Path(pretrained))
    elif recorded and recorded.get("pretrained") == pretrained and "sha256" in recorded:
        notes.append(f"the checkpoint file {pretrained} (`model.pretrained`) is not on this machine: kept the "
                     f"fingerprint recorded in {paths.CHECKPOINT_INPUTS}. The weights and features pulled from the "
                     "DVC remote stand.")
        return recorded
    return record


def run_stage(params: Params) -> Dict[str, dict]:
    """The `inputs` stage: write both fingerprints, each only when it changed."""
    started = time.perf_counter()
    # First on every `dvc repro`: a misspelt or bad option is refused before any image is read.
    check_layout(params)
    check_once(params, stat_cache_path().parent)
    stats, notes = HashStats(), []
    with FileHasher(stat_cache_path()) as hasher:
        records = {
            paths.DATASET_INPUTS: dataset_record(params, _read(paths.DATASET_INPUTS), hasher, stats, notes),
            paths.CHECKPOINT_INPUTS: checkpoint_record(params, _read(paths.CHECKPOINT_INPUTS), hasher, notes),
        }
    changed = [str(path) for path, record in records.items() if _write(path, record)]
    for note in notes:
        print(f"ltpipe note: {note}")
    images = f"{stats.files} listed image(s), {stats.read} read ({stats.bytes_read / 1e6:.1f} MB), " if stats.files \
        else ""
    print(f"inputs: {images}{'changed: ' + ', '.join(changed) if changed else 'unchanged'} "
          f"({time.perf_counter() - started:.2f}s)")
    return {str(path): record for path, record in records.items()}
