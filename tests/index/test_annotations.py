"""Annotation parsing: headers, invalid markers, malformed lines (file:line), fast == reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affpipe.index.annotations import (
    _scan,
    parse_annotation,
    parse_annotation_bytes,
    parse_header,
    split_lines,
)
from affpipe.index.mtl import parse_mtl
from affpipe.labels import AU_NAMES, EXPR_CLASSES

VA_H = b"valence,arousal\n"
EXPR_H8 = ",".join(EXPR_CLASSES).encode() + b"\n"
EXPR_H7 = ",".join(EXPR_CLASSES[:7]).encode() + b"\n"
AU_H = ",".join(AU_NAMES).encode() + b"\n"


def parse(data: bytes, task: str, **kw):
    return parse_annotation_bytes(data, task, "f.txt", **kw)


def test_va_values_and_invalid_marker():
    p = parse(VA_H + b"0.5,-0.25\n-5,-5\n1,-1\n", "va")
    assert p.n_lines == 3 and p.present.all()
    np.testing.assert_array_equal(p.va[0], np.float32([0.5, -0.25]))
    assert np.isnan(p.va[1]).all()
    np.testing.assert_array_equal(p.va[2], [1, -1])


def test_va_one_marker_discards_both():
    p = parse(VA_H + b"-5,0.3\n", "va")
    assert np.isnan(p.va[0]).all()


def test_header_spaces_case_crlf_bom_trailing_blank():
    data = b"\xef\xbb\xbf Arousal , VALENCE \r\n0.1, 0.2\r\n-0.3 ,0.4\r\n\r\n"
    p = parse(data, "va")
    assert p.n_lines == 2
    # columns mapped by name: file order is arousal, valence
    np.testing.assert_allclose(p.va, np.float32([[0.2, 0.1], [0.4, -0.3]]))


def test_expr_8_and_7_classes_and_marker():
    p8 = parse(EXPR_H8 + b"7\n-1\n0\n", "expr")
    np.testing.assert_array_equal(p8.expr, [7, -1, 0])
    p7 = parse(EXPR_H7 + b"6\n-1\n3\n", "expr")
    np.testing.assert_array_equal(p7.expr, [6, -1, 3])
    with pytest.raises(ValueError, match=r"f\.txt:2: value out of range"):
        parse(EXPR_H7 + b"7\n", "expr")  # no Other in a 7-class file


def test_expr_header_order_maps_by_name():
    header = b"anger,neutral,Disgust,Fear,Happiness,Sadness,Surprise\n"
    p = parse(header + b"0\n1\n", "expr")
    np.testing.assert_array_equal(p.expr, [EXPR_CLASSES.index("Anger"), EXPR_CLASSES.index("Neutral")])


def test_au_8_columns_abaw1_mapped_by_name():
    """Issue 11, failure 2: the real ABAW1 header (with AU20) was refused; now every AU of the 12
    lands in its column, the others are -1 (masked), and AU20 is read, checked and reported."""
    names = ["AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25"]
    p = parse((",".join(names) + "\r\n1,0,1,0,1,0,1,0\r\n-1,-1,-1,-1,-1,-1,-1,-1\r\n\r\n").encode(), "au")
    assert p.header.unused == ("AU20",)
    row = dict(zip(AU_NAMES, p.au[0].tolist(), strict=False))
    assert row == {"AU1": 1, "AU2": 0, "AU4": 1, "AU6": 0, "AU7": -1, "AU10": -1, "AU12": 1,
                   "AU15": 0, "AU23": -1, "AU24": -1, "AU25": 0, "AU26": -1}
    assert (p.au[1] == -1).all()
    names[6] = "AU26"
    p = parse((",".join(names) + "\n1,0,1,0,1,0,1,0\n").encode(), "au")
    assert p.header.unused == () and p.au[0][AU_NAMES.index("AU26")] == 1
    with pytest.raises(ValueError, match=r"f\.txt:2: value out of range"):
        parse(b"AU1,AU20\n1,7\n", "au")  # an unused column is still checked
    with pytest.raises(ValueError, match=r"f\.txt:1: unknown AU header"):
        parse(b"AU20,AU99\n1,0\n", "au")  # no column of the 12: not an AU file
    with pytest.raises(ValueError, match=r"f\.txt:1: unknown AU header"):
        parse(b"AU1,smile\n1,0\n", "au")


def test_au_invalid_row():
    p = parse(AU_H + b"-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1\n" + b"0,1,0,1,0,1,0,1,0,1,0,1\n", "au")
    assert (p.au[0] == -1).all()
    np.testing.assert_array_equal(p.au[1], [0, 1] * 6)


@pytest.mark.parametrize(
    ("task", "data", "message"),
    [
        ("va", VA_H + b"0.1,0.2\n0.1\n", r"f\.txt:3: expected 2 column\(s\), got 1"),
        ("va", VA_H + b"0.1,0.2,0.3\n", r"f\.txt:2: expected 2 column\(s\), got 3"),
        ("va", VA_H + b"0.1,abc\n", r"f\.txt:2: non-numeric value 'abc'"),
        ("va", VA_H + b"0.1,nan\n", r"f\.txt:2: non-numeric value 'nan'"),
        ("va", VA_H + b"0.1,0.2\n1.5,0.2\n", r"f\.txt:3: value out of range"),
        ("va", VA_H + b"-4,0.2\n", r"f\.txt:2: value out of range"),
        ("va", VA_H + b"0.1,0.2\n\n0.1,0.2\n", r"f\.txt:3: expected 2 column\(s\), got 1"),
        ("expr", EXPR_H8 + b"8\n", r"f\.txt:2: value out of range"),
        ("expr", EXPR_H8 + b"1\n2.5\n", r"f\.txt:3: value out of range"),
        ("expr", EXPR_H8 + b"-2\n", r"f\.txt:2: value out of range"),
        ("expr", EXPR_H8 + b"1\n\n2\n", r"f\.txt:3: non-numeric value ''"),
        ("au", AU_H + b"0,1,0,1,0,1,0,1,0,1,0,2\n", r"f\.txt:2: value out of range"),
        ("au", AU_H + b"0,1,0,1,0,1,0,1,0,1,0\n", r"f\.txt:2: expected 12 column\(s\), got 11"),
        ("va", b"valence,arousal,dominance\n", r"f\.txt:1: unknown VA header"),
        ("va", b"0.1,0.2\n", r"f\.txt:1: unknown VA header"),
        ("expr", b"Neutral,Happy\n", r"f\.txt:1: unknown EXPR header"),
        ("au", b"AU1,AU1\n", r"f\.txt:1: unknown AU header"),
        ("va", b"\n\n", r"f\.txt:1: missing header"),
    ],
)
def test_malformed_input_names_file_and_line(task, data, message):
    with pytest.raises(ValueError, match=message):
        parse(data, task)


def test_skip_bad_lines_counts_them():
    p = parse(VA_H + b"0.1,0.2\nbad,0\n0.3,0.4\n9,9\n", "va", on_bad_line="skip")
    assert p.n_lines == 4
    assert p.bad_lines == [3, 5]
    np.testing.assert_array_equal(p.present, [True, False, True, False])
    assert np.isnan(p.va[1]).all() and p.va[2, 0] == np.float32(0.3)


def test_parse_annotation_reads_file(tmp_path):
    f = tmp_path / "vid.txt"
    f.write_bytes(AU_H + b"0,1,0,1,0,1,0,1,0,1,0,x\n")
    with pytest.raises(ValueError, match=re.escape(f"{f}:2: non-numeric value 'x'")):
        parse_annotation(f, "au")
    with pytest.raises(ValueError, match="on_bad_line"):
        parse_annotation(f, "au", on_bad_line="ignore")


def test_empty_body_and_header_only():
    p = parse(VA_H, "va")
    assert p.n_lines == 0 and p.va.shape == (0, 2)


# --- property-based: the fast path agrees with the reference scanner -------------------------

_va_value = st.one_of(st.just(-5.0), st.floats(-1, 1, allow_nan=False).map(lambda x: round(x, 6)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(_va_value, _va_value), max_size=30), crlf=st.booleans())
def test_va_valid_rows_round_trip(rows, crlf):
    nl = "\r\n" if crlf else "\n"
    text = "valence,arousal" + nl + "".join(f"{v},{a}{nl}" for v, a in rows)
    p = parse(text.encode(), "va")
    assert p.n_lines == len(rows)
    for (v, a), got in zip(rows, p.va, strict=False):
        if v == -5 or a == -5:
            assert np.isnan(got).all()
        else:
            np.testing.assert_array_equal(got, np.float32([v, a]))


@settings(max_examples=60, deadline=None)
@given(expr=st.lists(st.integers(-1, 7), max_size=30),
       au=st.lists(st.lists(st.sampled_from([-1, 0, 1]), min_size=12, max_size=12), max_size=20))
def test_expr_au_valid_rows_round_trip(expr, au):
    p = parse(EXPR_H8 + "".join(f"{e}\n" for e in expr).encode(), "expr")
    np.testing.assert_array_equal(p.expr, np.array(expr, np.int8))
    q = parse(AU_H + "".join(",".join(map(str, r)) + "\n" for r in au).encode(), "au")
    np.testing.assert_array_equal(q.au, np.array(au, np.int8).reshape(-1, 12))


_token = st.one_of(
    st.sampled_from(["0", "1", "-1", "-5", "0.5", "-0.25", "1.0", "2", "nan", "inf", "", " ", "x",
                     "1e-1", "+1", ".5", "1_0", "--1", "٣", "0x1", "1e400"]),
    st.text(alphabet=" \t0123456789.-+eE,x", max_size=6),
)
_line = st.lists(_token, min_size=1, max_size=3).map(",".join)


@settings(max_examples=150, deadline=None)
@given(task=st.sampled_from(["va", "expr"]), lines=st.lists(_line, max_size=8),
       nl=st.sampled_from(["\n", "\r\n"]))
def test_garbage_parses_like_the_reference_or_names_the_line(task, lines, nl):
    header = {"va": VA_H, "expr": EXPR_H8}[task]
    body = nl.join(lines).encode()
    data = header + body
    hdr = parse_header(header.decode(), task, "f.txt:1")
    try:
        got = parse(data, task)
    except ValueError as e:
        m = re.match(r"f\.txt:(\d+): ", str(e))
        assert m, str(e)
        n = int(m.group(1))
        # the named line is the first one the reference scanner rejects
        ref_lines = split_lines(body)
        with pytest.raises(ValueError, match=rf"^f\.txt:{n}: "):
            _scan(task, hdr, ref_lines, "f.txt", "error")
        assert 2 <= n <= len(ref_lines) + 1
        return
    ref = _scan(task, hdr, split_lines(body), "f.txt", "error")
    assert got.n_lines == ref.n_lines
    if task == "va":
        np.testing.assert_array_equal(got.va, ref.va)
        assert np.all(np.isnan(got.va) | ((got.va >= -1) & (got.va <= 1)))
    else:
        np.testing.assert_array_equal(got.expr, ref.expr)
        assert np.all((got.expr >= -1) & (got.expr < 8))


# --- MTL ------------------------------------------------------------------------------------

MTL_HEADER = "image,valence,arousal,expression," + ",".join(AU_NAMES) + "\n"
AU_ROW = ",".join(["0", "1"] * 6)


def test_mtl_with_and_without_header(tmp_path):
    tr, va = tmp_path / "training_set_annotations.txt", tmp_path / "validation_set_annotations.txt"
    tr.write_text(MTL_HEADER + f"v1/00001.jpg,0.5,-0.5,3,{AU_ROW}\nv1/00002.jpg,-5,-5,-1,{AU_ROW}\n")
    va.write_text(f"v2/00010.jpg,0.1,0.2,7,{AU_ROW}\r\n")
    m = parse_mtl({"train": tr, "val": va})
    assert m.video == ["v1", "v1", "v2"] and m.frame.tolist() == [1, 2, 10]
    assert m.split == ["train", "train", "val"]
    assert m.expr.tolist() == [3, -1, 7] and np.isnan(m.va[1]).all()
    assert m.where(2) == f"{va}:1" and m.where(1) == f"{tr}:3"


def test_mtl_aus_header(tmp_path):
    tr = tmp_path / "train_set.txt"
    tr.write_text("image,valence,arousal,expression,aus\n" + f"v/00003.jpg,0.1,0.2,5,{AU_ROW}\n")
    m = parse_mtl({"train": tr})
    assert m.frame.tolist() == [3] and m.expr.tolist() == [5] and m.au[0].tolist() == [0, 1] * 6
    tr.write_text("image,valence,arousal,expression,foo\n")
    with pytest.raises(ValueError, match=f"{tr}:1: unknown MTL header"):
        parse_mtl({"train": tr})


def test_mtl_bad_line(tmp_path):
    tr = tmp_path / "train_set.txt"
    tr.write_text(MTL_HEADER + f"v1/00001.jpg,0.5,-0.5,3,{AU_ROW}\nv1/x.jpg,0.5,-0.5,3,{AU_ROW}\n")
    with pytest.raises(ValueError, match=re.escape(f"{tr}:3: bad image path")):
        parse_mtl({"train": tr})
    m = parse_mtl({"train": tr}, on_bad_line="skip")
    assert len(m.video) == 1 and m.bad_lines == [f"{tr}:3"]


def test_mtl_permuted_header_and_fallback_agree(tmp_path, monkeypatch):
    import affpipe.index.mtl as ann

    tr = tmp_path / "train_set.txt"
    au = ",".join(reversed(AU_NAMES))
    rows = [f"v/{k:05d}.jpg,{k / 10},-0.5,{k % 8}," + ",".join(["1"] + ["0"] * 11) for k in range(1, 8)]
    tr.write_text(f"image,arousal,valence,expression,{au}\r\n" + "\r\n".join(rows) + "\r\n\r\n")
    fast = parse_mtl({"train": tr})
    assert fast.va[2].tolist() == pytest.approx([-0.5, 0.3])  # valence is the file's 3rd column
    assert fast.au[0].tolist() == [0] * 11 + [1]  # first AU column of the file is AU26
    assert fast.line.tolist() == list(range(2, 9))
    monkeypatch.setattr(ann, "_mtl_fast", lambda body, order: None)
    slow = parse_mtl({"train": tr})
    assert slow.video == fast.video and slow.frame.tolist() == fast.frame.tolist()
    np.testing.assert_array_equal(slow.va, fast.va)
    np.testing.assert_array_equal(slow.expr, fast.expr)
    np.testing.assert_array_equal(slow.au, fast.au)
    assert slow.line.tolist() == fast.line.tolist()


def test_mtl_fast_path_rejects_what_the_scanner_rejects(tmp_path):
    tr = tmp_path / "train_set.txt"
    tr.write_text(f"v/00001.jpg,0.5,-0.5,3,{AU_ROW}\nv/00002.png,0.5,-0.5,3,{AU_ROW}\n")
    with pytest.raises(ValueError, match=re.escape(f"{tr}:2: bad image path")):
        parse_mtl({"train": tr})
    tr.write_text(f"v/00001.jpg,0.5,-0.5,8,{AU_ROW}\n")
    with pytest.raises(ValueError, match=re.escape(f"{tr}:1: EXPR: value out of range")):
        parse_mtl({"train": tr})
