"""What a checkpoint file is, read from its bytes without unpickling anything, so that each
kind of file open_clip cannot load is named with its own fix (:func:`file_problem`); a
readable state dict that does not fit the architecture is diagnosed by
:func:`ltpipe.features.models.diagnose_checkpoint`."""

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Optional

import torch

TORCH_TENSOR_GLOBALS = {"collections.OrderedDict", "torch.Size", "torch.device", "builtins.set"}
FILE_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip file"), (b"<!doctype html", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"), (b"version https://git-lfs", "a Git LFS pointer"),
    (b"\x93NUMPY", "a numpy .npy file"),
)


def _zip_records(path: Path) -> Optional[list]:
    """The records of a torch zip checkpoint without the archive's top folder; ``None`` if not a zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [name.split("/", 1)[-1] for name in archive.namelist()]
    except (zipfile.BadZipFile, OSError):
        return None


def is_torchscript(path: Path) -> bool:
    """torch.load's own test (``serialization._is_torchscript_zip``): a ``constants.pkl`` record."""
    records = _zip_records(path)
    return records is not None and "constants.pkl" in records


def _is_tensor_machinery(name: str) -> bool:
    dtype = name.startswith("torch.") and isinstance(getattr(torch, name[6:], None), torch.dtype)
    return (name in TORCH_TENSOR_GLOBALS or dtype or name.endswith("Storage")
            or name.startswith(("torch._utils.", "torch.storage.", "torch._tensor.", "builtins.", "__builtin__.")))


def _pickled_classes(pickle_bytes: bytes, pickles: int = 1):
    """``(classes, top_is_dict, key)``: the non-tensor globals the pickle stream names, in order,
    whether its top-level object is a dict, and the last string before the first such global
    (in a dict, the key it is stored under). Read with pickletools: nothing is unpickled."""
    stream = io.BytesIO(pickle_bytes)
    classes, strings, top_is_dict, key = [], [], None, None
    for _ in range(pickles):
        for opcode, arg, _ in pickletools.genops(stream):
            name = None
            if opcode.name == "GLOBAL":
                name = arg.replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            elif isinstance(arg, str):
                strings.append(arg)
            if top_is_dict is None and opcode.name not in ("PROTO", "FRAME"):
                top_is_dict = opcode.name in ("EMPTY_DICT", "DICT")
            if name and not _is_tensor_machinery(name) and name not in classes:
                if not classes and strings:
                    key = strings[-1]
                classes.append(name)
        top_is_dict = None if not classes else top_is_dict  # the legacy format's first pickles are headers
    return classes, bool(top_is_dict), key


def _pickled_objects_message(path: Path, classes: list, top_is_dict: bool, key: Optional[str]) -> str:
    state = path.with_name(f"{path.stem}_state.pt")
    take = "" if not top_is_dict else f"m = m[{key!r}]; " if key else "m = m[KEY]; "
    found = f"a pickled `{classes[0]}` object"
    if top_is_dict:
        found = f"a dict holding {found}" + (f" under {key!r}" if key else "")
    others = f" (also {', '.join(classes[1:4])}{', ...' if len(classes) > 4 else ''})" if len(classes) > 1 else ""
    return (
        f"checkpoint {path} (`model.pretrained`) is {found}{others}, saved with `torch.save(model)`, not a state "
        "dict; ltpipe never unpickles objects, since unpickling can run code from the file. Convert it once, "
        f"where you trust the file: `python -c \"import torch; m = torch.load('{path}', weights_only=False); "
        f"{take}torch.save(m.state_dict(), '{state}')\"`, then set `model.pretrained: {state}`."
    )


def file_problem(path: Path) -> Optional[str]:
    """One line naming what ``path`` is and how to fix it, when its bytes say why open_clip cannot
    load it; ``None`` when it may be a state dict (for another architecture, or damaged)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    what = None
    if head.startswith(b"PK\x03\x04"):
        records = _zip_records(path)
        if records is None:
            what = (f"is an incomplete or damaged zip archive ({size} bytes, no readable zip directory: cut off "
                    "while copying or downloading?). Copy or download it again")
        elif "data.pkl" in records and "constants.pkl" not in records:
            with zipfile.ZipFile(path) as archive:
                pickle_name = next(n for n in archive.namelist() if n.split("/", 1)[-1] == "data.pkl")
                classes, top_is_dict, key = _pickled_classes(archive.read(pickle_name))
            if classes:
                return _pickled_objects_message(path, classes, top_is_dict, key)
    elif head[:1] == b"\x80":  # a pickle: torch's old (before 1.6) non-zip format
        try:
            classes, top_is_dict, key = _pickled_classes(path.read_bytes(), pickles=4)
        except Exception:  # noqa: BLE001 - a cut-off or damaged pickle stream
            classes, top_is_dict, key = [], False, None
        if classes:
            return _pickled_objects_message(path, classes, top_is_dict, key)
    elif len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        if path.suffix != ".safetensors":
            what = ("is a safetensors file, which open_clip reads only when the name ends in `.safetensors`. "
                    f"Rename it (e.g. {path.with_suffix('.safetensors')}) and point `model.pretrained` there")
    else:
        kind = next((name for magic, name in FILE_SIGNATURES if head.lower().startswith(magic)), None)
        what = (f"is not a model checkpoint: it is {kind}" if kind else
                f"is not a model checkpoint torch or safetensors can read (it starts with {head[:8]!r})")
        what += ". Point `model.pretrained` at the weights file (a state dict, .safetensors or TorchScript archive)"
    return None if what is None else f"checkpoint {path} (`model.pretrained`) {what}."
