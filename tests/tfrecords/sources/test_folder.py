"""Listing of image folders: layouts, ignored files, split assignment and input errors."""

import hashlib

import pytest

from tfrecords.sources import folder


def _touch(root, relative_path: str, content: bytes = b"x") -> None:
    path = root / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _list(input_dir, **overrides):
    settings = {"validation_fraction": 0.2, "test_fraction": 0.1, "seed": 42}
    settings.update(overrides)
    return folder.list_images(input_dir=str(input_dir), **settings)


def test_class_folders_recursive_and_ignores_hidden_files(tmp_path):
    for relative_path in [
        "dogs/1.jpg",
        "dogs/nested/deeper/2.png",
        "cats/1.jpg",
        "cats/no_extension",
        "LICENSE.txt",  # top-level plain file: ignored
        "cats/.DS_Store",  # hidden file: ignored
        "cats/.ipynb_checkpoints/3.jpg",  # hidden folder: ignored
        "dogs/__MACOSX/4.jpg",  # macOS zip debris: ignored
        "__MACOSX/dogs/5.jpg",
        ".hidden_class/6.jpg",
    ]:
        _touch(tmp_path, relative_path)

    listing = _list(tmp_path)

    assert listing.layout == folder.LAYOUT_CLASS_FOLDERS
    assert listing.classes == ["cats", "dogs"]
    assert [source_file.relative_path for source_file in listing.files] == [
        "cats/1.jpg",
        "cats/no_extension",
        "dogs/1.jpg",
        "dogs/nested/deeper/2.png",
    ]
    assert [source_file.label for source_file in listing.files] == [0, 0, 1, 1]
    assert listing.files[3].path == f"{tmp_path}/dogs/nested/deeper/2.png"
    assert listing.files[3].class_name == "dogs"


def test_pre_split_layout_keeps_splits_and_unions_classes(tmp_path):
    for relative_path in [
        "train/cats/1.jpg",
        "train/dogs/1.jpg",
        "train/birds/1.jpg",  # a class found only in train still gets a label
        "val/cats/2.jpg",
        "val/dogs/2.jpg",
        "test/dogs/3.jpg",
        "LICENSE.txt",
    ]:
        _touch(tmp_path, relative_path)

    listing = _list(tmp_path)

    assert listing.layout == folder.LAYOUT_PRE_SPLIT
    assert listing.classes == ["birds", "cats", "dogs"]
    found = {(f.relative_path, f.split, f.class_name, f.label) for f in listing.files}
    assert found == {
        ("train/birds/1.jpg", "train", "birds", 0),
        ("train/cats/1.jpg", "train", "cats", 1),
        ("train/dogs/1.jpg", "train", "dogs", 2),
        ("val/cats/2.jpg", "validation", "cats", 1),
        ("val/dogs/2.jpg", "validation", "dogs", 2),
        ("test/dogs/3.jpg", "test", "dogs", 2),
    }


def test_train_folder_alone_is_a_class_not_a_split(tmp_path):
    _touch(tmp_path, "train/1.jpg")
    _touch(tmp_path, "other/1.jpg")
    assert _list(tmp_path).layout == folder.LAYOUT_CLASS_FOLDERS


def test_assign_split_follows_the_documented_hash():
    for index in range(200):
        relative_path = f"cats/{index}.jpg"
        digest = hashlib.sha256(f"7:{relative_path}".encode()).digest()
        fraction = int.from_bytes(digest[:8], "big") / 2**64
        expected = "test" if fraction < 0.1 else "validation" if fraction < 0.3 else "train"
        split = folder.assign_split(
            relative_path=relative_path, seed=7, validation_fraction=0.2, test_fraction=0.1
        )
        assert split == expected


def test_split_fractions_are_roughly_respected_and_depend_on_seed():
    paths = [f"cats/{index}.jpg" for index in range(3000)]

    def splits(seed):
        return [
            folder.assign_split(relative_path=path, seed=seed, validation_fraction=0.2, test_fraction=0.1)
            for path in paths
        ]

    seed_42 = splits(42)
    assert 0.65 < seed_42.count("train") / len(paths) < 0.75
    assert 0.17 < seed_42.count("validation") / len(paths) < 0.23
    assert 0.08 < seed_42.count("test") / len(paths) < 0.12
    assert splits(42) == seed_42
    assert splits(43) != seed_42


def test_zero_fractions_put_everything_in_train(tmp_path):
    for index in range(20):
        _touch(tmp_path, f"cats/{index}.jpg")
        _touch(tmp_path, f"dogs/{index}.jpg")
    listing = _list(tmp_path, validation_fraction=0.0, test_fraction=0.0)
    assert {source_file.split for source_file in listing.files} == {"train"}


def _make_missing(tmp_path):
    return tmp_path / "does_not_exist"


def _make_empty(tmp_path):
    return tmp_path


def _make_only_top_level_files(tmp_path):
    _touch(tmp_path, "1.jpg")
    return tmp_path


def _make_one_class(tmp_path):
    _touch(tmp_path, "cats/1.jpg")
    return tmp_path


def _make_empty_class_folders(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / ".hidden").mkdir(parents=True)
    _touch(tmp_path, "dogs/.hidden/1.jpg")
    return tmp_path


def _make_both_validation_folders(tmp_path):
    for relative_path in ["train/cats/1.jpg", "validation/cats/1.jpg", "val/cats/1.jpg"]:
        _touch(tmp_path, relative_path)
    return tmp_path


def _make_pre_split_without_classes(tmp_path):
    for relative_path in ["train/1.jpg", "val/cats/1.jpg", "val/dogs/1.jpg"]:
        _touch(tmp_path, relative_path)
    return tmp_path


@pytest.mark.parametrize(
    "make_folder, message",
    [
        (_make_missing, r"--input_dir '.*does_not_exist' does not exist"),
        (_make_empty, r"--input_dir .* has no class subfolders; expected <input_dir>/<class>/<image files>"),
        (_make_only_top_level_files, r"--input_dir .* has no class subfolders"),
        (_make_one_class, r"--input_dir .* has only one class folder \('cats'\)"),
        (_make_empty_class_folders, r"--input_dir .* has class folders but no files in them"),
        (_make_both_validation_folders, r"both 'validation' and 'val' folders"),
        (_make_pre_split_without_classes, r"looks pre-split but 'train/' has no class subfolders"),
    ],
)
def test_folder_errors(tmp_path, make_folder, message):
    with pytest.raises(ValueError, match=message):
        _list(make_folder(tmp_path))


@pytest.mark.parametrize(
    "validation_fraction, test_fraction, message",
    [
        (-0.1, 0.1, r"--validation_fraction=-0.1 is negative"),
        (0.2, -0.5, r"--test_fraction=-0.5 is negative"),
        (0.6, 0.4, r"--validation_fraction=0.6 plus --test_fraction=0.4 is 1, which leaves nothing"),
    ],
)
def test_fraction_errors(tmp_path, validation_fraction, test_fraction, message):
    _touch(tmp_path, "cats/1.jpg")
    _touch(tmp_path, "dogs/1.jpg")
    with pytest.raises(ValueError, match=message):
        _list(tmp_path, validation_fraction=validation_fraction, test_fraction=test_fraction)


def _copy_to_ram(local_root, ram_root: str) -> None:
    import tensorflow as tf

    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            target = f"{ram_root}/{path.relative_to(local_root).as_posix()}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            tf.io.gfile.copy(str(path), target, overwrite=True)


@pytest.mark.parametrize("layout", ["class_folders", "pre_split"])
def test_a_remote_input_lists_its_class_folders_concurrently_and_like_a_local_one(tmp_path, monkeypatch, layout):
    import threading
    import time

    import tensorflow as tf

    classes = [f"class_{index}" for index in range(8)]
    prefixes = [""] if layout == "class_folders" else ["train/", "validation/"]
    for prefix in prefixes:
        for class_name in classes:
            for index in range(3):
                _touch(tmp_path / "local", f"{prefix}{class_name}/sub/{index}.jpg")
            _touch(tmp_path / "local", f"{prefix}{class_name}/.hidden.jpg")
    ram_root = f"ram://listing_{layout}"
    _copy_to_ram(tmp_path / "local", ram_root)

    # gs:// lists in round trips: a slow walk that records how many class folders are listed at once.
    walk, active, most = tf.io.gfile.walk, [0], [0]
    lock = threading.Lock()

    def slow_walk(top, *arguments, **keywords):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        try:
            yield from walk(top, *arguments, **keywords)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(tf.io.gfile, "walk", slow_walk)
    remote = _list(ram_root)
    local = _list(tmp_path / "local")
    assert remote.layout == local.layout == layout and remote.classes == local.classes == classes
    described = lambda listing: [(file.relative_path, file.class_name, file.split) for file in listing.files]
    assert described(remote) == described(local) and len(remote.files) == 3 * len(classes) * len(prefixes)
    assert most[0] > 1  # several class folders were being listed at the same time


def _relative_files(listing) -> list:
    return [(file.relative_path, file.class_name, file.label, file.split) for file in listing.files]


@pytest.mark.parametrize("layout", ["class_folders", "pre_split"])
def test_a_file_list_gives_the_listing_of_the_walk_without_walking(tmp_path, layout):
    prefixes = [""] if layout == "class_folders" else ["train/", "validation/", "test/"]
    names = []
    for prefix in prefixes:
        for class_name in ("cats", "dogs", "owls"):
            for index in range(4):
                names.append(f"{prefix}{class_name}/nested/{index}.jpg")
            names += [f"{prefix}{class_name}/.DS_Store", f"{prefix}{class_name}/__MACOSX/x.jpg"]
    names.append("README.txt")  # a top-level file: ignored by both
    for name in names:
        _touch(tmp_path / "images", name)
    walked = _list(tmp_path / "images")
    # Relative paths, full paths, a duplicate, a blank line and a comment: the same files.
    lines = ["# inventory of 2026-12-01", ""] + [
        str(tmp_path / "images" / name) if index % 2 else name for index, name in enumerate(names)
    ] + [names[0]]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    listed = _list(tmp_path / "images", file_list=str(tmp_path / "list.txt"))
    assert listed.layout == walked.layout == layout and listed.classes == walked.classes == ["cats", "dogs", "owls"]
    assert _relative_files(listed) == _relative_files(walked) and len(listed.files) == 12 * len(prefixes)


def test_a_file_list_of_a_remote_input_is_read_without_a_call_per_object(tmp_path, monkeypatch):
    import tensorflow as tf

    (tmp_path / "list.txt").write_text("gs://bucket/photos/cats/1.jpg\ngs://bucket/photos/dogs/2.jpg\ndogs/3.jpg\n")
    real_exists, asked = tf.io.gfile.exists, []
    monkeypatch.setattr(tf.io.gfile, "isdir", lambda path: path == "gs://bucket/photos")
    monkeypatch.setattr(tf.io.gfile, "exists", lambda path: asked.append(path) or real_exists(path))
    listing = _list("gs://bucket/photos", file_list=str(tmp_path / "list.txt"), validation_fraction=0.0,
                    test_fraction=0.0)
    assert [file.path for file in listing.files] == [
        "gs://bucket/photos/cats/1.jpg", "gs://bucket/photos/dogs/2.jpg", "gs://bucket/photos/dogs/3.jpg"]
    assert asked == [str(tmp_path / "list.txt")]  # the list itself, never an object


def test_a_cloud_storage_inventory_csv_is_a_file_list(tmp_path, monkeypatch):
    import tensorflow as tf

    # An inventory report's columns (bucket, name, size, ...), a quoted name with a comma, another bucket's object.
    (tmp_path / "inventory.csv").write_text(
        "bucket,name,size\n"
        "bucket,photos/cats/1.jpg,10\n"
        'bucket,"photos/dogs/2,3.jpg",11\n'
        "bucket,photos/README.txt,5\n"
    )
    monkeypatch.setattr(tf.io.gfile, "isdir", lambda path: path == "gs://bucket/photos")
    listing = _list("gs://bucket/photos", file_list=str(tmp_path / "inventory.csv"), validation_fraction=0.0,
                    test_fraction=0.0)
    assert [file.path for file in listing.files] == ["gs://bucket/photos/cats/1.jpg", "gs://bucket/photos/dogs/2,3.jpg"]
    (tmp_path / "other.csv").write_text("bucket,name\nother,photos/cats/1.jpg\n")
    with pytest.raises(ValueError, match=r"line 2 path 'gs://other/photos/cats/1.jpg' is not inside --input_dir"):
        _list("gs://bucket/photos", file_list=str(tmp_path / "other.csv"))


@pytest.mark.parametrize("text, message", [
    ("size,md5\n10,abc\n", r"is a CSV whose header 'size,md5' names no path column; expected one of path, name"),
    ("size,path\n10\n", r"line 2 is '10': fewer fields than the header names"),
])
def test_a_csv_file_list_without_its_path_column_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "list.csv").write_text(text)
    with pytest.raises(ValueError, match=message):
        _list(tmp_path / "images", file_list=str(tmp_path / "list.csv"))


def test_a_file_list_skips_links_and_special_files_of_a_local_input(tmp_path):
    import os

    for name in ("cats/1.jpg", "dogs/1.jpg"):
        _touch(tmp_path / "images", name)
    os.symlink(tmp_path / "images" / "dogs" / "1.jpg", tmp_path / "images" / "cats" / "link.jpg")
    os.mkfifo(tmp_path / "images" / "cats" / "fifo.jpg")
    (tmp_path / "list.txt").write_text("cats/1.jpg\ncats/link.jpg\ncats/fifo.jpg\ndogs/1.jpg\n")
    listing = _list(tmp_path / "images", file_list=str(tmp_path / "list.txt"))
    assert [file.relative_path for file in listing.files] == ["cats/1.jpg", "dogs/1.jpg"]
    assert listing.skipped == _list(tmp_path / "images").skipped == [  # in path order, as walking skips them
        {"path": "cats/fifo.jpg", "reason": "not a regular file (a FIFO); never opened"},
        {"path": "cats/link.jpg", "reason": "symbolic link into 'dogs' (dogs/1.jpg); its files are listed there"},
    ]


@pytest.mark.parametrize("lines, message", [
    (["../outside/cats/1.jpg", "dogs/1.jpg"], r"line 1 path '../outside/cats/1.jpg' is not inside --input_dir"),
    (["gs://other/cats/1.jpg", "dogs/1.jpg"], r"line 1 path 'gs://other/cats/1.jpg' is not inside --input_dir"),
    (["/elsewhere/cats/1.jpg"], r"is not inside --input_dir"),
    (["cats/1.jpg", "cats/2.jpg"], r"has only one class folder \('cats'\)"),
    (["# nothing"], r"has no class subfolders"),
    (["train/cats/1.jpg", "val/cats/2.jpg", "validation/dogs/3.jpg"], r"names both 'validation' and 'val' folders"),
])
def test_a_bad_file_list_is_one_clear_error(tmp_path, lines, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        _list(tmp_path / "images", file_list=str(tmp_path / "list.txt"))


def test_a_missing_file_list_or_two_listings_are_refused(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"--file_list '.*missing.txt' does not exist"):
        _list(tmp_path / "images", file_list=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="--labels_csv and --file_list both list the files"):
        _list(tmp_path / "images", file_list="a.txt", labels_csv="b.csv")


# Legal names a text list must carry exactly as walking finds them: a class starting with "#" (not a comment),
# a class named like the input folder (not a prefix to strip), spaces at either end of a name (not stripped),
# Unicode line separators and a carriage return inside a name (a line ends only at "\n"), and a name that is
# not UTF-8 (skipped with the same reason either way).
ODD_NAMES = [
    "col/a.jpg", "col/col/b.jpg", "#tag/a.jpg", "# tag/a.jpg", " lead/a.jpg", "trail /a.jpg",
    "green/#1.jpg", "green/ spaced .jpg", "green/line\u2028sep.jpg", "green/next\u0085line.jpg",
    "green/cr\rmid.jpg", "green/tab\tname.jpg",
]
NOT_UTF8_NAME = b"green/latin\xff.jpg"


def _odd_folder(tmp_path):
    import os

    root = tmp_path / "col"
    for name in ODD_NAMES:
        _touch(root, name)
    with open(os.path.join(os.fsencode(root), NOT_UTF8_NAME), "wb") as odd:
        odd.write(b"x")
    return root


def _list_lines(root, form: str) -> bytes:
    """The walked files of root as a file list's bytes: relative lines, absolute lines, or a CSV (CRLF rows)."""
    import csv
    import io
    import os

    names = [*ODD_NAMES, os.fsdecode(NOT_UTF8_NAME)]
    if form == "csv":
        text = io.StringIO(newline="")
        csv.writer(text).writerows([["name", "size"], *[[name, "1"] for name in names]])
        return text.getvalue().encode("utf-8", "surrogateescape")
    lines = [f"{root}/{name}" if form == "absolute" else name for name in names]
    ending = "\r\n" if form == "relative_crlf" else "\n"
    return ending.join(lines).encode("utf-8", "surrogateescape") + ending.encode()


@pytest.mark.parametrize("form", ["relative", "relative_crlf", "absolute", "csv"])
def test_a_file_list_gives_the_walks_classes_and_files_for_every_legal_name(tmp_path, monkeypatch, form):
    root = _odd_folder(tmp_path)
    monkeypatch.chdir(tmp_path)  # --input_dir=col, relative, as the folder of the same name as a class
    walked = _list("col")
    assert walked.classes == [" lead", "# tag", "#tag", "col", "green", "trail "]
    assert walked.skipped == [{"path": "green/latin\\xff.jpg", "reason": folder.NOT_UTF8_REASON}]
    list_name = "list.csv" if form == "csv" else "list.txt"
    (tmp_path / list_name).write_bytes(_list_lines(root, form))
    listed = _list("col", file_list=str(tmp_path / list_name))
    assert listed.classes == walked.classes
    assert _relative_files(listed) == _relative_files(walked) and len(listed.files) == len(ODD_NAMES)
    assert listed.skipped == walked.skipped


@pytest.mark.parametrize("line, message", [
    ("/elsewhere/col/a.jpg", r"line 2 path '/elsewhere/col/a.jpg' is not inside --input_dir 'col' \(.*/col\)"),
    ("gs://bucket/col/a.jpg", r"line 2 path 'gs://bucket/col/a.jpg' is not inside --input_dir 'col'"),
])
def test_a_full_path_outside_a_relative_input_dir_is_refused_with_its_line(tmp_path, monkeypatch, line, message):
    root = _odd_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text(f"{root}/col/a.jpg\n{line}\n")
    with pytest.raises(ValueError, match=message):
        _list("col", file_list="list.txt")


def test_a_file_list_that_is_a_folder_or_utf16_is_one_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"--file_list '.*images' is a folder; expected a text file of paths"):
        _list(tmp_path / "images", file_list=str(tmp_path / "images"))
    (tmp_path / "list.txt").write_bytes("cats/1.jpg\ndogs/2.jpg\n".encode("utf-16"))
    with pytest.raises(ValueError, match=r"--file_list '.*list.txt' is UTF-16 text; save it as UTF-8"):
        _list(tmp_path / "images", file_list=str(tmp_path / "list.txt"))


def test_a_csv_row_with_an_unclosed_quote_is_refused_with_its_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "list.csv").write_text('name\ncats/1.jpg\n"dogs/line\nbreak.jpg"\n')
    with pytest.raises(ValueError, match=r"line 3 .*not one CSV row"):
        _list(tmp_path / "images", file_list=str(tmp_path / "list.csv"))


def _walk_and_list(root, lines: list, tmp_path) -> tuple:
    (tmp_path / "attack.txt").write_bytes(b"".join(line.encode("utf-8", "surrogateescape") + b"\n" for line in lines))
    return _list(root), _list(root, file_list=str(tmp_path / "attack.txt"))


def _assert_same(walked, listed) -> None:
    assert listed.classes == walked.classes and listed.layout == walked.layout
    assert _relative_files(listed) == _relative_files(walked)
    assert listed.skipped == walked.skipped and listed.label_conflicts == walked.label_conflicts


def test_a_file_list_follows_links_as_the_walk_does(tmp_path):
    """A folder link from one class into another (as `find -L` lists it), and a file link to outside the input:
    the listed files keep the class walking gives them, with the same skipped lines and label conflicts."""
    import os

    root = tmp_path / "images"
    for name in ("roses/1.jpg", "roses/sub/2.jpg", "roses/sub/3.jpg", "daisy/1.jpg"):
        _touch(root, name, content=name.encode())
    _touch(tmp_path, "outside/x.jpg", content=b"outside")
    os.symlink("../roses/sub", root / "daisy" / "more")
    os.symlink(tmp_path / "outside" / "x.jpg", root / "daisy" / "linked.jpg")
    lines = ["daisy/1.jpg", "daisy/linked.jpg", "daisy/more/2.jpg", "daisy/more/3.jpg", "roses/1.jpg",
             "roses/sub/2.jpg", "roses/sub/3.jpg"]
    walked, listed = _walk_and_list(root, lines, tmp_path)
    assert [(path, class_name) for path, class_name, _, _ in _relative_files(walked)] == [
        ("daisy/1.jpg", "daisy"), ("daisy/linked.jpg", "daisy"), ("roses/1.jpg", "roses"),
        ("roses/sub/2.jpg", "roses"), ("roses/sub/3.jpg", "roses")]
    assert listed.classes == walked.classes and _relative_files(listed) == _relative_files(walked)
    # The walk skips the folder link once; the list names its files, so each is skipped, for the same reason.
    assert walked.skipped == [{"path": "daisy/more", "reason": "symbolic link into 'roses' (roses/sub); its files "
                                                               "are listed there"}]
    assert listed.skipped == [
        {"path": f"daisy/more/{index}.jpg", "reason": f"symbolic link into 'roses' (roses/sub/{index}.jpg); its files "
                                                      "are listed there"} for index in (2, 3)]


@pytest.mark.parametrize("loose", ["train/loose.jpg", "test/loose.jpg", "validation/loose.jpg"])
def test_loose_files_of_a_split_folder_are_skipped_with_a_reason_by_walk_and_list(tmp_path, loose):
    root = tmp_path / "images"
    names = ["train/cats/1.jpg", "train/dogs/1.jpg", "validation/cats/2.jpg", "validation/dogs/2.jpg",
             "test/cats/3.jpg", loose]
    for name in names:
        _touch(root, name)
    walked, listed = _walk_and_list(root, names, tmp_path)
    assert walked.skipped == [{"path": loose, "reason": folder.LOOSE_FILE_REASON}]
    _assert_same(walked, listed)


def test_a_listed_split_folder_without_class_folders_is_refused_as_walking_refuses_it(tmp_path):
    root = tmp_path / "images"
    names = ["train/cats/1.jpg", "train/dogs/1.jpg", "val/cats/2.jpg", "test/3.jpg", "test/4.jpg"]
    for name in names:
        _touch(root, name)
    with pytest.raises(ValueError, match=r"looks pre-split but 'test/' has no class subfolders"):
        _list(root)
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    with pytest.raises(ValueError, match=r"looks pre-split but 'test/' has no class subfolders"):
        _list(root, file_list=str(tmp_path / "list.txt"))


def test_names_that_are_not_utf8_anywhere_in_the_folder_are_handled_by_walk_and_list(tmp_path):
    import os

    root = tmp_path / "images"
    for name in ("cats/1.jpg", "dogs/1.jpg"):
        _touch(root, name)
    raw = os.fsencode(root)
    for name in (b"README\xe9.txt", b"cats/sub\xe9/2.jpg"):  # a top-level file (ignored) and a nested folder
        os.makedirs(os.path.dirname(os.path.join(raw, name)), exist_ok=True)
        with open(os.path.join(raw, name), "wb") as odd:
            odd.write(b"x")
    walked, listed = _walk_and_list(root, ["cats/1.jpg", "dogs/1.jpg", "cats/sub\udce9/2.jpg"], tmp_path)
    assert walked.skipped == [{"path": "cats/sub\\xe9/2.jpg", "reason": folder.NOT_UTF8_REASON}]
    _assert_same(walked, listed)
    os.makedirs(os.path.join(raw, b"bird\xe9"))
    with open(os.path.join(raw, b"bird\xe9", b"1.jpg"), "wb") as odd:
        odd.write(b"x")
    with pytest.raises(ValueError, match=r"has a class named 'bird\\\\xe9', not UTF-8 text"):
        _list(root)
    (tmp_path / "list.txt").write_bytes(b"cats/1.jpg\nbird\xe9/1.jpg\n")
    with pytest.raises(ValueError, match=r"has a class named 'bird\\\\xe9', not UTF-8 text .*saved as UTF-8"):
        _list(root, file_list=str(tmp_path / "list.txt"))


@pytest.mark.parametrize("lines, message", [
    (["images/cats/1.jpg", "images/dogs/1.jpg"], r"only one class folder \('images'\), the name of --input_dir: "
                                                  r"list paths relative to --input_dir"),
    (["path,label", "cats/1.jpg,dogs"], r"has a label column; pass it as --labels_csv"),
])
def test_a_file_list_of_another_shape_is_refused_with_what_to_do(tmp_path, lines, message):
    for name in ("cats/1.jpg", "dogs/1.jpg"):
        _touch(tmp_path / "images", name)
    list_name = "list.csv" if "," in lines[0] else "list.txt"
    (tmp_path / list_name).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        _list(tmp_path / "images", file_list=str(tmp_path / list_name))


def test_a_line_naming_the_input_folder_itself_is_ignored(tmp_path):
    for name in ("cats/1.jpg", "dogs/1.jpg"):
        _touch(tmp_path / "images", name)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/images\n{tmp_path}/images/\ncats/1.jpg\ndogs/1.jpg\n")
    assert len(_list(tmp_path / "images", file_list=str(tmp_path / "list.txt")).files) == 2
