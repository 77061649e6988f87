"""evaluate.py from files: the report, the table, and clear errors on bad input."""
import copy
import json

import numpy as np
import pytest

import evaluate
from metrics import InvalidInputError, evaluate_predictions
from metrics.reference import load_coco, pycocotools_eval
from tests.fixtures.workload import make_random_case, make_workload

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*overlapping predicted masks:UserWarning")]


@pytest.fixture(scope="module")
def case():
    gt, results = make_random_case(np.random.default_rng(7), num_images=4, string_ids=True)
    return gt, results


def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


def run(capsys, *argv):
    code = evaluate.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_files_mode_writes_report_equal_to_pycocotools(tmp_path, capsys, case):
    gt, results = case
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "pred.json", results),
                         "--out", str(tmp_path / "report.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    coco_gt = load_coco(gt)
    for iou_type in ("segm", "bbox"):
        ref = pycocotools_eval(coco_gt, results, iou_type, 100, summarize=True)
        np.testing.assert_allclose(report["coco"][iou_type]["stats"], ref.stats, rtol=0, atol=1e-9)
    assert report["max_dets"] == 100
    assert set(report["sartorius"]["per_image"]) == {img["id"] for img in gt["images"]}  # string ids kept
    assert "COCO segm (maxDets 100)" in out and "Sartorius score" in out and "AR100" in out


def test_iou_types_and_max_dets(tmp_path, capsys):
    gt, results = make_workload(num_images=1, height=120, width=150, min_cells=120, max_cells=120, seed=3)
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "p.json", results),
                         "--iou-types", "bbox", "--max-dets", "1000", "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["coco"]) == ["bbox"] and "sartorius" not in report and report["max_dets"] == 1000
    assert report["coco"]["bbox"]["AP"] > 0 and "AR1000" in out


def bad_inputs(gt, results):
    """(name, gt, results, text expected in the message)."""
    out = []
    r = copy.deepcopy(results)
    r[3]["image_id"] = "no-such-image"
    out.append(("unknown image", gt, r, "results[3] (image_id 'no-such-image'): image_id is not in the ground truth"))
    r = copy.deepcopy(results)
    r[2]["category_id"] = 99
    out.append(("unknown category", gt, r, "results[2]"))
    r = copy.deepcopy(results)
    r[1]["score"] = float("nan")
    out.append(("nan score", gt, r, "results[1]"))
    r = copy.deepcopy(results)
    r[4]["segmentation"]["size"] = [10, 10]
    out.append(("rle size", gt, r, "disagrees with the image"))
    r = copy.deepcopy(results)
    r[0]["segmentation"]["counts"] = "abc~~"
    out.append(("rle chars", gt, r, "results[0]"))
    r = copy.deepcopy(results)
    del r[5]["bbox"]
    out.append(("bbox in some", gt, r, "results[5]"))
    g = copy.deepcopy(gt)
    g["annotations"][1]["image_id"] = "nowhere"
    out.append(("gt unknown image", g, results, "ground truth annotations[1]"))
    g = copy.deepcopy(gt)
    g["annotations"][2]["id"] = g["annotations"][0]["id"]
    out.append(("gt duplicate id", g, results, "duplicate annotation id"))
    out.append(("results not a list", gt, {"x": 1}, "results: must be a list"))
    return out


@pytest.mark.parametrize("index", range(9))
def test_bad_input_names_the_entry_and_exits_2(tmp_path, capsys, case, index):
    name, gt, results, expected = bad_inputs(*case)[index]
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "p.json", results))
    assert code == 2, name
    assert err.startswith("error: ") and expected in err, (name, err)
    assert "Traceback" not in err
    with pytest.raises(InvalidInputError, match="results|ground truth"):
        evaluate_predictions(gt, results, 100)


def test_malformed_json_and_missing_file(tmp_path, capsys, case):
    gt, _ = case
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1, "score": 0.5,\n  oops}]')
    code, _, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", str(bad))
    assert code == 2 and "malformed JSON at line 2" in err and "bad.json" in err
    code, _, err = run(capsys, "--gt", str(tmp_path / "missing.json"), "--pred", str(bad))
    assert code == 2 and "not found" in err


def test_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--gt", "a.json"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        evaluate.main([])


def test_search_writes_parameters(tmp_path, capsys):
    gt, results = make_workload(num_images=3, height=120, width=150, min_cells=30, max_cells=80, seed=4)
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "p.json", results),
                         "--iou-types", "segm", "--search", "--search-out", str(tmp_path / "pp.json"))
    assert code == 0, err
    params = json.loads((tmp_path / "pp.json").read_text())
    assert set(params["classes"]) == {"1", "2", "3"}
    assert params["search"]["score"] >= params["search"]["baseline_score"]
    assert "score thr" in out and "min size" in out


def test_checkpoint_mode_calls_the_engine(monkeypatch, tmp_path, capsys):
    import engine.evaluation
    gt, results = make_workload(num_images=1, height=80, width=100, min_cells=10, max_cells=10, seed=1)
    calls = {}

    def fake(checkpoint_path, dataset_name, dataset_options, device, batch_size, max_dets, save_predictions):
        calls.update(locals())
        return evaluate_predictions(gt, results, max_dets or 500), results   # the engine reads the checkpoint's

    monkeypatch.setattr(engine.evaluation, "evaluate_checkpoint", fake)
    code, out, err = run(capsys, "--checkpoint", "ck.pth", "--dataset", "synthetic", "--data-path", "/data",
                         "--dataset-option", "fold=0", "--device", "cpu", "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert calls["dataset_options"] == {"data_path": "/data", "fold": "0"}
    assert calls["max_dets"] is None and calls["device"] == "cpu"   # the checkpoint's own detections per image
    assert json.loads((tmp_path / "r.json").read_text())["max_dets"] == 500


def test_predict_results_named_by_file_stem_match_the_ground_truth(tmp_path, capsys):
    gt, results = make_workload(num_images=2, height=60, width=70, min_cells=3, max_cells=5, seed=2)
    for img in gt["images"]:
        img["file_name"] = f"images/cells_{img['id']}.png"
    named = [{**r, "image_id": f"cells_{r['image_id']}"} for r in results]   # as predict.py writes them
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "p.json", results),
                         "--out", str(tmp_path / "a.json"))
    assert code == 0, err
    code, out, err = run(capsys, "--gt", write(tmp_path, "gt.json", gt), "--pred", write(tmp_path, "n.json", named),
                         "--out", str(tmp_path / "b.json"))
    assert code == 0, err
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["coco"]["segm"]["AP"] == b["coco"]["segm"]["AP"] > 0


def test_scoring_files_imports_no_torch(tmp_path):
    """``--gt``/``--pred`` stays on numpy + pycocotools: a fresh interpreter never loads torch."""
    import os
    import subprocess
    import sys
    gt, results = make_workload(num_images=1, height=40, width=50, min_cells=3, max_cells=3, seed=4)
    script = ("import sys, evaluate; code = evaluate.main(sys.argv[1:]); "
              "print('torch' in sys.modules, code)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script, "--gt", write(tmp_path, "gt.json", gt),
                          "--pred", write(tmp_path, "p.json", results)],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False 0"
