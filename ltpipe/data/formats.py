"""Readers for the published list and class-name formats.

List files, one image a line:

* single-label (ImageNet-LT, Places-LT, iNat-2018, CIFAR-LT): ``relative/path label``
* multi-label (COCO-LT, VOC-LT): ``relative/path l1 l2 ...``; a path with no label
  is an image negative for every class (48 COCO-LT test images are).

Fields are separated by whitespace, so paths cannot contain spaces or tabs (the
published lists never do). Labels are class indices: ASCII digits, 0 upwards.

Class-name files (``names_format``), each giving ``(id, name)`` pairs in label order:

* ``plain``: one name a line (CIFAR, custom data)
* ``id_name``: ``id name ...`` (ImageNet's ``n01440764 tench``; Places' ``airfield airfield``)
* ``name_index``: ``name index`` (COCO-LT's ``coco_labels.txt``, VOC-LT's ``voc_labels.txt``)
* ``inat_json``: iNat-2018's ``categories.json`` (a list of ``{"id": ..., "name": ...}``)

Every file is read as UTF-8 text; a UTF-8 byte-order mark and CRLF (or CR) line ends are
accepted. Any other encoding, or a binary file, is refused naming the file, the first
offending byte and how to re-encode it.
"""

import codecs
import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ltpipe.core.errors import DataError

Entry = Tuple[str, Tuple[int, ...]]
NAMES_FORMATS = ("plain", "id_name", "name_index", "inat_json")

# CLIP-friendly prompts for names that are not plain words (VOC's joined names).
PROMPT_FIXES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor",
                "aeroplane": "aeroplane", "motorbike": "motorbike"}

# CLIP's curated ImageNet names (open_clip's IMAGENET_CLASSNAMES, from OpenAI's prompt-engineering
# notebook) name two pairs of classes alike: 657/744 "missile" and 836/837 "sunglasses"
# (openai/CLIP#235, #465). Equal prompts give equal text embeddings, so zero-shot can never
# predict the second of each pair; they are kept as published (zero-shot parity with CLIP's
# figures) and warned about (check_distinct_prompts).

# Class-name files are small (iNat-2018's 8,142 classes: 1.4 MB); a larger one is not one.
MAX_CLASSNAMES_BYTES = 64 * 2**20
_LABEL = re.compile(r"-?[0-9]+")  # ASCII only: int() would also take "３", "1_000" or " 3"
_IMAGE_SUFFIX = re.compile(r"\.(jpe?g|png|gif|bmp|tiff?|webp|ppm|pgm)$", re.IGNORECASE)

# What a file that is not UTF-8 text usually is, by its first bytes.
_NOT_TEXT = (
    (codecs.BOM_UTF32_LE, "UTF-32 text (it starts with a UTF-32 byte-order mark)", "utf-32"),
    (codecs.BOM_UTF32_BE, "UTF-32 text (it starts with a UTF-32 byte-order mark)", "utf-32"),
    (codecs.BOM_UTF16_LE, "UTF-16 text (it starts with a UTF-16 byte-order mark)", "utf-16"),
    (codecs.BOM_UTF16_BE, "UTF-16 text (it starts with a UTF-16 byte-order mark)", "utf-16"),
    (b"\xff\xd8\xff", "a JPEG image", None),
    (b"\x89PNG\r\n\x1a\n", "a PNG image", None),
    (b"GIF8", "a GIF image", None),
    (b"II*\x00", "a TIFF image", None),
    (b"MM\x00*", "a TIFF image", None),
    (b"\x1f\x8b", "gzip-compressed (decompress it first: `gunzip`)", None),
    (b"PK\x03\x04", "a zip archive (extract it first: `unzip`)", None),
    (b"\xfd7zXZ\x00", "xz-compressed (decompress it first: `unxz`)", None),
)


def _reencode(path: Path, source_encoding: str) -> str:
    return (f"Re-encode it as UTF-8, e.g. `iconv -f {source_encoding} -t utf-8 {path} > {path.stem}.utf8"
            f"{path.suffix}`, and point params.yaml at the result.")


def _refuse_non_text(path: Path, what: str) -> None:
    """Refuse, by its first bytes, a file that is UTF-16/32 text, an image, an archive or binary."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    for magic, description, encoding in _NOT_TEXT:
        if head.startswith(magic):
            fix = _reencode(path, encoding) if encoding else f"Point params.yaml at the {what} itself."
            raise DataError(f"{path} is {description}, not the UTF-8 text a {what} must be. {fix}")
    if b"\x00" in head:
        # ASCII text in UTF-16 without a byte-order mark has a NUL beside every character.
        odd, even = head[1::2], head[0::2]
        if odd.count(0) > 0.4 * len(odd) or even.count(0) > 0.4 * len(even):
            raise DataError(f"{path} looks like UTF-16 text without a byte-order mark (NUL bytes between the "
                            f"characters), not the UTF-8 text a {what} must be. {_reencode(path, 'utf-16le')}")
        raise _nul_error(path, what, head[:head.index(0)].count(b"\n") + 1, f"byte {head.index(0)}")


def _nul_error(path: Path, what: str, lineno: int, where: str) -> DataError:
    return DataError(f"{path}:{lineno}: {where} holds a NUL byte: the file is binary data or text in an encoding "
                     f"with NUL bytes (UTF-16/32), not the UTF-8 text a {what} must be. For UTF-16 text: "
                     f"{_reencode(path, 'utf-16')} Otherwise point "
                     f"params.yaml at the {what} itself.")


def _decoding_error(path: Path, what: str) -> DataError:
    """Name the first line and byte that are not UTF-8 (a second pass, only on failure)."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = raw[exc.start:exc.start + 1]
                shown = raw.decode("latin-1").strip()[:80]
                return DataError(
                    f"{path}:{lineno}: byte {offset + exc.start} (0x{byte.hex()}) is not UTF-8: the {what} must be "
                    f"UTF-8 text, and this line reads {shown!r} in Latin-1. {_reencode(path, 'latin1')} "
                    "(use the file's real encoding in place of latin1 if it is another one, e.g. cp1252).")
            offset += len(raw)
    return DataError(f"{path} is not UTF-8 text. {_reencode(path, 'latin1')}")


def text_lines(path: Path, what: str) -> Iterator[Tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, read as a stream (a UTF-8 byte-order mark
    and CRLF or CR line ends are accepted); anything else raises a :class:`DataError`."""
    path = Path(path)
    _refuse_non_text(path, what)
    try:
        with open(path, encoding="utf-8-sig", newline=None) as fh:
            for lineno, line in enumerate(fh, 1):
                if "\x00" in line:
                    raise _nul_error(path, what, lineno, "the line")
                yield lineno, line
    except UnicodeDecodeError:
        raise _decoding_error(path, what) from None


def read_list(path: Path, multilabel: bool, max_entries: Optional[int] = None) -> List[Entry]:
    """The ``(path, labels)`` entries of a list file; only its first ``max_entries`` when given."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} not found. Check the dataset's list paths in params.yaml.")
    entries: List[Entry] = []
    # One tuple per distinct label text, shared by every line that has it: a 10-million-line
    # list holds 10 million paths, not 10 million label tuples.
    parsed: Dict[str, Tuple[int, ...]] = {}
    for lineno, line in text_lines(path, "list file"):
        parts = line.split()
        if not parts:
            continue
        key = parts[1] if len(parts) == 2 else " ".join(parts[1:])
        labels = parsed.get(key)
        if labels is None:
            labels = parsed[key] = _labels(path, lineno, parts, multilabel)
        entries.append((parts[0], labels))
        if max_entries is not None and len(entries) >= max_entries:
            break
    if not entries:
        raise DataError(f"list file {path} is empty. Every split needs at least one image.")
    return entries


def read_list_paths(path: Path) -> List[str]:
    """The image paths of a list file, as :func:`read_list` reads them, without parsing the labels
    (the `inputs` stage's fingerprint: the list's own bytes cover the labels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"list file {path} not found. Check the dataset's list paths in params.yaml.")
    return [line.split(None, 1)[0] for _, line in text_lines(path, "list file") if line.strip()]


def _labels(path: Path, lineno: int, parts: List[str], multilabel: bool) -> Tuple[int, ...]:
    rel, tokens = parts[0], parts[1:]
    where = f"{path}:{lineno}:"
    layout = "Each line reads `relative/path label [label ...]`."
    bad = [i for i, token in enumerate(tokens) if not _LABEL.fullmatch(token)]
    if bad:
        last_bad = bad[-1]
        looks_like_path = any("/" in tokens[i] or "\\" in tokens[i] or _IMAGE_SUFFIX.search(tokens[i]) for i in bad)
        if looks_like_path or len(tokens) > last_bad + 1:
            path_guess = " ".join(parts[:last_bad + 2])
            raise DataError(
                f"{where} the path seems to contain a space: {path_guess!r}. Paths with spaces or tabs are not "
                "supported by the list format, whose fields are separated by whitespace (the published lists "
                "never contain one): rename the file or folder (e.g. spaces to `_`) and write the list again.")
        token = tokens[bad[0]]
        try:
            number = float(token) if token.isascii() else None  # float() too would take "３"
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            hint = f"label {token!r} is a number written as a decimal: write {int(number)}."
        elif number is not None:
            hint = f"label {token!r} is not a whole number: labels are class indices 0, 1, 2, ..."
        else:
            hint = (f"label {token!r} is not a class index: labels are integers 0, 1, 2, ... in the order of the "
                    "class-name file; a list that names its classes must be converted to indices.")
        raise DataError(f"{where} labels must be integers; {hint} {layout}")
    labels = tuple(int(token) for token in tokens)
    if not multilabel and len(labels) == 0:
        raise DataError(f"{where} {rel!r} has no label: a single-label list needs one class index per line. "
                        f"{layout} If images may have no label, the dataset is multi-label: set its "
                        "`multilabel: true`.")
    if not multilabel and len(labels) != 1:
        raise DataError(
            f"{where} a single-label list needs exactly one label per line, got {len(labels)} "
            f"({' '.join(tokens)}). If the dataset is multi-label, set its `multilabel: true`; if the path "
            f"contains a space ({' '.join(parts[:2])!r}?), rename it: paths with spaces are not supported.")
    return labels


def _read_text(path: Path, what: str) -> str:
    size = path.stat().st_size
    if size > MAX_CLASSNAMES_BYTES:
        raise DataError(f"{path} is {size:,} bytes: too large for a {what} (at most {MAX_CLASSNAMES_BYTES:,}; "
                        "iNat-2018's 8,142 classes take 1.4 MB). Check the dataset's `classnames` in params.yaml.")
    return "".join(line for _, line in text_lines(path, what))


def read_classnames(path: Path, names_format: str = "plain") -> List[Tuple[str, str]]:
    """``(id, name)`` of every class, in label order."""
    path = Path(path)
    if names_format not in NAMES_FORMATS:
        raise DataError(f"unknown class-name format {names_format!r}; valid: {', '.join(NAMES_FORMATS)}.")
    if not path.is_file():
        raise DataError(f"class-name file {path} not found. Check the dataset's `classnames` in params.yaml.")
    text = _read_text(path, "class-name file")
    if names_format == "inat_json":
        return _read_inat(path, text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"class-name file {path} is empty.")
    if names_format == "plain":
        return [(line, line) for line in lines]
    pairs = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected `{'id name' if names_format == 'id_name' else 'name index'}`,"
                            f" got {line!r}. Is `names_format: {names_format}` right for this file?")
        if names_format == "id_name":
            pairs.append((parts[0], " ".join(parts[1:])))
        else:
            name, index = " ".join(parts[:-1]), parts[-1]
            if index != str(lineno - 1):
                raise DataError(f"{path}:{lineno}: class {name!r} has index {index}, but its line gives "
                                f"index {lineno - 1}. Classes must be listed in index order.")
            pairs.append((name, name))
    if names_format == "id_name":
        first: Dict[str, int] = {}
        for index, (class_id, _) in enumerate(pairs):
            if class_id in first:
                raise DataError(f"{path}: classes {first[class_id]} and {index} have the same id {class_id!r}. "
                                "Every class needs its own id: remove or correct one of the lines.")
            first[class_id] = index
    return pairs


def _read_inat(path: Path, text: str) -> List[Tuple[str, str]]:
    shape = "an iNaturalist categories.json (a list of objects with an integer `id` and a text `name`)"
    try:
        categories = json.loads(text)
    except RecursionError:
        raise DataError(f"{path} is not {shape}: its JSON is nested too deeply to be one.") from None
    except ValueError as exc:
        raise DataError(f"{path} is not {shape}: it cannot be read as JSON ({exc}).") from None
    if isinstance(categories, dict) and isinstance(categories.get("categories"), list):
        raise DataError(f"{path} is not {shape} but an object holding one under `categories` (iNat's "
                        "train2018.json is). Point `classnames` at the categories.json of the dataset's lists.")
    if not isinstance(categories, list) or not categories:
        raise DataError(f"{path} is not {shape}: it holds {type(categories).__name__} "
                        f"{json.dumps(categories)[:60]}.")
    by_id: Dict[int, Tuple[int, str]] = {}
    for position, category in enumerate(categories):
        where = f"{path}: entry {position}"
        if not isinstance(category, dict):
            raise DataError(f"{where} is {json.dumps(category)[:60]}, not an object with `id` and `name`: "
                            f"the file is not {shape}.")
        class_id, name = category.get("id"), category.get("name")
        if type(class_id) is not int:  # noqa: E721 - bool is an int subclass, and true is no id
            raise DataError(f"{where} has id {json.dumps(class_id)[:40]}: ids must be integers 0..N-1.")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where} (id {class_id}) has name {json.dumps(name)[:40]}: every class needs a "
                            "non-empty text `name`.")
        if class_id in by_id:
            raise DataError(f"{where} repeats id {class_id} of entry {by_id[class_id][0]} "
                            f"({by_id[class_id][1]!r} and {name!r}). Every class needs its own id.")
        by_id[class_id] = (position, name)
    if sorted(by_id) != list(range(len(by_id))):
        outside = sorted(set(by_id) - set(range(len(by_id))))
        raise DataError(f"{path}: category ids must be 0..{len(by_id) - 1} without gaps; "
                        f"{len(outside)} are not (first: {outside[0]}).")
    return [(str(i), by_id[i][1]) for i in range(len(by_id))]


def prompt_name(name: str) -> str:
    """A name CLIP reads well: ``traffic_light`` -> ``traffic light``, VOC's ``diningtable`` -> ``dining table``."""
    name = name.strip()
    if name in PROMPT_FIXES:
        return PROMPT_FIXES[name]
    return name.replace("_", " ").replace("/", " ").strip()


def curated_prompts(ids: List[str], names: List[str]) -> List[str]:
    """CLIP's curated ImageNet class names when the classes are ImageNet-1k's (by WordNet id order)."""
    if is_imagenet_1k(ids):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return [prompt_name(n) for n in names]


def is_imagenet_1k(ids: List[str]) -> bool:
    return len(ids) == 1000 and all(i.startswith("n") and i[1:].isdigit() for i in ids) and ids == sorted(ids)


def same_prompt_key(prompt: str) -> str:
    """What a CLIP text encoder sees of a prompt: its tokenizer lower-cases and collapses whitespace."""
    return " ".join(prompt.lower().split())


def check_distinct_prompts(path: Path, ids: List[str], names: List[str], prompts: List[str]) -> List[Dict]:
    """Refuse two classes whose prompts read alike: their text embeddings would be equal, and
    zero-shot could never predict one of them.

    CLIP's own curated ImageNet names repeat two ("missile": 657 and 744; "sunglasses": 836 and
    837; openai/CLIP#235). They are kept as they are, so zero-shot reproduces CLIP's protocol and
    published figures, and returned, for the stage to warn about; any other repeat is refused."""
    first: Dict[str, int] = {}
    repeats: List[Dict] = []
    for index, prompt in enumerate(prompts):
        key = same_prompt_key(prompt)
        if key in first:
            other = first[key]
            if is_imagenet_1k(ids):
                repeats.append({"prompt": prompt, "classes": [other, index], "ids": [ids[other], ids[index]]})
                continue
            raise DataError(
                f"{path}: classes {other} (id {ids[other]!r}, name {names[other]!r}) and {index} (id {ids[index]!r}, "
                f"name {names[index]!r}) have the same prompt {prompt!r}: the text encoder would embed them "
                "identically and zero-shot could never predict one of them. Rename one of them in the class-name "
                "file (e.g. add what tells them apart).")
        first[key] = index
    return repeats
