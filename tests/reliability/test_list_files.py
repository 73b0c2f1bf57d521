"""Reliability (issue 15): list files, class-name files and the manifest prepare builds.

Each fault is injected for real (bytes in another encoding, a JPEG given as a list, real
symbolic links, a wrong root under a long list) and goes through the `prepare` stage entry
(`run_stage`, in a scratch directory with its own params.yaml). A refused input must raise an
LtpipeError whose message names the problem and the fix, before any expensive work (the image
scan and the content hashing are patched to raise) and without writing data/prepared. An
accepted variant (a UTF-8 byte-order mark, CRLF line ends, an allowed link) must prepare the
same dataset as the plain files.
"""

import codecs
import json
import re
from pathlib import Path

import pytest
import yaml

from ltpipe.core.config import Params
from ltpipe.core.errors import LtpipeError, user_message
from ltpipe.data import formats, manifest
from ltpipe.datasets import prepare as prepare_stage
from tests.dvc_repo import small_params

# Three classes, each with its own folder of placeholder files (prepare checks existence; only
# the scan decodes, and it is off for accepted variants).
TRAIN = {0: 6, 1: 4, 2: 3}
NAMES = ["red circle", "green square", "blue triangle"]


def expensive(what):
    def started(*args, **kwargs):
        raise AssertionError(f"expensive work started ({what}) before the bad input was refused")

    return started


class Dataset:
    """A scratch workspace: ``root/images/c<k>/<i>.jpg``, list files and a class-name file
    outside the root, and params.yaml naming them as `dataset: custom`."""

    def __init__(self, tmp_path: Path, monkeypatch, multilabel: bool = False):
        self.base, self.monkeypatch, self.multilabel = tmp_path, monkeypatch, multilabel
        self.root = tmp_path / "root"
        self.lists = tmp_path / "lists"
        self.lists.mkdir(parents=True)
        self.lines = {"train": [], "val": [], "test": []}
        for c, n in TRAIN.items():
            for split, count in (("train", n), ("val", 1), ("test", 2)):
                for i in range(count):
                    rel = f"images/c{c}/{split}{i}.jpg"
                    (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (self.root / rel).write_bytes(f"{rel}\n".encode())
                    self.lines[split].append(f"{rel} {c}")
        self.names = list(NAMES)
        self.names_format = "plain"
        self.classnames = self.lists / "classnames.txt"
        self.prepare = {"scan_images": True}
        self.ws = tmp_path / "ws"
        self.ws.mkdir()

    def write(self) -> None:
        for split, lines in self.lines.items():
            path = self.lists / f"{split}.txt"
            if not path.exists():  # a fault may have written its own bytes
                path.write_text("".join(f"{line}\n" for line in lines))
        if not self.classnames.exists():
            self.classnames.write_text("".join(f"{name}\n" for name in self.names))
        params = small_params()
        params["dataset"] = "custom"
        params["datasets"]["custom"].update(
            root=str(self.root), train_list=str(self.lists / "train.txt"), val_list=str(self.lists / "val.txt"),
            test_list=str(self.lists / "test.txt"), classnames=str(self.classnames),
            names_format=self.names_format, multilabel=self.multilabel)
        params["prepare"].update(self.prepare)
        self.monkeypatch.chdir(self.ws)
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def refused(self, problem, fix) -> str:
        """The stage must refuse naming every ``problem`` and ``fix`` item (substring or regex)."""
        self.write()
        self.monkeypatch.setattr(manifest, "scan", expensive("image scan"))
        self.monkeypatch.setattr(manifest, "hash_files", expensive("content hashing"), raising=False)
        with pytest.raises(LtpipeError) as caught:
            prepare_stage.run_stage(Params.load())
        message = user_message(caught.value)
        print(f"\n{type(caught.value).__name__}: {message}")
        for item in [*problem, *fix]:
            found = item.search(message) if isinstance(item, re.Pattern) else item in message
            assert found, f"the message does not name {getattr(item, 'pattern', item)!r}: {message}"
        assert not list(Path().glob("data/prepared/*")), "the stage wrote outputs before failing"
        return message

    def prepared(self):
        self.prepare["scan_images"] = False
        self.write()
        return prepare_stage.run_stage(Params.load())


# ---------------------------------------------------------------- encodings and binary files


def _encoded(ds: Dataset, file: str, encoding: str, text_of=None) -> Path:
    path = ds.classnames if file == "classnames" else ds.lists / f"{file}.txt"
    lines = ds.names if file == "classnames" else ds.lines[file]
    path.write_bytes((text_of or "".join(f"{line}\n" for line in lines)).encode(encoding))
    return path


def latin1_list(ds):
    ds.lines["train"][2] = "images/c0/caf\u00e9.jpg 0"
    (ds.root / "images/c0/caf\u00e9.jpg").write_bytes(b"x")
    path = _encoded(ds, "train", "latin-1")
    offset = sum(len(f"{line}\n") for line in ds.lines["train"][:2]) + len("images/c0/caf")
    return [str(path), f"{path}:3", f"byte {offset}", "0xe9", "not UTF-8"], ["iconv -f latin1 -t utf-8"]


def latin1_classnames(ds):
    ds.names[1] = "cr\u00e8me br\u00fbl\u00e9e"
    path = _encoded(ds, "classnames", "latin-1")
    return [str(path), f"{path}:2", "not UTF-8"], ["iconv -f latin1 -t utf-8"]


def utf16_bom_list(ds):
    path = _encoded(ds, "test", "utf-16")  # with a byte-order mark
    return [str(path), "UTF-16"], ["iconv -f utf-16 -t utf-8"]


def utf16_without_bom_list(ds):
    path = _encoded(ds, "val", "utf-16-le")
    return [str(path), "UTF-16", "without a byte-order mark"], [re.compile(r"iconv -f utf-16(le)? -t utf-8")]


def utf16_bom_classnames(ds):
    path = _encoded(ds, "classnames", "utf-16")
    return [str(path), "UTF-16"], ["iconv -f utf-16 -t utf-8"]


def jpeg_given_as_list(ds):
    from PIL import Image

    path = ds.lists / "train.txt"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format="JPEG")
    return [str(path), "JPEG image"], [re.compile(r"point params.yaml at the list file", re.I)]


def gzip_list(ds):
    import gzip

    path = ds.lists / "train.txt"
    path.write_bytes(gzip.compress("".join(f"{line}\n" for line in ds.lines["train"]).encode()))
    return [str(path), "gzip"], ["gunzip"]


def binary_classnames(ds):
    ds.classnames.write_bytes(bytes(range(256)) * 4)
    return [str(ds.classnames), re.compile(r"binary|not UTF-8")], [re.compile(r"iconv|Point params.yaml")]


def nul_in_utf8_list(ds):
    ds.lines["train"][-1] = "images/c2/train2.jpg\x00 2"
    return [str(ds.lists / "train.txt"), ":13", "NUL"], ["iconv"]


ENCODINGS = {f.__name__: f for f in (
    latin1_list, latin1_classnames, utf16_bom_list, utf16_without_bom_list, utf16_bom_classnames,
    jpeg_given_as_list, gzip_list, binary_classnames, nul_in_utf8_list)}


@pytest.mark.parametrize("fault", list(ENCODINGS), ids=list(ENCODINGS))
def test_file_that_is_not_utf8_text_is_refused(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    problem, fix = ENCODINGS[fault](ds)
    ds.refused(problem, fix)


def _bom(ds, file):
    path = ds.classnames if file == "classnames" else ds.lists / f"{file}.txt"
    lines = ds.names if file == "classnames" else ds.lines[file]
    path.write_bytes(codecs.BOM_UTF8 + "".join(f"{line}\n" for line in lines).encode())


def _line_ends(ds, end):
    for split, lines in ds.lines.items():
        (ds.lists / f"{split}.txt").write_bytes("".join(f"{line}{end}" for line in lines).encode())
    ds.classnames.write_bytes("".join(f"{name}{end}" for name in ds.names).encode())


ACCEPTED = {
    "utf8_bom_list": lambda ds: _bom(ds, "train"),
    "utf8_bom_classnames": lambda ds: _bom(ds, "classnames"),
    "crlf_line_ends": lambda ds: _line_ends(ds, "\r\n"),
    "cr_line_ends": lambda ds: _line_ends(ds, "\r"),
    "utf8_bom_inat_json": lambda ds: ds.classnames.write_bytes(codecs.BOM_UTF8 + json.dumps(
        [{"id": i, "name": name} for i, name in enumerate(ds.names)]).encode()),
}


@pytest.mark.parametrize("variant", list(ACCEPTED), ids=list(ACCEPTED))
def test_utf8_variants_prepare_like_the_plain_files(variant, tmp_path, monkeypatch):
    expected = Dataset(tmp_path / "expected", monkeypatch).prepared()
    ds = Dataset(tmp_path / "variant", monkeypatch)
    if variant.endswith("inat_json"):
        ds.names_format, ds.classnames = "inat_json", ds.lists / "categories.json"
    ACCEPTED[variant](ds)
    prepared = ds.prepared()
    columns = ["split", "path", "labels"]
    assert prepared.manifest[columns].equals(expected.manifest[columns])
    assert prepared.classes["name"].tolist() == NAMES
    assert prepared.classes.drop(columns="id").equals(expected.classes.drop(columns="id"))


# ---------------------------------------------------------------- inat_json of the wrong shape


def _json(ds, text):
    ds.names_format, ds.classnames = "inat_json", ds.lists / "categories.json"
    ds.classnames.write_text(text)
    return ds.classnames


INAT_JSON = {
    "deeply_nested": ("[" * 200_000 + "]" * 200_000, ["nested too deeply"]),
    "object_not_list": ('{"id": 0, "name": "red circle"}', ["not an iNaturalist categories.json", "dict"]),
    "train2018_json": ('{"images": [], "categories": [{"id": 0, "name": "a"}]}', ["`categories`"]),
    "id_is_text": ('[{"id": "0", "name": "a"}, {"id": 1, "name": "b"}, {"id": 2, "name": "c"}]',
                   ["entry 0", 'id "0"', "integers"]),
    "id_is_float": ('[{"id": 0, "name": "a"}, {"id": 1.5, "name": "b"}, {"id": 2, "name": "c"}]',
                    ["entry 1", "id 1.5", "integers"]),
    "id_is_bool": ('[{"id": 0, "name": "a"}, {"id": true, "name": "b"}, {"id": 2, "name": "c"}]',
                   ["entry 1", "id true"]),
    "duplicate_id": ('[{"id": 0, "name": "a"}, {"id": 1, "name": "b"}, {"id": 1, "name": "c"}]',
                     ["entry 2", "repeats id 1", "entry 1", "'b'", "'c'"]),
    "name_missing": ('[{"id": 0, "name": "a"}, {"id": 1}, {"id": 2, "name": "c"}]', ["entry 1", "name null"]),
    "huge_integer_id": ('[{"id": ' + "9" * 5000 + ', "name": "a"}]', ["cannot be read as JSON"]),
    "entry_not_object": ('[{"id": 0, "name": "a"}, [1, "b"], {"id": 2, "name": "c"}]', ["entry 1", "not an object"]),
    "not_json": ("red circle\ngreen square\nblue triangle\n", ["cannot be read as JSON"]),
    "empty_list": ("[]", ["not an iNaturalist categories.json"]),
}


@pytest.mark.parametrize("fault", list(INAT_JSON), ids=list(INAT_JSON))
def test_inat_json_of_the_wrong_shape_is_refused(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    text, problem = INAT_JSON[fault]
    path = _json(ds, text)
    ds.refused([str(path), *problem], [re.compile(r"categories.json|ids must be|needs|`classnames`")])


def test_oversized_class_name_file_is_refused_unread(tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    monkeypatch.setattr(formats, "MAX_CLASSNAMES_BYTES", 4096)
    ds.classnames.write_text("".join(f"{n}\n" for n in NAMES) + "x" * 5000)
    monkeypatch.setattr(formats, "text_lines", expensive("reading the oversized file"))
    ds.refused([str(ds.classnames), "too large"], ["`classnames`"])


# ---------------------------------------------------------------- list lines that parse misleadingly


def _line(split, index, text):
    def edit(ds):
        ds.lines[split][index] = text
    return edit


PARSES = {
    "path_with_space": (_line("train", 1, "images/c0/my photo.jpg 0"), ["train.txt:2", "'images/c0/my photo.jpg'",
                                                                         "contain a space"], ["rename"]),
    "folder_with_space": (_line("test", 0, "images/red circles/a.jpg 0"), ["test.txt:1", "space"], ["rename"]),
    "path_with_tab": (_line("train", 0, "images/c0/a\tb.jpg 0"), ["train.txt:1", "spaces or tabs"], ["rename"]),
    "space_then_numeric_name": (_line("train", 3, "images/c0/img 2 0"), ["train.txt:4", "got 2", "space"],
                                ["`multilabel: true`", "rename"]),
    "label_written_as_decimal": (_line("train", 0, "images/c0/train0.jpg 0.0"), ["train.txt:1", "'0.0'"],
                                 ["write 0"]),
    "label_with_fraction": (_line("val", 0, "images/c0/val0.jpg 1.5"), ["val.txt:1", "'1.5'"],
                            ["class indices 0, 1, 2"]),
    "label_is_class_name": (_line("train", 0, "images/c0/train0.jpg red"), ["train.txt:1", "'red'"],
                            ["converted to indices"]),
    "label_fullwidth_digit": (_line("train", 0, "images/c0/train0.jpg \uff10"), ["train.txt:1", "'\uff10'"],
                              ["integers 0, 1, 2"]),
    "label_negative": (_line("test", 0, "images/c0/test0.jpg -1"), ["test.txt", "label -1", "negative"],
                       ["0..2", "leave it out"]),
    "single_label_line_without_label": (_line("train", 2, "images/c0/train2.jpg"),
                                        ["train.txt:3", "'images/c0/train2.jpg' has no label"],
                                        ["one class index per line", "`multilabel: true`"]),
}


@pytest.mark.parametrize("fault", list(PARSES), ids=list(PARSES))
def test_misleading_list_line_gets_an_accurate_message(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    edit, problem, fix = PARSES[fault]
    edit(ds)
    ds.refused(problem, fix)


# ---------------------------------------------------------------- a wrong root under a long list


SAMPLE = 20  # the paths prepare checks before reading whole lists (manifest.ROOT_SAMPLE)
WRONG_ROOTS = ("root_is_a_sibling_folder", "root_one_level_too_deep", "wrong_root_with_skip")


@pytest.mark.parametrize("fault", WRONG_ROOTS, ids=WRONG_ROOTS)
def test_wrong_root_is_found_from_a_sample_before_whole_lists_are_read(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    # A long list whose first lines exist only under the real root.
    ds.lines["train"] += [f"images/c{i % 3}/extra{i}.jpg {i % 3}" for i in range(3000)]
    real_root = ds.root
    for line in ds.lines["train"][:SAMPLE]:
        (real_root / line.split()[0]).touch()
    if fault == "root_one_level_too_deep":
        ds.root, hint = real_root / "images", str(real_root)
    else:
        ds.root, hint = tmp_path / "elsewhere", None
        (ds.root / "images").mkdir(parents=True)
    if fault == "wrong_root_with_skip":
        ds.prepare["on_bad_image"] = "skip"
    read = []
    original = manifest.read_list

    def observed(*args, **kwargs):
        entries = original(*args, **kwargs)
        read.append(len(entries))
        return entries

    monkeypatch.setattr(manifest, "read_list", observed)
    ds.refused([str(ds.lists / "train.txt"), str(ds.root), "none of the first 20"],
               ["wrong `root`", "`datasets.custom.root`", *([hint] if hint else [])])
    assert max(read) <= SAMPLE, f"whole lists were read before the wrong root was reported: {read}"


# ---------------------------------------------------------------- symbolic links


def link_to_file_outside_root(ds):
    outside = ds.base / "elsewhere" / "stray.jpg"
    outside.parent.mkdir()
    outside.write_bytes(b"stray")
    (ds.root / "images/c1/linked.jpg").symlink_to(outside)
    ds.lines["train"].append("images/c1/linked.jpg 1")
    return (["images/c1/linked.jpg", str(outside), "outside the dataset root"],
            ["`prepare.allow_links_outside_root: true`", "symlink to another disk"])


def image_folder_linked_outside_root(ds):
    disk = ds.base / "other_disk" / "c2"
    disk.parent.mkdir()
    (ds.root / "images/c2").rename(disk)
    (ds.root / "images/c2").symlink_to(disk, target_is_directory=True)
    return (["images/c2/", str(disk), "outside the dataset root"],
            ["`prepare.allow_links_outside_root: true`", "symlink to another disk", "`root` at the real folder"])


def second_path_links_to_train_image(ds):
    (ds.root / "images/c0/alias.jpg").symlink_to(ds.root / "images/c0/train0.jpg")
    ds.lines["train"].append("images/c0/alias.jpg 0")
    return (["train.txt", "images/c0/train0.jpg and images/c0/alias.jpg", str(ds.root / "images/c0/train0.jpg"),
             "twice"], ["Remove one"])


def path_in_test_links_to_train_image(ds):
    (ds.root / "images/c1/also.jpg").symlink_to("train1.jpg")  # relative link
    ds.lines["test"].append("images/c1/also.jpg 1")
    return (["images/c1/train1.jpg (train list)", "images/c1/also.jpg (test list)",
             str(ds.root / "images/c1/train1.jpg"), "both the train and the test list"], ["Remove it from one list"])


def folder_alias_puts_train_image_in_test(ds):
    (ds.root / "alias").symlink_to(ds.root / "images", target_is_directory=True)
    ds.lines["test"].append("alias/c2/train0.jpg 2")
    return (["images/c2/train0.jpg (train list)", "alias/c2/train0.jpg (test list)", "both the train and the test"],
            ["Remove it from one list"])


def dangling_link(ds):
    (ds.root / "images/c0/gone.jpg").symlink_to(ds.root / "images/c0/never-written.jpg")
    ds.lines["train"].append("images/c0/gone.jpg 0")
    return ["1 image(s) listed are missing", "images/c0/gone.jpg"], ["`prepare.on_bad_image: skip`"]


LINKS = {f.__name__: f for f in (
    link_to_file_outside_root, image_folder_linked_outside_root, second_path_links_to_train_image,
    path_in_test_links_to_train_image, folder_alias_puts_train_image_in_test, dangling_link)}


@pytest.mark.parametrize("fault", list(LINKS), ids=list(LINKS))
def test_symbolic_links_are_resolved_for_root_duplicate_and_leakage_checks(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    problem, fix = LINKS[fault](ds)
    ds.refused(problem, fix)


def test_links_outside_root_are_accepted_when_allowed(tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    image_folder_linked_outside_root(ds)
    ds.prepare["allow_links_outside_root"] = True
    prepared = ds.prepared()
    assert "images/c2/train0.jpg" in prepared.split("train")["path"].tolist()
    assert prepared.report["links_outside_root"] == TRAIN[2] + 1 + 2


# ---------------------------------------------------------------- classes the text encoder cannot tell apart


def _names(fmt, lines):
    def edit(ds):
        ds.names_format = fmt
        ds.classnames.write_text("".join(f"{line}\n" for line in lines))
    return edit


SAME_PROMPTS = {
    "plain_name_twice": (_names("plain", ["crane", "heron", "crane"]),
                         ["classes 0 (id 'crane', name 'crane') and 2 (id 'crane', name 'crane')", "'crane'"]),
    "names_differ_in_case_and_underscore": (_names("plain", ["traffic light", "car", "Traffic_Light"]),
                                            ["classes 0", "and 2", "'Traffic_Light'"]),
    "id_name_two_ids_one_name": (_names("id_name", ["n02012849 crane", "n03126707 crane", "n00000003 owl"]),
                                 ["classes 0 (id 'n02012849', name 'crane') and 1 (id 'n03126707'"]),
    "id_name_same_id_twice": (_names("id_name", ["n1 crane", "n1 heron", "n3 owl"]), ["classes 0 and 1", "'n1'"]),
    "voc_joined_name_and_spaced_name": (_names("name_index", ["diningtable 0", "dining table 1", "sofa 2"]),
                                        ["classes 0", "and 1", "'dining table'"]),
}


@pytest.mark.parametrize("fault", list(SAME_PROMPTS), ids=list(SAME_PROMPTS))
def test_classes_with_the_same_prompt_are_refused(fault, tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch)
    edit, problem = SAME_PROMPTS[fault]
    edit(ds)
    ds.refused([str(ds.classnames), *problem], [re.compile(r"Rename one|own id")])


# ---------------------------------------------------------------- a class without training images


def test_multilabel_class_without_training_image_names_the_parameter(tmp_path, monkeypatch):
    ds = Dataset(tmp_path, monkeypatch, multilabel=True)
    ds.lines["train"] = [line for line in ds.lines["train"] if not line.endswith(" 1")]
    ds.refused(["1 class(es)", "1 (green square)", "no training image"],
               ["`prepare.drop_classes_without_training: true`"])
