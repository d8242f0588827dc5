"""Finding the examples behind a ``DATA`` argument.

``DATA`` is one of:

- a folder of class subfolders;
- a folder with ``train/`` (or ``training/``) and optional ``val/`` and ``test/`` subfolders,
  each of class subfolders;
- a CSV manifest with columns ``path,label`` and optional ``group`` and ``split``;
- ``tfds:NAME[:SPLIT]``, read through tensorflow-datasets.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from jewelclf.errors import JewelclfError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}


def data_key(spec: str) -> str:
    """What identifies a ``DATA`` argument from any working directory: a TFDS spec as it is,
    a path resolved to an absolute one (``run_info.json``'s ``data_path``)."""
    return spec if spec.startswith("tfds:") else str(Path(spec).resolve())


@dataclass(frozen=True)
class Record:
    """One example: where its bytes are, its label, and its split and group if known."""

    path: str
    """Absolute file path, or ``tfds:NAME/SPLIT#INDEX`` for TFDS examples."""
    key: str
    """Stable identity: the path relative to DATA (what the split manifest records)."""
    label: str
    split: str | None = None
    group: str | None = None
    format: str | None = field(default=None, compare=False)
    """The format the data check read from the bytes (``JPEG``, ``PNG``, ...); ``None`` until
    checked. Not part of the record's identity."""


@dataclass
class TfdsInfo:
    name: str
    image_key: str
    label_key: str
    data_dir: str | None = None


@dataclass
class DataSource:
    """What a ``DATA`` argument holds: its records, class names and, for TFDS, how to read it."""

    spec: str
    root: Path | None
    class_names: list[str]
    records: list[Record]
    tfds: TfdsInfo | None = None
    notes: list[str] = field(default_factory=list)
    repeated: list[str] = field(default_factory=list)
    """A CSV's rows that name a file listed before, with the same label: each counted once."""
    conflicts: list[str] = field(default_factory=list)
    """A CSV's files listed under two labels (one line each). Both rows stay records, so that
    ``check`` reports them as conflicting labels; ``fit`` refuses them (:meth:`refuse_conflicts`)."""

    def repeat_warning(self) -> str | None:
        """One line about :attr:`repeated`, or ``None`` when no row repeats another."""
        if not self.repeated:
            return None
        return (f"{len(self.repeated)} row(s) of '{self.spec}' name a file listed before with the "
                f"same label, each counted once (e.g. {self.repeated[0]})")

    def refuse_conflicts(self) -> None:
        """A one-line error when a file is listed under two labels (what ``check`` reports as
        conflicting labels): one image cannot teach two classes."""
        if self.conflicts:
            more = f" (and {len(self.conflicts) - 1} more such file(s))" if len(self.conflicts) > 1 else ""
            raise JewelclfError(f"{self.conflicts[0]}{more}; keep one row per image, with its one label")

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _unreadable_folder(e: OSError) -> None:
    reason = "permission denied" if isinstance(e, PermissionError) else (e.strerror or type(e).__name__)
    raise JewelclfError(f"cannot list folder '{e.filename}' ({reason}); fix its permissions or remove it")


def _holds(real: str, top: str) -> bool:
    """Whether the folder ``real`` is ``top`` or one that holds it (a link back up the tree)."""
    return os.path.commonpath([real, top]) == real


def walk_files(folder: Path) -> list[Path]:
    """All visible files under ``folder`` (sorted), following symlinks but never looping.

    The one folder walker of jewelclf: ``check``, ``fit``, ``evaluate``, ``index`` and
    ``predict`` all list folders with it. A folder reached twice, or a link back to a folder
    that holds ``folder`` (which would pull other classes' images into this one), is not walked
    again. A folder that cannot be listed is a one-line error rather than silently empty.
    """
    out: list[Path] = []
    seen: set[str] = set()
    top = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_unreadable_folder):
        real = os.path.realpath(dirpath)
        if real in seen or (real != top and _holds(real, top)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _visible(f))
    return out


def collect_files(paths: Iterable[str]) -> list[Path]:
    """Files as given, and every visible file under folders (:func:`walk_files`), in argument
    order; a path that does not exist, or nothing found at all, is a one-line error."""
    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            out.extend(walk_files(path))
        elif path.exists():
            out.append(path)
        else:
            raise JewelclfError(f"image path '{p}' does not exist; pass image files or folders of images")
    if not out:
        raise JewelclfError(f"no image files found in {', '.join(map(str, paths))}")
    return out


def _class_dirs(folder: Path, notes: list[str] | None = None) -> list[Path]:
    """The visible subfolders of ``folder``, less links back to ``folder`` or above it (``ln -s
    . a`` would make a class of every image); those are named in ``notes`` when given."""
    top = os.path.realpath(folder)
    try:
        dirs = sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))
    except OSError as e:
        if e.filename is None:
            e.filename = str(folder)
        _unreadable_folder(e)
    kept = []
    for p in dirs:
        if _holds(os.path.realpath(p), top):
            if notes is not None:
                notes.append(f"ignored '{p}': a link back to a folder that holds it, not a class folder")
        else:
            kept.append(p)
    return kept


def _split_dirs(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in _class_dirs(folder):
        split = _SPLIT_ALIASES.get(p.name.lower())
        if split is None:
            continue
        if split in found:
            raise JewelclfError(
                f"'{folder}' has two folders for the {split} split ('{found[split].name}' and "
                f"'{p.name}'); keep one"
            )
        found[split] = p
    return found


def _records_from_class_folders(folder: Path, root: Path, split: str | None,
                                notes: list[str]) -> list[Record]:
    classes = _class_dirs(folder, notes)
    records: list[Record] = []
    for cdir in classes:
        files = walk_files(cdir)
        if not files:
            where = f"the {split} split" if split else f"'{folder}'"
            raise JewelclfError(
                f"class folder '{cdir}' in {where} is empty; add images to it or remove it"
            )
        for f in files:
            records.append(Record(str(f.absolute()), f.relative_to(root).as_posix(), cdir.name, split))
    return records


def from_folder(folder: Path) -> DataSource:
    folder = Path(folder)
    splits = _split_dirs(folder)
    notes: list[str] = []
    if splits:
        if "train" not in splits:
            present = ", ".join(sorted(splits))
            raise JewelclfError(
                f"'{folder}' has {present} but no train/ (or training/) folder; add one, or point "
                f"DATA at a folder of class subfolders"
            )
        records: list[Record] = []
        for split, sdir in splits.items():
            if not _class_dirs(sdir):
                raise JewelclfError(f"split folder '{sdir}' has no class subfolders; add one folder per class")
            records += _records_from_class_folders(sdir, folder, split, notes)
        others = [p.name for p in _class_dirs(folder) if p.name.lower() not in _SPLIT_ALIASES]
        if others:
            notes.append(f"ignored folders beside the split folders: {', '.join(others)}")
        train_classes = {r.label for r in records if r.split == "train"}
        for r in records:
            if r.label not in train_classes:
                raise JewelclfError(
                    f"class '{r.label}' appears in the {r.split} split of '{folder}' but not in "
                    f"train/; add training images for it or remove it"
                )
    else:
        if not _class_dirs(folder):
            raise JewelclfError(
                f"'{folder}' has no class subfolders; put each class's images in a subfolder "
                f"named after the class (e.g. {folder}/rings/*.jpg)"
            )
        records = _records_from_class_folders(folder, folder, None, notes)
    class_names = sorted({r.label for r in records})
    return DataSource(str(folder), folder, class_names, records, notes=notes)


def _printable(text: str) -> str:
    """``text`` on one line: control characters written as escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def manifest_path(root: Path, rel: str, where: str = "CSV manifest") -> tuple[str, str]:
    """``(real path, key)`` of a manifest row's ``rel``, relative to the manifest's folder ``root``.

    The real path has every symlink resolved: it is what is read, and what tells two spellings of
    one file apart from two files. The key is ``rel`` normalised (``./img/../img//a.jpg`` is
    ``img/a.jpg``; an absolute path inside the folder is made relative), or the real path's when
    the spelling's ``..`` would climb out of a symlinked folder. A path that leads outside the
    folder, spelled so or through a link (``etclink/passwd`` with ``etclink -> /etc``), is a
    one-line error that starts with ``where``: a manifest can only name files under its folder.
    """
    root_abs = os.path.abspath(root)
    root_real = os.path.realpath(root)
    lexical = os.path.normpath(os.path.join(root_abs, rel))
    real = os.path.realpath(os.path.join(root_abs, rel))  # '..' after a link: POSIX's meaning
    if os.path.commonpath([root_abs, lexical]) != root_abs or os.path.commonpath([root_real, real]) != root_real:
        if os.path.commonpath([root_abs, lexical]) == root_abs:
            raise JewelclfError(
                f"{where}: path '{rel}' leads through a symlink to '{real}', outside the manifest's "
                f"folder '{root_abs}'; copy the image under that folder instead of linking to it"
            )
        raise JewelclfError(
            f"{where}: path '{rel}' is outside the manifest's folder '{root_abs}'; move the image "
            f"under that folder and give its path relative to it"
        )
    key = os.path.relpath(lexical, root_abs)
    if os.path.realpath(os.path.join(root_abs, key)) != real:
        key = os.path.relpath(real, root_real)
    return real, Path(key).as_posix()


def _csv_records(path: Path, rows: list[tuple[int, dict[str, str]]]
                 ) -> tuple[list[Record], list[str], list[str]]:
    """The records of a CSV manifest's ``(line, row)`` pairs, one per file (by its real path),
    with the rows that repeat a file under its label and the files listed under two labels."""
    records: list[Record] = []
    first: dict[str, tuple[int, str, Record]] = {}  # real path -> its first row: line, spelling, record
    repeated: list[str] = []
    conflicts: list[str] = []
    for i, row in rows:  # i: the line the row ends on
        if any(ord(ch) < 32 for v in row.values() for ch in v):
            raise JewelclfError(
                f"CSV manifest '{path}' line {i}: a field holds a line break, tab or other control "
                f"character; fix the line"
            )
        rel, label = row.get("path", ""), row.get("label", "")
        if not rel or not label:
            raise JewelclfError(f"CSV manifest '{path}' line {i}: empty path or label; fill it or delete the line")
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in _SPLIT_ALIASES:
                raise JewelclfError(
                    f"CSV manifest '{path}' line {i}: unknown split '{split}'; use train, val or test"
                )
            split = _SPLIT_ALIASES[split.lower()]
        real, key = manifest_path(path.parent, rel, f"CSV manifest '{path}' line {i}")
        record = Record(real, key, label, split, row.get("group") or None)
        if real in first:
            line0, rel0, record0 = first[real]
            spelled = "" if rel == rel0 else f" as '{rel}'"
            if record0.label != label:
                conflicts.append(f"CSV manifest '{path}' lists '{record0.key}' under two labels: "
                                 f"'{record0.label}' on line {line0} and '{label}' on line {i}{spelled}")
            elif (record0.split, record0.group) != (split, record.group):
                raise JewelclfError(
                    f"CSV manifest '{path}' line {i}: '{record0.key}'{spelled} is listed again (first "
                    f"on line {line0}) with another split or group; keep one row for it"
                )
            else:
                repeated.append(f"line {i} ('{rel}') repeats line {line0} ('{rel0}')")
                continue
        else:
            first[real] = (i, rel, record)
        records.append(record)
    return records, repeated, conflicts


def from_csv(path: Path) -> DataSource:
    """A CSV manifest's records: each file once, however its rows spell it (:func:`manifest_path`);
    a malformed manifest is a one-line error naming the line."""
    path = Path(path)
    root = path.parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise JewelclfError(
                    f"CSV manifest '{path}' lacks column(s) {', '.join(missing)}; its header must "
                    f"name path,label (and optionally group,split), found: {_printable(','.join(columns)) or 'nothing'}"
                )
            # Fields beyond the header land under the key None (as a list): ignore them.
            rows = [(reader.line_num,
                     {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)})
                    for row in reader]
    except UnicodeDecodeError:
        raise JewelclfError(f"CSV manifest '{path}' is not UTF-8 text; save it as UTF-8") from None
    except csv.Error as e:
        raise JewelclfError(
            f"CSV manifest '{path}' line {reader.line_num} is not valid CSV ({e}); fix that line"
        ) from None
    records, repeated, conflicts = _csv_records(path, rows)
    if not records:
        raise JewelclfError(f"CSV manifest '{path}' has no rows; add one row per image")
    splits_given = {r.split for r in records}
    if None in splits_given and len(splits_given) > 1:
        raise JewelclfError(
            f"CSV manifest '{path}': the split column is filled on some rows but not others; "
            f"fill it on every row or leave it empty"
        )
    if splits_given - {None} and "train" not in splits_given:
        raise JewelclfError(f"CSV manifest '{path}' names no train rows; mark some rows split=train")
    class_names = sorted({r.label for r in records if r.split in (None, "train")})
    for r in records:
        if r.label not in class_names:
            raise JewelclfError(
                f"CSV manifest '{path}': label '{r.label}' appears only outside the train split; "
                f"add training rows for it or remove its rows"
            )
    return DataSource(str(path), root, class_names, records, repeated=repeated, conflicts=conflicts)


def from_tfds(spec: str) -> DataSource:
    """``tfds:NAME[:SPLIT]``: SPLIT (default ``train``) trains; ``validation``/``test`` are used if present."""
    import tensorflow_datasets as tfds

    parts = spec.split(":", 2)
    name = parts[1] if len(parts) > 1 else ""
    if not name:
        raise JewelclfError(f"'{spec}' names no dataset; write tfds:NAME or tfds:NAME:SPLIT")
    train_split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
    except Exception as e:  # unknown name, no network, ...
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise JewelclfError(
            f"could not load TFDS dataset '{name}' ({first}); check the name, or download it on a "
            f"machine with a network and point TFDS_DATA_DIR at it"
        ) from None
    info = builder.info
    features = info.features
    image_key = next((k for k, v in features.items() if isinstance(v, tfds.features.Image)), None)
    label_key = next((k for k, v in features.items() if isinstance(v, tfds.features.ClassLabel)), None)
    if image_key is None or label_key is None:
        raise JewelclfError(
            f"TFDS dataset '{name}' has no image and class-label features; jewelclf needs both"
        )
    class_names = list(features[label_key].names)
    wanted = {"train": train_split}
    for split, candidates in (("val", ("validation", "val")), ("test", ("test",))):
        for c in candidates:
            if c in info.splits and c != train_split:
                wanted[split] = c
                break
    records: list[Record] = []
    for split, tfds_split in wanted.items():
        ds = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                decoders={image_key: tfds.decode.SkipDecoding()})
        labels = ds.map(lambda ex: ex[label_key]).as_numpy_iterator()
        for i, label in enumerate(labels):
            key = f"tfds:{name}/{tfds_split}#{i}"
            records.append(Record(key, key, class_names[int(label)], split))
    return DataSource(spec, None, class_names, records,
                      tfds=TfdsInfo(name, image_key, label_key, str(builder.data_dir)))


def require_data(spec: str) -> None:
    """The cheap checks of a ``DATA`` argument (it exists, and is a folder or a .csv), made
    before a command pays for importing TensorFlow; each failure is a one-line error."""
    if spec.startswith("tfds:"):
        return
    path = Path(spec).expanduser()
    if not path.exists() and path.is_symlink():
        raise JewelclfError(f"data path '{spec}' is a broken symlink or a symlink loop; point it at a folder or a CSV")
    if not path.exists():
        raise JewelclfError(f"data path '{spec}' does not exist; pass a folder of class subfolders or a CSV manifest")
    if not path.is_dir() and path.suffix.lower() != ".csv":
        raise JewelclfError(
            f"data path '{spec}' is a file but not a .csv manifest; pass a folder of class "
            f"subfolders, a CSV with path,label columns, or tfds:NAME"
        )


def load_source(spec: str) -> DataSource:
    """Resolve a ``DATA`` argument; a missing or unusable one is a one-line error."""
    require_data(spec)
    if spec.startswith("tfds:"):
        return from_tfds(spec)
    path = Path(spec).expanduser()
    return from_folder(path) if path.is_dir() else from_csv(path)
