"""Issue 24: a template is followed by column name for every task; a header the model cannot
fill is refused naming its columns (or, for an AU it has no output for, reported); every row has
the header's field count. Pure writer tests: fixed predictions, no model."""

from __future__ import annotations

import numpy as np
import pytest

from affpipe.labels import AU_NAMES, EXPR_CLASSES
from affpipe.outdir import claim
from affpipe.runs.submission import PREDICT_OWNER, index_predictions, write_submission

N = 4
VA = np.array([[0.1, -0.7], [0.2, -0.6], [0.3, -0.5], [0.4, -0.4]], np.float32)  # valence, arousal
PROB = np.full((N, 8), 0.01, np.float32)
PROB[:, EXPR_CLASSES.index("Other")] = 0.9  # Other most likely, then Surprise
PROB[:, EXPR_CLASSES.index("Surprise")] = 0.5
AU = np.zeros((N, 12), np.int8)
AU[:, AU_NAMES.index("AU12")] = 1


@pytest.fixture
def preds():
    pred = {"row_id": np.arange(N), "va": VA, "expr": PROB.argmax(1), "expr_prob": PROB, "au": AU}
    return index_predictions(pred, ("va", "expr", "au"), np.array(["v1"] * N, object), np.arange(1, N + 1),
                             np.arange(N), np.ones(N, bool))


def _write(preds, tmp_path, name, header, fmt="abaw-single"):
    template = tmp_path / name
    template.write_text(header + "\n" + "".join(f"v1/{f:05d}.jpg,\n" for f in range(1, N + 1)))
    with claim(tmp_path / "o", PREDICT_OWNER, {"t": name}, overwrite=True) as out:
        write_submission(preds, out, fmt, templates=(template,))
    target = {"mtl": "MTL.txt"}.get(fmt) or next(p.name for p in (tmp_path / "o").glob("*.txt"))
    return (tmp_path / "o" / target).read_text().splitlines()


def test_va_header_is_followed_by_name_not_position(preds, tmp_path):
    rows = _write(preds, tmp_path, "CVPR_6th_ABAW_VA_test_set_sample.txt", "image_location,Arousal,Valence")
    assert rows[1] == "v1/00001.jpg,-0.700000,0.100000"  # was: valence under Arousal


@pytest.mark.parametrize("header, bad", [("image_location,valence,arousal,extra", "extra"),
                                         ("image_location,valence,arusal", "arusal")])
def test_va_header_with_a_column_the_model_cannot_fill_is_refused_by_name(preds, tmp_path, header, bad):
    with pytest.raises(ValueError, match=rf"VA_test_set_sample\.txt: .*header column\(s\) \['{bad}'\] are not VA outputs"):
        _write(preds, tmp_path, "CVPR_6th_ABAW_VA_test_set_sample.txt", header)


def test_va_header_with_one_column_has_one_field(preds, tmp_path):
    rows = _write(preds, tmp_path, "CVPR_6th_ABAW_VA_test_set_sample.txt", "image_location,valence")
    assert all(len(r.split(",")) == 2 for r in rows) and rows[1] == "v1/00001.jpg,0.100000"


def test_expr_header_with_an_unknown_class_is_refused_not_read_as_8_classes(preds, tmp_path):
    header = "image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Contempt"  # 7 names, one unknown
    with pytest.raises(ValueError, match=r"header column\(s\) \['Contempt'\] are not EXPR outputs"):
        _write(preds, tmp_path, "CVPR_6th_ABAW_Expr_test_set_sample.txt", header)


def test_expr_header_in_another_order_gets_positions_in_that_header(preds, tmp_path):
    header = "image_location,Surprise,Neutral,Anger,Disgust,Fear,Happiness,Sadness"  # no Other: Surprise wins
    rows = _write(preds, tmp_path, "CVPR_6th_ABAW_Expr_test_set_sample.txt", header)
    assert rows[1] == "v1/00001.jpg,0"


def test_au_header_by_name_with_extra_and_missing_columns_keeps_the_field_count(preds, tmp_path):
    header = "image_location,AU12,AU20,AU1"  # AU20: no model output (reported); the other 10 AUs absent
    rows = _write(preds, tmp_path, "CVPR_6th_ABAW_AU_test_set_sample.txt", header)
    assert rows[1] == "v1/00001.jpg,1,0,0" and all(len(r.split(",")) == 4 for r in rows)


def test_au_header_naming_no_au_is_refused(preds, tmp_path):
    with pytest.raises(ValueError, match=r"\['smile', 'frown'\] are not AU outputs"):
        _write(preds, tmp_path, "CVPR_6th_ABAW_AU_test_set_sample.txt", "image_location,smile,frown")


def test_mtl_header_is_followed_by_name(preds, tmp_path):
    rows = _write(preds, tmp_path, "MTL_Challenge_test_set_release.txt", "image,arousal,valence,expression,aus", "mtl")
    fields = rows[1].split(",")
    assert fields[:4] == ["v1/00001.jpg", "-0.700000", "0.100000", str(EXPR_CLASSES.index("Other"))]
    assert len(fields) == 4 + 12 and fields[4 + AU_NAMES.index("AU12")] == "1"


def test_mtl_header_with_an_unknown_column_is_refused(preds, tmp_path):
    with pytest.raises(ValueError, match=r"\['dominance'\] are not MTL outputs"):
        _write(preds, tmp_path, "MTL_Challenge_test_set_release.txt", "image,valence,arousal,dominance,expression,aus",
               "mtl")
