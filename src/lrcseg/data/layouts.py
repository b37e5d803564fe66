"""Dataset layouts users already have: find the cases, their labels and label names.

Accepted (``load_dataset`` picks by what it finds):
- ``nnunet``: an nnU-Net v2 raw folder: ``dataset.json`` (``labels`` name -> id,
  ``channel_names``, ``file_ending``), ``imagesTr/<case>_0000<ending>``, ``labelsTr/<case><ending>``,
  optional ``imagesTs``/``labelsTs``. Only channel ``_0000`` (CT) is used.
- ``datalist``: an MSD-style JSON ``{"training": [{"image": ..., "label": ...}], "test": [...]}``
  with paths relative to the JSON file (also a folder whose ``dataset.json`` has "training").
- ``folder``: any folder, searched recursively for NIfTI files and DICOM series folders
  (a folder holding ``.dcm`` files or files with the DICM magic); unlabelled.
- ``single``: one NIfTI file or one DICOM series folder.

``<root>/splits.json`` (``{"train": [ids], "val": [ids], ...}``), if present, becomes
``Dataset.splits``; a case may be listed in one split only. Which cases each stage uses is
decided in :mod:`lrcseg.data.splits`; label maps and the checks of label values are in
:mod:`lrcseg.data.labels`.

Refused (DataError): a folder with ``imagesTr/`` or ``labelsTr/`` but no ``dataset.json`` (it
would be read as a plain folder, label maps as images), a case in two splits, and two files
for one case, named both (never deduplicated, never one picked): ``X_0000.nii`` beside
``X_0000.nii.gz`` (images or labels), names that differ in letter case only, a NIfTI file and a
DICOM folder of one name, one case id in imagesTr and imagesTs (or in a datalist's "training"
and "test"), a datalist image or label file listed for two cases. Warned about
(``DataWarning``, naming the files): in an nnU-Net folder, images whose ending differs from
``file_ending`` (e.g. ``X_0000.nii`` alone), NIfTI files not named ``<case>_<NNNN><ending>``,
and channel files (``_0001``...) not declared in ``channel_names``, all ignored; in a plain
folder, DICOM folders without CT images (an RTSTRUCT or MR series stored beside the CT
series), skipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lrcseg.data.readers import dicom_modality, is_dicom_file, is_nifti, list_dicom_files
from lrcseg.errors import DataError, warn_data


@dataclass
class Case:
    """One volume: ``image`` is a NIfTI file or a DICOM series folder; ``label`` NIfTI or None."""

    id: str
    image: Path
    label: Path | None = None


@dataclass
class Dataset:
    """Cases of a dataset; ``labels`` maps name -> id with "background": 0 when known."""

    root: Path
    layout: str
    cases: list[Case]
    test_cases: list[Case] = field(default_factory=list)
    labels: dict[str, int] | None = None
    splits: dict[str, list[str]] | None = None

    @property
    def all_cases(self) -> list[Case]:
        return [*self.cases, *self.test_cases]

    def case(self, case_id: str) -> Case:
        for c in self.all_cases:
            if c.id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in {self.root}")


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Recognise the layout at ``path`` and list its cases (no pixel data is read).

    Raises DataError naming the file for a missing path, unreadable/invalid JSON, missing image
    or label files, or a folder without any image.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "dataset path not found")
    if path.is_file():
        if path.suffix.lower() == ".json":
            data = read_json(path)
            if isinstance(data, dict) and "training" in data:
                return _finish(_load_datalist(path, data), path.parent)
            if path.name == "dataset.json":
                return _finish(_load_nnunet(path.parent), path.parent)
            raise DataError(path, "JSON file is neither an nnU-Net dataset.json nor a datalist "
                                  "with a 'training' list")
        if is_nifti(path):
            return Dataset(path.parent, "single", [Case(_strip_nifti(path.name), path)])
        raise DataError(path, "not a dataset: expected a folder, a datalist JSON, a NIfTI file "
                              "or a DICOM series folder")
    dataset_json = path / "dataset.json"
    if dataset_json.is_file():
        data = read_json(dataset_json)
        if isinstance(data, dict) and "training" in data:
            return _finish(_load_datalist(dataset_json, data), path)
        return _finish(_load_nnunet(path), path)
    nnunet_dirs = [d for d in ("imagesTr", "labelsTr", "imagesTs") if (path / d).is_dir()]
    if nnunet_dirs:
        raise DataError(dataset_json, f"not found: {path} has {', '.join(nnunet_dirs)} (an nnU-Net "
                                      "raw dataset) but no dataset.json; add it (labels, "
                                      "channel_names, file_ending)")
    if list_dicom_files(path) and not any(p.is_dir() for p in path.iterdir()):
        return Dataset(path, "single", [Case(path.name, path)])
    return _finish(_load_folder(path), path)


# --------------------------------------------------------------------------- layouts


def _load_nnunet(root: Path) -> Dataset:
    meta_path = root / "dataset.json"
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(meta_path, "dataset.json has no 'labels' (name -> id) entry")
    labels = _parse_labels(meta["labels"], meta_path)
    ending = str(meta.get("file_ending", ".nii.gz"))
    if not is_nifti("x" + ending):
        raise DataError(meta_path, f"file_ending {ending!r} is not supported: use .nii.gz or .nii")
    channels = meta.get("channel_names", {"0": "CT"})
    if not isinstance(channels, dict) or "0" not in {str(k) for k in channels}:
        raise DataError(meta_path, "channel_names must map '0' to the CT channel")
    declared = {str(k).lstrip("0") or "0" for k in channels}
    train = _nnunet_split(root, "imagesTr", "labelsTr", ending, declared)
    test = _nnunet_split(root, "imagesTs", "labelsTs", ending, declared)
    if not train and not test:
        raise DataError(root, f"no images (*_0000{ending}) in imagesTr or imagesTs")
    _refuse_ambiguous(root, [(c.id, c.image) for c in [*train, *test]])
    return Dataset(root, "nnunet", train, test, labels)


# <case>_<channel><ending> of an nnU-Net image file (the ending in any letter case).
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>(?i:\.nii\.gz|\.nii))$")


def _nnunet_split(root: Path, images: str, labels: str, ending: str,
                  channels: set[str]) -> list[Case]:
    """Cases of one nnU-Net split; channels: the declared channel numbers ("0", "1", ...)."""
    image_dir, label_dir = root / images, root / labels
    cases = _nnunet_images(image_dir, label_dir, ending, channels) if image_dir.is_dir() else []
    if label_dir.is_dir():
        _check_nnunet_labels(image_dir, label_dir, ending, {c.id for c in cases})
    return cases


def _nnunet_images(image_dir: Path, label_dir: Path, ending: str, channels: set[str]) -> list[Case]:
    """A case per ``<case>_0000<ending>`` of ``image_dir`` (with its label if ``label_dir``
    exists); other NIfTI files and DICOM folders are warned about and ignored. Two files of one
    case and channel (``X_0000.nii`` and ``X_0000.nii.gz``, names that differ in letter case
    only, a DICOM folder ``X_0000``) are refused, naming both."""
    files = [f for f in sorted(image_dir.iterdir()) if not f.name.startswith(".")]
    dicom_dirs = [f for f in files if not is_nifti(f.name) and f.is_dir() and list_dicom_files(f)]
    _refuse_ambiguous(image_dir, [(_strip_nifti(f.name), f) for f in files
                                  if is_nifti(f.name) or f in dicom_dirs], "image name")
    for d in dicom_dirs:
        warn_data(d, f"ignored: a DICOM folder, but nnU-Net images are NIfTI files "
                     f"(<case>_0000{ending}); convert it or use a plain folder or a datalist")
    cases = []
    for f in files:
        if not is_nifti(f.name):
            continue
        match = _CHANNEL_FILE.match(f.name)
        if match is None:
            warn_data(f, f"ignored: not named <case>_0000{ending} (nnU-Net image naming)")
            continue
        cid, channel = match["case"], match["channel"]
        if match["ending"] != ending:
            _warn_other_ending(f, ending, cid)
        elif channel != "0000":
            if (channel.lstrip("0") or "0") not in channels:
                warn_data(f, f"ignored: channel {int(channel)} is not declared in dataset.json "
                             "channel_names (only channel 0, the CT, is used)", case=cid)
        else:
            label = label_dir / (cid + ending) if label_dir.is_dir() else None
            if label is not None and not label.is_file():
                raise DataError(label, f"missing label file for image {f}")
            cases.append(Case(cid, f, label))
    return cases


def _check_nnunet_labels(image_dir: Path, label_dir: Path, ending: str, known: set[str]) -> None:
    """Every label file of ``label_dir`` needs an image among ``known`` case ids (DataError);
    two label files of one case are refused, label files with another ending are warned
    about and ignored."""
    files = [f for f in sorted(label_dir.iterdir())
             if not f.name.startswith(".") and is_nifti(f.name)]
    _refuse_ambiguous(label_dir, [(_strip_nifti(f.name), f) for f in files])
    for f in files:
        if not f.name.endswith(ending):
            _warn_other_ending(f, ending, _strip_nifti(f.name))
        elif f.name[: -len(ending)] not in known:
            raise DataError(image_dir / (f.name[: -len(ending)] + "_0000" + ending),
                            f"missing image file for label {f}")


def _warn_other_ending(ignored: Path, ending: str, case: str) -> None:
    warn_data(ignored, f"ignored: its ending differs from dataset.json file_ending {ending!r}",
              case=case)


def _load_datalist(json_path: Path, data: dict) -> Dataset:
    base = json_path.parent
    labels = _parse_labels(data["labels"], json_path) if "labels" in data else None
    train = _datalist_cases(json_path, base, data.get("training"), "training")
    test = _datalist_cases(json_path, base, data.get("test", []), "test")
    if not train and not test:
        raise DataError(json_path, "datalist has no 'training' or 'test' entries")
    _refuse_listed_twice(json_path, [*train, *test])
    _refuse_ambiguous(json_path, [(c.id, c.image) for c in [*train, *test]])
    return Dataset(base, "datalist", train, test, labels)


def _datalist_cases(json_path: Path, base: Path, entries, section: str) -> list[Case]:
    if not isinstance(entries, list):
        raise DataError(json_path, f"'{section}' must be a list of entries")
    cases = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(json_path, f"'{section}'[{i}] needs an 'image' path")
        image = (base / entry["image"]).resolve()
        if not image.exists():
            raise DataError(image, f"missing image file (listed in {json_path})")
        label = None
        if entry.get("label"):
            label = (base / entry["label"]).resolve()
            if not label.exists():
                raise DataError(label, f"missing label file (listed in {json_path})")
        cases.append(Case(str(entry.get("id") or _strip_nifti(image.name)), image, label))
    return cases


def _load_folder(root: Path) -> Dataset:
    cases, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        if any(is_dicom_file(here / f) for f in filenames if not f.startswith(".")):
            modalities = _non_ct_modalities(here)
            if modalities:
                skipped.append(f"{here} ({modalities})")
                warn_data(here, f"skipped: a DICOM folder without CT images ({modalities})")
            else:
                cases.append(Case(_relative_id(here, root), here))
        for f in sorted(filenames):
            if is_nifti(f) and not f.startswith("."):
                cases.append(Case(_relative_id(here / _strip_nifti(f), root), here / f))
    if not cases and skipped:
        raise DataError(root, f"no CT images: only DICOM folders without CT, {', '.join(skipped)}")
    if not cases:
        raise DataError(root, "no NIfTI files or DICOM series found (folder empty?)")
    _refuse_ambiguous(root, [(c.id, c.image) for c in cases])
    return Dataset(root, "folder", sorted(cases, key=lambda c: c.id))


# --------------------------------------------------------------------------- helpers


def _refuse_ambiguous(where: Path, entries: list[tuple[str, Path]], what: str = "case id") -> None:
    """DataError naming the files when two ``(case id, file)`` entries share a case id, in any
    letter case (a case-insensitive file system holds only one of them): lrcseg does not pick
    one of two files for a case. ``what`` names the key in the message."""
    by_id: dict[str, list[tuple[str, Path]]] = {}
    for cid, path in entries:
        by_id.setdefault(cid.casefold(), []).append((cid, path))
    clashes = [group for _, group in sorted(by_id.items()) if len(group) > 1]
    if clashes:
        group = clashes[0]
        ids = " / ".join(dict.fromkeys(repr(cid) for cid, _ in group))
        letter_case = " (differing in letter case only)" if len({c for c, _ in group}) > 1 else ""
        count = f"{len(clashes)} ambiguous {what}s, e.g. " if len(clashes) > 1 else f"{what} "
        raise DataError(where, f"{count}{ids}{letter_case} is both "
                               f"{' and '.join(str(p) for _, p in group)}: two files for one "
                               "case; remove or rename one (lrcseg does not pick one)")


def _refuse_listed_twice(json_path: Path, cases: list[Case]) -> None:
    """DataError when a datalist gives one image file to two cases, or one label file to two
    images, naming the file and both cases."""
    for kind in ("image", "label"):
        first: dict[str, Case] = {}
        for case in cases:
            path = getattr(case, kind)
            if path is None:
                continue
            other = first.setdefault(str(path).casefold(), case)
            if other is case:
                continue
            listed = (f"twice (case {case.id!r})" if other.id == case.id
                      else f"for two cases, {other.id!r} and {case.id!r}")
            if kind == "label":
                listed += f", with the images {other.image} and {case.image}"
            raise DataError(json_path, f"{kind} {path} is listed {listed}; each case needs its "
                                       f"own {kind}")


def _non_ct_modalities(folder: Path) -> str | None:
    """"RTSTRUCT" (say) if no DICOM file of ``folder`` is a CT image, else None. Files without
    a Modality count as CT. Reads one header unless the first file is not CT."""
    files = list_dicom_files(folder)
    if not files or dicom_modality(files[0]) in ("CT", ""):
        return None
    modalities = {dicom_modality(f) for f in files}
    return None if modalities & {"CT", ""} else ", ".join(sorted(modalities))


def _finish(ds: Dataset, root: Path) -> Dataset:
    splits_path = root / "splits.json"
    if splits_path.is_file():
        ds.splits = load_splits(splits_path, {c.id for c in ds.all_cases})
    return ds


def read_json(path: Path):
    """The parsed JSON file at ``path``; DataError naming it if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read file ({exc})") from exc


def _parse_labels(raw, path: Path) -> dict[str, int]:
    """nnU-Net v2 ``{name: id}`` or MSD ``{"id": name}`` -> ``{name: id}`` with background 0."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, "'labels' must be a non-empty mapping")
    if all(isinstance(v, str) for v in raw.values()):  # MSD: "0": "background"
        try:
            pairs = {str(name): int(k) for k, name in raw.items()}
        except ValueError as exc:
            raise DataError(path, f"'labels' keys must be integer ids ({exc})") from exc
    else:
        pairs = {}
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(path, f"label {name!r} has id {value!r}: need an integer "
                                      "(region-based labels are not supported)")
            pairs[str(name)] = value
    ids = list(pairs.values())
    if len(set(ids)) != len(ids):
        raise DataError(path, f"'labels' assigns one id to several names: {pairs}")
    if 0 not in ids:
        raise DataError(path, "'labels' must declare background with id 0")
    return pairs


def _strip_nifti(name: str) -> str:
    for ending in (".nii.gz", ".nii"):
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def _relative_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel.replace("/", "__") if rel != "." else root.name


# --------------------------------------------------------------------------- splits


def load_splits(path: str | os.PathLike, known_ids: set[str] | None = None) -> dict[str, list[str]]:
    """Read ``splits.json``; with ``known_ids``, every listed id must be a case of the dataset."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in data.values()):
        raise DataError(path, "splits.json must map split names to lists of case ids")
    if known_ids is not None:
        unknown = sorted({i for v in data.values() for i in v} - known_ids)
        if unknown:
            raise DataError(path, f"unknown case ids {unknown[:5]} in splits")
    first_split: dict[str, str] = {}
    twice = []
    for name, ids in data.items():
        for cid in ids:
            if cid in first_split:
                twice.append(f"{cid!r} in {first_split[cid]!r} and {name!r}")
            else:
                first_split[cid] = name
    if twice:
        raise DataError(path, f"{len(twice)} case(s) listed twice: {', '.join(twice[:5])}; a case "
                              "belongs to one split only (a training case in a test split "
                              "inflates the test metrics)")
    return {str(k): list(v) for k, v in data.items()}
