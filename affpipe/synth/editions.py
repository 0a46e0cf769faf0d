"""The ABAW editions' folder names, header lines and image roots, as the twin writes them."""

from __future__ import annotations

from dataclasses import dataclass

from affpipe.labels import ABAW1_AUS, AU_NAMES, MTL_HEADER, edition_header

IMAGE_ROOTS = ("cropped_aligned", "cropped_aligned_new_50_vids")
# The header lines the twin writes: the same table predict's submission files follow.
HEADERS = {
    "va": edition_header("va"),
    "expr8": edition_header("expr", "abaw3"),
    "expr7": edition_header("expr", "abaw2"),
    "au": edition_header("au"),
    "mtl": MTL_HEADER,
}


@dataclass(frozen=True)
class Edition:
    """One ABAW edition's folder and header conventions."""

    annotation_root: str
    folders: dict[str, str]  # task -> challenge folder
    expr_classes: int
    mtl_files: tuple[str, str]  # (train, val), relative to the annotation root
    image_roots: int
    split_dirs: tuple[str, str] = ("Train_Set", "Validation_Set")  # ABAW1 (2020): Training_Set
    au_names: tuple[str, ...] = AU_NAMES  # the AU header; ABAW1 has 8 columns, AU20 among them


_MTL_OLD = ("training_set_annotations.txt", "validation_set_annotations.txt")
_MTL_NEW = ("MTL_Challenge/train_set.txt", "MTL_Challenge/validation_set.txt")
LAYOUTS: dict[str, Edition] = {
    "abaw1": Edition("annotations", {"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"}, 7, _MTL_OLD, 1,
                     ("Training_Set", "Validation_Set"), ABAW1_AUS),
    "abaw2": Edition("annotations", {"va": "VA_Set", "expr": "EXPR_Set", "au": "AU_Set"}, 7, _MTL_OLD, 1),
    "abaw3": Edition("3rd ABAW Annotations", {"va": "VA_Estimation_Challenge", "expr": "EXPR_Classification_Challenge",
                                             "au": "AU_Detection_Challenge"}, 8, _MTL_OLD, 1),
    "abaw5": Edition("5th ABAW Annotations", {"va": "VA_Estimation_Challenge", "expr": "EXPR_Classification_Challenge",
                                             "au": "AU_Detection_Challenge"}, 8, _MTL_NEW, 2),
    "abaw6": Edition("6th ABAW Annotations", {"va": "VA_Estimation_Challenge", "expr": "EXPR_Recognition_Challenge",
                                             "au": "AU_Detection_Challenge"}, 8, _MTL_NEW, 2),
}
