"""resclip-eval: mmseg's IoU metric, the eight dataset layouts, and the command end to end.

Datasets are written here in mmseg's layouts from the repository's photos; their label maps are
built from what the bundle predicts on that photo (perfect regions, ignored stripes and a
known wrong rectangle), so the expected metrics follow from the construction and are computed
independently with a confusion matrix.
"""

import functools
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import FIXTURES, TINY, case_by_name
from resclip_deploy.cli import eval_main
from resclip_deploy.datasets import LAYOUTS, list_samples, read_label_map
from resclip_deploy.errors import UserError
from resclip_deploy.io import read_image
from resclip_deploy.metrics import IoUAccumulator, areas, reduce_zero_label, summarize

PHOTOS = [FIXTURES / "images" / "chelsea.png", FIXTURES / "images" / "astronaut.png"]

# mmseg's layouts, written out independently of resclip_deploy.datasets: image path, label
# path (both under the root, {id} = the sample id), split file, stored label = f(class).
LAYOUT = {
    "voc20": ("JPEGImages/{id}.jpg", "SegmentationClass/{id}.png",
              "ImageSets/Segmentation/val.txt"),
    "voc21": ("JPEGImages/{id}.jpg", "SegmentationClass/{id}.png",
              "ImageSets/Segmentation/val.txt"),
    "context59": ("JPEGImages/{id}.jpg", "SegmentationClassContext/{id}.png",
                  "ImageSets/SegmentationContext/val.txt"),
    "context60": ("JPEGImages/{id}.jpg", "SegmentationClassContext/{id}.png",
                  "ImageSets/SegmentationContext/val.txt"),
    "coco_object": ("images/val2017/{id}.jpg", "annotations/val2017/{id}_instanceTrainIds.png",
                    None),
    "coco_stuff164k": ("images/val2017/{id}.jpg", "annotations/val2017/{id}_labelTrainIds.png",
                       None),
    "city_scapes": ("leftImg8bit/val/{id}_leftImg8bit.png",
                    "gtFine/val/{id}_gtFine_labelTrainIds.png", None),
    "ade20k": ("images/validation/{id}.jpg", "annotations/validation/{id}.png", None),
}
REDUCED = {"voc20", "context59", "ade20k"}      # stored label = class + 1, 0 = ignored
PALETTE = {"voc20", "voc21"}                    # VOC's SegmentationClass PNGs are palette PNGs
NUM_CLASSES = {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "coco_object": 81,
               "coco_stuff164k": 171, "city_scapes": 19, "ade20k": 150}
IDS = {"city_scapes": ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"],
       "voc20": ["2007_000033", "2007_000042"]}


def sample_ids(name):
    return IDS.get(name, ["000000000139", "000000000285"])


def voc_palette():
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def write_label(path, stored, palette):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.fromarray(stored.astype(np.uint8))          # mode L
    if palette:
        img.putpalette(voc_palette().ravel().tolist())      # -> mode P, same indices
    img.save(path)


def write_image(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def stored_from_classes(name, classes):
    """Classes (255 = ignore) -> the values the dataset's label files hold."""
    if name in REDUCED:
        return np.where(classes == 255, 0, classes + 1)     # 0 is what reduce_zero drops
    return classes


def write_dataset(name, root, items, split_extra=()):
    """items: {id: (rgb or None = already written, classes with 255 = ignore, or None = no
    label file)}; ``split_extra`` ids are listed in the split file (if any) without files."""
    image_t, label_t, split = LAYOUT[name]
    for i, (rgb, classes) in items.items():
        if rgb is not None:
            write_image(root / image_t.format(id=i), rgb)
        if classes is not None:
            write_label(root / label_t.format(id=i), stored_from_classes(name, classes),
                        name in PALETTE)
    if split:
        os.makedirs(root / os.path.dirname(split), exist_ok=True)
        (root / split).write_text("".join(f"{i}\n" for i in [*items, *split_extra]))


def confusion_metrics(preds, gts, num_classes):
    """Independent: one (C+1, C+1) confusion matrix over the non-ignored pixels (row = truth,
    column = prediction, C = anything outside the classes)."""
    conf = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for p, g in zip(preds, gts):
        keep = g != 255
        np.add.at(conf, (np.minimum(g[keep], num_classes), np.minimum(p[keep], num_classes)), 1)
    inter = np.diag(conf)[:num_classes]
    label_area = conf[:num_classes].sum(1)
    pred_area = conf[:, :num_classes].sum(0)
    union = label_area + pred_area - inter
    iou = [inter[c] / union[c] if union[c] else None for c in range(num_classes)]
    acc = [inter[c] / label_area[c] if label_area[c] else None for c in range(num_classes)]
    defined = [x for x in iou if x is not None]
    return {"aAcc": 100 * inter.sum() / label_area.sum(),
            "mIoU": 100 * sum(defined) / len(defined),
            "mAcc": 100 * np.mean([x for x in acc if x is not None]),
            "IoU": [None if x is None else 100 * x for x in iou]}


def assert_same_metrics(ours, ref):
    for k in ("aAcc", "mIoU", "mAcc"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-12), k
    got = [c["IoU"] for c in ours["per_class"]]
    assert [x is None for x in got] == [x is None for x in ref["IoU"]]
    assert [x for x in got if x is not None] == pytest.approx(
        [x for x in ref["IoU"] if x is not None], rel=1e-12)


# ---- the metric -----------------------------------------------------------------------------

def test_metric_by_hand():
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 7]])
    gt = np.array([[0, 1, 1, 255], [2, 2, 0, 1]])
    acc = IoUAccumulator(3)
    acc.add(pred, gt)
    s = acc.summary(["a", "b", "c"])
    # kept: 7 pixels. class 0: I=1, P=2, L=2 -> 1/3; class 1: I=1, P=1, L=3 -> 1/3;
    # class 2: I=2, P=3, L=2 -> 2/3. Prediction 7 is in no class (mmseg's histc range).
    assert [c["IoU"] for c in s["per_class"]] == pytest.approx([100 / 3, 100 / 3, 200 / 3])
    assert s["mIoU"] == pytest.approx(400 / 9)
    assert s["aAcc"] == pytest.approx(400 / 7)
    assert s["mAcc"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 1) / 3)
    assert [c["pixels"] for c in s["per_class"]] == [2, 3, 2]


def test_class_absent_from_labels_and_predictions_is_left_out_of_the_mean():
    s = summarize(areas(np.array([[0, 1]]), np.array([[0, 1]]), 4), list("abcd"))
    assert s["mIoU"] == 100.0 and s["per_class"][2]["IoU"] is None
    # predicted but never labelled: IoU 0, counted in the mean
    s = summarize(areas(np.array([[0, 3]]), np.array([[0, 1]]), 4), list("abcd"))
    assert s["per_class"][3]["IoU"] == 0.0 and s["mIoU"] == pytest.approx(100 / 3)


def test_metric_equals_an_independent_confusion_matrix():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 14, (30, 40)) for _ in range(5)]
    gts = [np.where(rng.random((30, 40)) < 0.1, 255, rng.integers(0, 13, (30, 40)))
           for _ in range(5)]
    acc = IoUAccumulator(12)                     # 12, 13 in labels / predictions: no class
    for p, g in zip(preds, gts):
        acc.add(p, g)
    assert_same_metrics(acc.summary([str(i) for i in range(12)]),
                        confusion_metrics(preds, gts, 12))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_reduce_zero_label_is_mmsegs(dtype):
    label = np.array([[0, 1, 2], [150, 254, 255]], dtype=dtype)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 253, 255]])


def test_16_bit_label_maps_read_as_class_indices(tmp_path):
    stored = np.array([[0, 1, 300], [255, 7, 65535]], dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "l16.png"), stored)
    label = read_label_map(str(tmp_path / "l16.png"))
    np.testing.assert_array_equal(label, stored)
    # class 300 of a 150-class dataset is in no class; 255 is ignored
    s = summarize(areas(np.array([[5, 0, 0], [1, 7, 1]]), reduce_zero_label(label), 150),
                  [str(i) for i in range(150)])
    assert s["labelled_pixels"] == 2 and s["aAcc"] == 50.0


# ---- label files ----------------------------------------------------------------------------

def test_palette_and_grayscale_label_maps_read_as_class_indices(tmp_path):
    rng = np.random.default_rng(1)
    stored = rng.choice([0, 1, 5, 20, 255], size=(23, 31)).astype(np.uint8)
    write_label(tmp_path / "p.png", stored, palette=True)
    write_label(tmp_path / "g.png", stored, palette=False)
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_label_map(str(tmp_path / "p.png")),
                                  np.array(Image.open(tmp_path / "p.png")))
    np.testing.assert_array_equal(read_label_map(str(tmp_path / "g.png")), stored)


def test_unusable_label_maps_are_named(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for f, words in [("rgb.png", "expected class indices"), ("bad.png", "not a readable image"),
                     ("none.png", "cannot read")]:
        with pytest.raises(UserError, match=words) as e:
            read_label_map(str(tmp_path / f))
        assert f in str(e.value)


# ---- layouts --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_layout_lists_mmsegs_samples(name, tmp_path):
    root = tmp_path / name
    rgb = np.zeros((8, 10, 3), np.uint8)
    classes = np.zeros((8, 10), np.int64)
    ids = sample_ids(name)
    # the second image has no label map; with a split file, a third id is listed but absent
    write_dataset(name, root, {ids[1]: (rgb, classes), ids[0]: (rgb, None)},
                  split_extra=["not_in_folder"])
    samples = list_samples(LAYOUTS[name], str(root))
    image_t, label_t, split = LAYOUT[name]
    # a split file's order, or every image of the folder sorted by path
    assert [s.id for s in samples] == ([ids[1], ids[0], "not_in_folder"] if split
                                       else sorted(ids))
    by_id = {s.id: s for s in samples}
    assert by_id[ids[1]].label == str(root / label_t.format(id=ids[1]))
    assert by_id[ids[1]].image == str(root / image_t.format(id=ids[1]))
    assert by_id[ids[0]].label is None
    assert LAYOUTS[name].num_classes == NUM_CLASSES[name]
    assert LAYOUTS[name].reduce_zero_label == (name in REDUCED)
    assert len(list_samples(LAYOUTS[name], str(root), limit=1)) == 1


@pytest.mark.parametrize("name", ["voc20", "ade20k", "city_scapes"])
def test_broken_layout_names_the_missing_folder_and_the_preparation(name, tmp_path):
    root = tmp_path / "data"
    write_dataset(name, root, {sample_ids(name)[0]: (np.zeros((8, 8, 3), np.uint8),
                                                     np.zeros((8, 8), np.int64))})
    label_dir = str(root / LAYOUT[name][1].split("{id}")[0].rstrip("/"))
    os.rename(label_dir, label_dir + "_moved")
    result = CliRunner().invoke(eval_main, ["--bundle", str(tmp_path), "--dataset", name,
                                            "--root", str(root)])
    assert result.exit_code == 2
    assert "missing" in result.output and "Preparation" in result.output
    assert os.path.basename(label_dir) in result.output
    result = CliRunner().invoke(eval_main, ["--bundle", str(tmp_path), "--dataset", name,
                                            "--root", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output


# ---- the command end to end -----------------------------------------------------------------

# Datasets with a parity case of their preset use its bundle (exported once per session); the
# others a tiny random open_clip ViT exported with their preset.
CASE_OF = {"voc20": "voc20_astronaut", "ade20k": "ade20k_chelsea",
           "context60": "context60_astronaut", "voc21": "voc21_chelsea_sclip",
           "context59": "context59_chelsea_clearclip"}


@pytest.fixture(scope="module")
def eval_bundle(bundle_for, tiny_files, tmp_path_factory):
    made = {}

    def get(name):
        if name in CASE_OF:
            return bundle_for(case_by_name(CASE_OF[name]))
        if name not in made:
            from resclip_deploy.export.bundle_export import export_bundle
            from resclip_deploy.export.clip_loader import load_clip
            from resclip_deploy.params import preset_params
            from resclip_deploy.vocab import preset_vocabulary
            made[name] = tmp_path_factory.mktemp("eval") / name
            export_bundle(load_clip(TINY, str(tiny_files[1]["pt"])), preset_vocabulary(name),
                          preset_params(name), str(made[name]))
        return made[name]
    return get


@functools.lru_cache(maxsize=None)
def cpu_segmenter(bundle):
    from resclip_deploy.runtime.segmenter import Segmenter
    return Segmenter.from_bundle(bundle, device="cpu")


def predict(bundle, path):
    return cpu_segmenter(str(bundle)).segment(read_image(str(path)), with_probs=False).labels


def constructed_truth(pred, num_classes, wrong_box):
    """Ground truth from a prediction: equal, except an ignored stripe and (when wrong_box) a
    rectangle of another class."""
    gt = pred.astype(np.int64).copy()
    gt[:, :7] = 255
    if wrong_box:
        h, w = gt.shape
        box = gt[h // 4:h // 2, w // 3:2 * w // 3]
        box[box != 255] = (box[box != 255] + 3) % num_classes
    return gt


def build_eval_dataset(name, root, bundle):
    """Two photos in the dataset's layout; returns (preds, truths) in class space."""
    ids = sample_ids(name)
    preds, gts = [], []
    for k, (i, photo) in enumerate(zip(ids, PHOTOS)):
        path = root / LAYOUT[name][0].format(id=i)
        write_image(path, read_image(str(photo)))
        pred = predict(bundle, path)             # on what the decoder gives back (JPEG)
        preds.append(pred)
        gts.append(constructed_truth(pred, NUM_CLASSES[name], wrong_box=k == 1))
    write_dataset(name, root, {i: (None, gt) for i, gt in zip(ids, gts)})
    return preds, gts


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_eval_reports_the_constructed_metrics(name, eval_bundle, tmp_path):
    bundle = eval_bundle(name)
    root = tmp_path / "data"
    preds, gts = build_eval_dataset(name, root, bundle)
    out, saved = tmp_path / "report.json", tmp_path / "predictions"
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", name,
                                            "--root", str(root), "--device", "cpu",
                                            "-o", str(out), "--save-predictions", str(saved)])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    ours = rep["results"][0]
    assert rep["images_evaluated"] == 2 and ours["mIoU"] < 100
    assert_same_metrics(ours, confusion_metrics(preds, gts, NUM_CLASSES[name]))
    assert f"mIoU {ours['mIoU']:.2f}" in result.output
    for i, pred, gt, entry in zip(sample_ids(name), preds, gts, rep["images"]):
        keep = gt != 255
        assert entry["pixel_accuracy"] == [pytest.approx(100 * np.mean(pred[keep] == gt[keep]),
                                                         abs=1e-4)]
        stem = i.replace("/", "__")
        np.testing.assert_array_equal(cv2.imread(str(saved / f"{stem}.png"),
                                                 cv2.IMREAD_UNCHANGED), pred)
        assert (saved / f"{stem}_overlay.jpg").is_file()


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_a_prediction_equal_to_the_truth_scores_100(name, eval_bundle, tmp_path):
    """Catches a wrong label mapping: ADE20K's, VOC20's and Context59's shift, VOC's palette."""
    bundle = eval_bundle(name)
    root = tmp_path / "data"
    i = sample_ids(name)[0]
    path = root / LAYOUT[name][0].format(id=i)
    write_image(path, read_image(str(PHOTOS[0])))
    gt = constructed_truth(predict(bundle, path), NUM_CLASSES[name], wrong_box=False)
    write_dataset(name, root, {i: (None, gt)})
    out = tmp_path / "report.json"
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", name,
                                            "--root", str(root), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())["results"][0]
    assert rep["mIoU"] == 100.0 and rep["aAcc"] == 100.0
    present = set(np.unique(gt[gt != 255]))
    assert {i for i, c in enumerate(rep["per_class"]) if c["IoU"] is not None} == present


def test_missing_label_is_reported_and_the_exit_code_says_so(bundle_for, tmp_path):
    bundle = bundle_for(case_by_name("ade20k_chelsea"))
    root = tmp_path / "data"
    preds, gts = build_eval_dataset("ade20k", root, bundle)
    gone = root / LAYOUT["ade20k"][1].format(id=sample_ids("ade20k")[1])
    os.remove(gone)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", "ade20k",
                                            "--root", str(root), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert "no label map" in result.output and "000000000285.jpg" in result.output
    rep = json.loads(out.read_text())
    assert rep["images_evaluated"] == 1 and len(rep["missing_labels"]) == 1
    assert rep["results"][0]["mIoU"] == pytest.approx(
        confusion_metrics(preds[:1], gts[:1], 150)["mIoU"], rel=1e-12)


def test_wrong_class_count_is_refused(bundle_for, tmp_path):
    bundle = bundle_for(case_by_name("voc20_astronaut"))
    root = tmp_path / "data"
    write_dataset("ade20k", root, {"a": (np.zeros((32, 32, 3), np.uint8),
                                         np.zeros((32, 32), np.int64))})
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", "ade20k",
                                            "--root", str(root)])
    assert result.exit_code == 2
    assert "20 classes" in result.output and "--preset ade20k" in result.output


def test_compare_two_bundles_on_the_same_images(bundle_for, tmp_path):
    full = bundle_for(case_by_name("ade20k_chelsea"))
    base = bundle_for(case_by_name("ade20k_chelsea_base"))
    root = tmp_path / "data"
    preds, gts = build_eval_dataset("ade20k", root, full)
    other = [predict(base, root / LAYOUT["ade20k"][0].format(id=i))
             for i in sample_ids("ade20k")]
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, ["--bundle", str(full), "--compare", str(base),
                                            "--dataset", "ade20k", "--root", str(root),
                                            "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.read_text())
    first, second = rep["results"]
    assert first["mIoU"] == pytest.approx(confusion_metrics(preds, gts, 150)["mIoU"])
    assert second["mIoU"] == pytest.approx(confusion_metrics(other, gts, 150)["mIoU"])
    agree = sum(int((a == b).sum()) for a, b in zip(preds, other)) / sum(a.size for a in preds)
    assert 0 < agree < 1 and rep["pixel_agreement"] == pytest.approx(agree)
    assert "pixel agreement of 1 and 2" in result.output and f"2: {base}" in result.output


def test_eval_never_imports_torch(bundle_for, tmp_path):
    bundle = bundle_for(case_by_name("voc20_astronaut"))
    root = tmp_path / "data"
    build_eval_dataset("voc20", root, bundle)
    code = ("import sys\n"
            "from resclip_deploy.cli import eval_main\n"
            f"eval_main(['--bundle', {str(bundle)!r}, '--dataset', 'voc20', '--root', "
            f"{str(root)!r}, '--device', 'cpu', '-q'], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "mIoU" in result.stdout


def test_ctrl_c_reports_the_images_done(bundle_for, tmp_path, monkeypatch):
    from resclip_deploy.runtime.segmenter import Segmenter
    bundle = bundle_for(case_by_name("ade20k_chelsea"))
    root = tmp_path / "data"
    preds, gts = build_eval_dataset("ade20k", root, bundle)
    calls = []
    segment = Segmenter.segment

    def interrupt_second(self, rgb, with_probs=True):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return segment(self, rgb, with_probs)

    monkeypatch.setattr(Segmenter, "segment", interrupt_second)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", "ade20k",
                                            "--root", str(root), "-o", str(out), "-q"])
    assert result.exit_code == 130
    assert "interrupted after 1 of 2 images" in result.output
    rep = json.loads(out.read_text())
    assert rep["interrupted"] and rep["images_evaluated"] == 1
    assert rep["results"][0]["mIoU"] == pytest.approx(
        confusion_metrics(preds[:1], gts[:1], 150)["mIoU"], rel=1e-12)


def test_root_one_level_too_high_is_pointed_out(tmp_path):
    rgb, classes = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int64)
    write_dataset("voc20", tmp_path / "VOCdevkit" / "VOC2012", {"2007_000033": (rgb, classes)})
    result = CliRunner().invoke(eval_main, ["--bundle", str(tmp_path), "--dataset", "voc20",
                                            "--root", str(tmp_path / "VOCdevkit")])
    assert result.exit_code == 2
    assert f"use --root {tmp_path / 'VOCdevkit' / 'VOC2012'}" in result.output


def test_labels_never_converted_name_the_preparation_step(tmp_path):
    """Cityscapes as downloaded: gtFine has *_labelIds.png, not mmseg's *_labelTrainIds.png."""
    root = tmp_path / "cityscapes"
    ids = sample_ids("city_scapes")
    write_dataset("city_scapes", root, {i: (np.zeros((8, 8, 3), np.uint8), None) for i in ids})
    for i in ids:
        write_label(root / f"gtFine/val/{i}_gtFine_labelIds.png", np.zeros((8, 8)), False)
    result = CliRunner().invoke(eval_main, ["--bundle", str(tmp_path), "--dataset",
                                            "city_scapes", "--root", str(root)])
    assert result.exit_code == 2
    assert "none of the 2 images has a label map" in result.output
    assert "tools/dataset_converters/cityscapes.py" in result.output


def test_unreadable_image_and_mismatched_label_are_reported_by_name(bundle_for, tmp_path):
    bundle = bundle_for(case_by_name("ade20k_chelsea"))
    root = tmp_path / "data"
    preds, gts = build_eval_dataset("ade20k", root, bundle)
    (root / "images/validation/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    write_label(root / "annotations/validation/broken.png", np.ones((8, 8)), False)
    write_image(root / "images/validation/small.jpg", np.zeros((40, 60, 3), np.uint8))
    write_label(root / "annotations/validation/small.png", np.ones((41, 60)), False)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(eval_main, ["--bundle", str(bundle), "--dataset", "ade20k",
                                            "--root", str(root), "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert "broken.jpg" in result.output and "small.png is 60x41, its image 60x40" in \
        result.output
    rep = json.loads(out.read_text())
    assert rep["images_evaluated"] == 2 and len(rep["failed"]) == 2
    assert_same_metrics(rep["results"][0], confusion_metrics(preds, gts, 150))


def test_run_evaluation_as_a_library_call(eval_bundle, tmp_path):
    from resclip_deploy.evaluate import run_evaluation
    bundle = eval_bundle("coco_object")
    root = tmp_path / "data"
    preds, gts = build_eval_dataset("coco_object", root, bundle)
    seen = []
    rep, ev = run_evaluation([str(bundle)], "coco_object", str(root), device="cpu",
                             json_path=str(tmp_path / "r.json"),
                             on_image=lambda sample, ev: seen.append(sample.id))
    assert seen == sample_ids("coco_object") and ev.samples == 2 and not ev.interrupted
    assert_same_metrics(rep["results"][0], confusion_metrics(preds, gts, 81))
    assert json.loads((tmp_path / "r.json").read_text())["results"] == rep["results"]
